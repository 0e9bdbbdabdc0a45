"""The GPU check: one run, under 8 minutes, of what a GPU node's figures rest on.

Prints, and writes as JSON:

1. what it ran on: the card (nvidia-smi), Python, torch, ONNX Runtime and its providers;
2. the providers a session on the served network actually uses: with ``--require-cuda`` (the
   default with ``--device cuda``) the check fails when CUDA was asked for and the CPU runs;
3. the model alone at 96 and 224 px for batches 64 to 512, fp32 and fp16: ONNX Runtime where its
   CUDA provider loads (fp16: the graph ``catstream check-fp16`` makes, with the largest logit
   difference it gives on the device), each by plain runs and through the serving loop's I/O
   binding (``core.scoring.BoundBatch``: device buffers refilled in place, outputs into
   preallocated arrays; the check fails where the two disagree), and PyTorch on the same device
   always (the network is catstream's own, MobileNetV2 image branch and text branches, with random
   weights: speed does not depend on them). Where the CUDA provider runs, its options are measured
   too: cuDNN's algorithm search (EXHAUSTIVE, HEURISTIC, DEFAULT: the first run of a batch shape
   against the items/s after it) and the memory arena's growth (the device memory a session holds);
4. JPEG decoding on the GPU (``torchvision.io.decode_jpeg`` on CUDA) against Pillow on one core,
   on 600 x 800 photos;
5. with ``--bundle`` (a trained bundle; the device machine has none unless one travels): the
   null-model pipeline over 1 to 13 preprocess workers (``bench/throughput.py``'s null variant),
   which needs the embedded broker's wheel there.

    bash bench/gpu_check.sh                       # on the GPU machine; see bench/README.md
    .venv/bin/python bench/gpu_check.py --device cpu --batches 64 --sizes 96   # the same code on a CPU
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.bundle import FusionConfig  # noqa: E402
from core.model import FusionModel  # noqa: E402

_CONFIG = {  # the served network's shape as `catstream train` makes it (docs/training.md defaults)
    "num_classes": 98,
    "vocab_size": 20_000,
    "max_title_tokens": 32,
    "max_mall_tokens": 16,
    "text_dim": 64,
    "char_buckets": 100_000,
    "max_title_grams": 96,
    "fusion_hidden": 256,
    "dropout": 0.0,
}


def machine() -> dict:
    import onnxruntime as ort

    try:
        cards = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        cards = ""
    return {
        "gpus": cards or "none (nvidia-smi absent or silent)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "cpus": __import__("os").cpu_count(),
    }


def network(size: int) -> FusionModel:
    model = FusionModel(FusionConfig(image_size=size, **_CONFIG))
    return model.eval()


def inputs(size: int, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(batch)
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    title = torch.randint(1, _CONFIG["vocab_size"], (batch, _CONFIG["max_title_tokens"]), generator=generator)
    mall = torch.randint(1, _CONFIG["vocab_size"], (batch, _CONFIG["max_mall_tokens"]), generator=generator)
    grams = torch.randint(1, _CONFIG["char_buckets"], (batch, _CONFIG["max_title_grams"]), generator=generator)
    ones = torch.ones(batch)
    return tuple(t.to(device) for t in (image, ones, title, mall, ones, grams))


def timed(run, seconds: float) -> float:
    """Calls per second of ``run`` over about ``seconds`` (after two warm-up calls)."""
    run()
    run()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        calls += 1
    return calls / (time.perf_counter() - started)


def torch_model_alone(sizes, batches, device: str, seconds: float) -> list[dict]:
    rows = []
    for size in sizes:
        model = network(size).to(device)
        for batch in batches:
            feeds = inputs(size, batch, device)
            for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):

                def run(model=model, feeds=feeds, precision=precision):
                    with torch.inference_mode(), torch.autocast(device, torch.float16, enabled=precision == "fp16"):
                        model(*feeds)
                    if device == "cuda":
                        torch.cuda.synchronize()

                rate = timed(run, seconds) * batch
                rows.append({"engine": "pytorch", "px": size, "batch": batch, "precision": precision, "items_s": rate})
                print(f"  pytorch {size:>3} px  batch {batch:>4}  {precision}: {rate:>10,.0f} items/s", flush=True)
    return rows


def ort_model_alone(sizes, batches, device: str, seconds: float) -> tuple[list[dict], dict]:
    """The exported network in ONNX Runtime; ``(rows, providers)``: which providers each session used."""
    import onnxruntime as ort

    from core.scoring import BoundBatch, binding_device, choose_providers, provider_options
    from training.export import export_onnx, input_names
    from training.half_precision import to_half_precision

    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    used: dict = {"asked": wanted}
    try:
        providers = choose_providers(wanted)
    except ValueError as error:
        used["error"] = str(error)
        print(f"  ONNX Runtime: {error}", flush=True)
        return [], used
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            model = network(size)
            path = Path(work) / f"model-{size}.onnx"
            export_onnx(model, path)
            half = path.with_name(f"model-{size}.fp16.onnx")
            to_half_precision(path, half)  # as `catstream check-fp16` makes a bundle's fp16 graph
            names = input_names(model)
            outputs = {}
            for precision, graph in (("fp32", path), ("fp16", half)):
                options = provider_options(providers, fp16=precision == "fp16")
                session = ort.InferenceSession(str(graph), providers=options)
                used[f"{size}px"] = session.get_providers()
                for batch in batches:
                    feeds = {name: t.numpy() for name, t in zip(names, inputs(size, batch, "cpu"), strict=True)}
                    # plain runs against the serving loop's I/O binding (device buffers refilled in place)
                    binding = BoundBatch(session, feeds, ["logits"], device=binding_device(session))
                    for io, run in (
                        ("plain", lambda session=session, feeds=feeds: session.run(["logits"], feeds)),
                        ("bound", lambda binding=binding, feeds=feeds: binding.run(feeds)),
                    ):
                        rate = timed(run, seconds) * batch
                        row = {"px": size, "batch": batch, "precision": precision, "io": io, "items_s": rate}
                        rows.append({"engine": "onnxruntime", **row})
                        print(
                            f"  onnxruntime {size:>3} px  batch {batch:>4}  {precision}  {io}: {rate:>10,.0f} items/s",
                            flush=True,
                        )
                    outputs[precision] = session.run(["logits"], feeds)[0]
                    key = f"{size}px_{precision}_bound_vs_plain_max_abs_logit_difference"
                    used[key] = max(used.get(key, 0.0), float(np.abs(binding.run(feeds)[0] - outputs[precision]).max()))
            # on the device itself: how far fp16 moves the logits of the largest batch (random weights)
            difference = float(np.max(np.abs(outputs["fp16"] - outputs["fp32"])))
            used[f"{size}px_fp16_max_abs_logit_difference"] = difference
            print(f"  onnxruntime {size:>3} px  fp16 vs fp32: largest logit difference {difference:.3g}", flush=True)
    return rows, used


def cuda_provider_options(size: int, batches: list[int], seconds: float) -> list[dict]:
    """The CUDA provider's options, measured to choose the node's: cuDNN's convolution algorithm
    search (what the first run of each batch shape costs, during the warm-up, against the items/s
    after it) and the memory arena's growth (the device memory the session holds after running
    every batch size), on the fp32 graph at ``size`` px."""
    import onnxruntime as ort

    from training.export import export_onnx, input_names

    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = network(size)
        path = Path(work) / "model.onnx"
        export_onnx(model, path)
        names = input_names(model)
        for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            for arena in ("kNextPowerOfTwo", "kSameAsRequested"):
                options = {"cudnn_conv_algo_search": search, "arena_extend_strategy": arena}
                free_before = torch.cuda.mem_get_info()[0]
                started = time.perf_counter()
                session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options)])
                row: dict = {"px": size, **options, "session_s": time.perf_counter() - started}
                for batch in batches:
                    feeds = {name: t.numpy() for name, t in zip(names, inputs(size, batch, "cpu"), strict=True)}
                    started = time.perf_counter()
                    session.run(["logits"], feeds)
                    row[f"first_run_s_batch_{batch}"] = time.perf_counter() - started
                    row[f"items_s_batch_{batch}"] = (
                        timed(lambda s=session, f=feeds: s.run(["logits"], f), seconds) * batch
                    )
                row["device_memory_mib"] = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
                del session
                rows.append(row)
                print(
                    f"  {search:<10} {arena:<16} first runs "
                    + ", ".join(f"{row[f'first_run_s_batch_{b}']:.2f}" for b in batches)
                    + " s; items/s "
                    + ", ".join(f"{row[f'items_s_batch_{b}']:,.0f}" for b in batches)
                    + f"; device memory {row['device_memory_mib']:,.0f} MiB",
                    flush=True,
                )
    return rows


def jpeg_decode(device: str, seconds: float) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(64):
        buffer = io.BytesIO()
        noise = rng.integers(0, 256, (800, 600, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="JPEG", quality=85)
        photos.append(buffer.getvalue())
    result = {"photos": "600x800 JPEG, quality 85"}

    def pillow():
        for data in photos:
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (224, 224))
                image.convert("RGB")

    result["pillow_one_core_images_s"] = timed(pillow, seconds) * len(photos)
    if device == "cuda":
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in photos]

        def gpu():
            decode_jpeg(tensors, device="cuda")
            torch.cuda.synchronize()

        result["gpu_images_s"] = timed(gpu, seconds) * len(photos)
    print("  " + ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def null_sweep(bundle: Path, data: Path | None, workers: list[int], offers: int) -> list[dict]:
    rows = []
    for count in workers:
        command = [sys.executable, str(REPO / "bench" / "throughput.py"), "--model", str(bundle)]
        command += ["--variants", "null", "--preprocess-workers", str(count), "--offers", str(offers)]
        command += ["--data", str(data)] if data else []
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([*command, "--out", out], capture_output=True, text=True, timeout=600)
            reports = sorted(Path(out).glob("throughput-*.json"))
            if done.returncode or not reports:
                rows.append({"workers": count, "error": done.stderr[-500:]})
                print(f"  {count:>2} workers: failed ({done.stderr.strip().splitlines()[-1:]})", flush=True)
                continue
            null = json.loads(reports[-1].read_text())["results"]["null"]
        rows.append({"workers": count, **{k: null[k] for k in ("offers_per_second", "cpu_us_per_offer", "idle_cores")}})
        print(
            f"  {count:>2} workers: {null['offers_per_second']:>9,.0f} offers/s  {null['cpu_us_per_offer']}", flush=True
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--require-cuda", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--sizes", default="96,224", help="image sizes in px (default 96,224)")
    parser.add_argument("--batches", default="64,128,256,512", help="batch sizes (default 64,128,256,512)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement (default 2)")
    parser.add_argument("--bundle", type=Path, help="a trained bundle, for the null-model sweep")
    parser.add_argument("--data", type=Path, help="offer file for the sweep (default: synthetic)")
    parser.add_argument("--workers", default="1,2,4,8,13", help="preprocess workers of the sweep")
    parser.add_argument("--offers", type=int, default=20_000, help="offers per sweep step (default 20000)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    require_cuda = args.device == "cuda" if args.require_cuda is None else args.require_cuda
    sizes = [int(n) for n in args.sizes.split(",")]
    batches = [int(n) for n in args.batches.split(",")]
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    report: dict = {"machine": machine()}
    print("what this ran on:", json.dumps(report["machine"], indent=1), flush=True)
    failures = []
    if args.device == "cuda" and not torch.cuda.is_available():
        failures.append("CUDA asked for, but torch sees no GPU")
    else:
        print("model alone, PyTorch:", flush=True)
        report["torch_model_alone"] = torch_model_alone(sizes, batches, args.device, args.seconds)
        print("model alone, ONNX Runtime:", flush=True)
        report["ort_model_alone"], report["ort_providers"] = ort_model_alone(sizes, batches, args.device, args.seconds)
        used = [p for key, p in report["ort_providers"].items() if key.endswith("px")]
        if require_cuda and (not used or any(providers[0] != "CUDAExecutionProvider" for providers in used)):
            failures.append(f"ONNX Runtime did not run on CUDA: {report['ort_providers']}")
        for key, difference in report["ort_providers"].items():
            if key.endswith("bound_vs_plain_max_abs_logit_difference") and difference > 1e-3:
                failures.append(f"bound runs differ from plain runs: {key} = {difference:.3g}")
        if "CUDAExecutionProvider" in report["ort_providers"].get(f"{sizes[-1]}px", []):
            print(f"CUDA provider options, {sizes[-1]} px, batches {batches[0]} and {batches[-1]}:", flush=True)
            try:  # a measurement that fails is reported, and the rest of the check still runs
                report["cuda_provider_options"] = cuda_provider_options(
                    sizes[-1], [batches[0], batches[-1]], args.seconds / 2
                )
            except Exception as error:
                report["cuda_provider_options"] = f"failed: {type(error).__name__}: {error}"
                failures.append(f"measuring the CUDA provider's options failed: {error}")
        print("JPEG decoding:", flush=True)
        report["jpeg_decode"] = jpeg_decode(args.device, args.seconds)
    if args.bundle:
        print("null-model pipeline sweep:", flush=True)
        workers = [int(n) for n in args.workers.split(",")]
        report["null_sweep"] = null_sweep(args.bundle, args.data, workers, args.offers)
    else:
        report["null_sweep"] = "skipped: no --bundle (the sweep needs a trained bundle and the broker's wheel)"
    report["failures"] = failures
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-check-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"JSON: {path}")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
