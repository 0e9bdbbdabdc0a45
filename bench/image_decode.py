"""Image decode cost by format and size, next to real marketplace photos: what the pixel limits are
chosen from.

A preprocess worker decodes every image an offer names and shrinks it to the model's size. JPEG
decodes straight at 1/2, 1/4 or 1/8 scale (PIL's draft mode), so a large photo costs little more
than a small one; PNG and WebP decode every pixel first. This measures, per format and size, the
CPU time of ``core.images.decode_image`` to the model's size and the peak memory of a process that
decodes it (each case in a fresh process, so the peak is the decode's own), and prints the real
photos' sizes for comparison (the shared Flipkart sample: full-size product photos).

    .venv/bin/python bench/image_decode.py
    .venv/bin/python bench/image_decode.py --sizes 1000,2000,4000,6300 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)

FLIPKART = REPO.parent / "shared" / "datasets" / "flipkart-sample"

# Linux keeps a process's memory high-water mark across exec (the parent's, at fork): the case
# resets it (clear_refs) and reads VmHWM, the peak of its own decodes, against VmRSS before them.
_CASE = """
import json, re, sys, time
sys.path.insert(0, {repo!r})
from core.images import ImagePolicy, decode_image

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1])

data = open({path!r}, "rb").read()
policy = ImagePolicy(max_pixels=10**9, max_full_decode_pixels=10**9, max_bytes=10**9)
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
seconds = []
for _ in range({repeats}):
    started = time.process_time()
    decode_image(data, {size}, policy=policy)
    seconds.append(time.process_time() - started)
print(json.dumps({{"cpu_ms": 1000 * sorted(seconds)[len(seconds) // 2], "added_mib": (kib("VmHWM") - before) / 1024}}))
"""


def photo_like(side: int, seed: int = 0) -> Image.Image:
    """A picture that compresses as a product photo does: smooth shapes, edges, some grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(4 * y - 3 * x), np.sin(5 * (x + y))], axis=-1)
    pixels = (127 + 100 * base + rng.normal(0, 6, (side, side, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,1000,2000,3000,4000,6300", help="square sides in pixels")
    parser.add_argument("--formats", default="JPEG,PNG,WEBP", help="formats measured")
    parser.add_argument("--model-size", type=int, default=96, help="the model's image size (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="decodes per case, median (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()

    work = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        picture = photo_like(side)
        for fmt in args.formats.split(","):
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
            path = work / f"{side}.{fmt.lower()}"
            path.write_bytes(buffer.getvalue())
            code = _CASE.format(repo=str(REPO), path=str(path), size=args.model_size, repeats=args.repeats)
            measured = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))
            rows.append(
                {
                    "format": fmt,
                    "side": side,
                    "megapixels": round(side * side / 1e6, 2),
                    "bytes": len(buffer.getvalue()),
                }
                | measured
            )
            print(
                f"{fmt:5} {side:5d}² ({side * side / 1e6:5.1f} Mpx, {len(buffer.getvalue()) / 1e6:6.2f} MB): "
                f"{measured['cpu_ms']:8.1f} ms CPU, +{measured['added_mib']:6.0f} MiB peak",
                flush=True,
            )
    photos = []
    if FLIPKART.is_dir():
        for image in sorted((FLIPKART / "images").glob("*")):
            try:
                with Image.open(image) as opened:
                    photos.append(
                        {
                            "width": opened.width,
                            "height": opened.height,
                            "format": opened.format,
                            "bytes": image.stat().st_size,
                        }
                    )
            except OSError:
                continue
    if photos:
        megapixels = np.array([p["width"] * p["height"] / 1e6 for p in photos])
        sizes = np.array([p["bytes"] for p in photos]) / 1e6
        print(
            f"\nreal photos ({len(photos)}, {FLIPKART.name}): {np.median(megapixels):.2f} Mpx median, "
            f"{megapixels.max():.2f} Mpx largest; {np.median(sizes):.2f} MB median, {sizes.max():.2f} MB largest; "
            f"formats {sorted({p['format'] for p in photos})}"
        )
    path = record(
        "image-decode",
        {"model_size": args.model_size, "repeats": args.repeats, "cases": rows, "photos": photos},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
