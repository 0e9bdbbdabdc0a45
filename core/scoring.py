"""The served model: the bundle's ONNX graph in ONNX Runtime plus the lexical model's scores.

The inference process, ``catstream evaluate`` and ``catstream audit`` all score through
:class:`OnnxClassifier`, so what evaluation measures is what the stream serves.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from core.bundle import EMBEDDING_OUTPUTS, PARITY_FILE, BundleError, ModelBundle, half_precision_graph
from core.decision import apply_exclusions, softmax
from core.feature_queue import InputField
from core.features import Featurizer
from core.images import ImagePolicy
from core.schemas import Offer

__all__ = [
    "ACCELERATORS",
    "SERVED_SPACES",
    "BoundBatch",
    "OfferEmbedder",
    "OnnxClassifier",
    "Precision",
    "binding_device",
    "check_bundle",
    "choose_providers",
    "pad_rows",
    "padded_size",
    "padded_sizes",
    "provider_options",
    "served_probabilities",
    "vector_fields_of",
]

ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

# The spaces a prediction carries: the fused vector is [image, text] / sqrt(2), so readers rebuild
# it (core.schemas.decode_vectors) rather than the stream carrying it.
SERVED_SPACES = ("image", "text")

log = logging.getLogger(__name__)

# fp32: the exported graph. fp16: the bundle's checked fp16 graph, refused where it has none.
# auto: fp16 on an accelerator where the bundle's check accepted it, fp32 otherwise.
Precision = Literal["auto", "fp32", "fp16"]


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """``requested`` if given (each must be available), else CUDA when present, CPU last."""
    available = ort.get_available_providers()
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise ValueError(f"ONNX Runtime providers {missing} are not available here (have {available})")
        return list(requested)
    preferred = [name for name in ("CUDAExecutionProvider",) if name in available]
    return [*preferred, "CPUExecutionProvider"]


def provider_options(
    providers: Sequence[str],
    *,
    cache_dir: str | None = None,
    cuda_algo_search: str = "EXHAUSTIVE",
    fp16: bool = False,
) -> list[tuple[str, dict[str, str]]]:
    """Each provider with its options.

    - CUDA: cuDNN's convolution algorithm search (``EXHAUSTIVE`` by default: it runs once per
      input shape, and the node pads batches to a few sizes it warms up before it reports ready),
      and a memory arena that grows by what is asked rather than doubling.
    - TensorRT: an engine cache (``cache_dir``), so that a restart does not rebuild the engines;
      fp16 kernels only with ``fp16``, i.e. when the graph served is the bundle's checked fp16 graph
      (``training.half_precision``): TensorRT never lowers an fp32 graph's precision on its own.
    """
    options = []
    for name in providers:
        if name == "CUDAExecutionProvider":
            options.append(
                (name, {"cudnn_conv_algo_search": cuda_algo_search, "arena_extend_strategy": "kSameAsRequested"})
            )
        elif name == "TensorrtExecutionProvider":
            trt = {"trt_fp16_enable": str(fp16)}
            if cache_dir:
                trt |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir}
            options.append((name, trt))
        else:
            options.append((name, {}))
    return options


# ONNX element types of the outputs a binding preallocates, as numpy dtypes.
_OUTPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
}


class BoundBatch:
    """One batch shape's I/O binding (ONNX Runtime's IOBinding): the graph's outputs go straight
    into arrays preallocated once, and its inputs come from fixed memory.

    On an accelerator (``device="cuda"``) each input has its own device buffer, allocated once
    and refilled in place before each run (one host-to-device copy, no allocation); on the CPU the
    inputs are bound to the caller's arrays themselves (the inference loop's gather buffers, which
    never move), so nothing is copied at all. Either way the outputs land in host arrays this
    binding owns: :meth:`run` returns them, and the next run overwrites them.

    ``own_inputs`` gives the inputs buffers of their own on the CPU too (what the accelerator path
    does, on host memory: its tests run it so).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        *,
        device: str,
        own_inputs: bool | None = None,
    ):
        self.rows = len(next(iter(inputs.values())))
        self._session = session
        self._binding = session.io_binding()
        self._held: dict[str, np.ndarray] = {}  # what each input bound in place is bound to, kept alive
        self._owned: dict[str, ort.OrtValue] = {}  # each input's own buffer, refilled before each run
        for name, array in inputs.items():
            if own_inputs or (own_inputs is None and device != "cpu"):
                value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, device, 0)
                self._binding.bind_ortvalue_input(name, value)
                self._owned[name] = value
            else:
                self._bind_host(name, array)
        declared = {item.name: item for item in session.get_outputs()}
        self.outputs: list[np.ndarray] = []
        for name in outputs:
            output = declared[name]
            dims = output.shape[1:]
            if output.type not in _OUTPUT_DTYPES or not all(isinstance(dim, int) for dim in dims):
                raise BundleError(f"output {name} ({output.type}, shape {output.shape}) cannot be preallocated")
            array = np.empty((self.rows, *dims), dtype=_OUTPUT_DTYPES[output.type])
            self._binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            self.outputs.append(array)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``inputs`` (``(rows, …)`` arrays by input name, the shapes bound)."""
        for name, array in inputs.items():
            if array.shape[0] != self.rows:
                raise ValueError(f"input {name} has {array.shape[0]} rows; this binding takes {self.rows}")
            if name in self._owned:
                self._owned[name].update_inplace(np.ascontiguousarray(array))
            # the gather buffers never move, so this rebinds only when the caller's memory did
            elif array.ctypes.data != self._held[name].ctypes.data or not array.flags.c_contiguous:
                self._bind_host(name, array)
        self._binding.synchronize_inputs()
        self._session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return self.outputs

    def _bind_host(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        self._held[name] = array


def binding_device(session: ort.InferenceSession) -> str:
    """Where a :class:`BoundBatch` of ``session`` keeps its inputs: ``"cuda"`` when the session runs
    on an accelerator (TensorRT's memory is CUDA's), else ``"cpu"``."""
    return "cuda" if any(name in ACCELERATORS for name in session.get_providers()) else "cpu"


def padded_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes an accelerator's batches are padded to: powers of two from 8, and the largest batch."""
    sizes = {size for size in (8, 16, 32, 64, 128, 256, 512, 1024) if size < max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def padded_size(rows: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``rows`` rows; ``rows`` itself beyond them all."""
    return next((size for size in sorted(sizes) if size >= rows), rows)


def pad_rows(inputs: dict[str, np.ndarray], sizes: Sequence[int]) -> tuple[dict[str, np.ndarray], int]:
    """``inputs`` (``(N, …)`` arrays by name) grown to the smallest of ``sizes`` that holds N rows,
    with copies of the last row: ``(padded, N)``. Unchanged when N is one of the sizes or beyond them."""
    rows = len(next(iter(inputs.values())))
    target = padded_size(rows, sizes)
    if target == rows or rows == 0:
        return inputs, rows
    return {
        name: np.concatenate([array, np.repeat(array[-1:], target - rows, axis=0)]) for name, array in inputs.items()
    }, rows


class OnnxClassifier:
    """An ONNX Runtime session over the bundle's network; :meth:`logits` adds the lexical model's
    scores (computed by the featuriser) when the bundle has one.

    With ``embeddings`` and a bundle that has an embedder, the session runs the graph with the
    embedder attached (``embedder/model.onnx``) and :meth:`score` also returns the offer vectors
    from the same pass; :attr:`spaces` names them (empty otherwise).

    ``precision`` (see :data:`Precision`) picks the fp32 graph or its checked fp16 twin;
    :attr:`precision` says which one runs. ``graph`` runs another file of the same inputs and
    outputs instead, at the precision ``precision`` names (the fp16 check compares two graphs so).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
        embeddings: bool = False,
        pad_to: Sequence[int] | None = None,
        cache_dir: str | None = None,
        cuda_algo_search: str = "EXHAUSTIVE",
        precision: Precision = "fp32",
        graph: Path | None = None,
    ):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = choose_providers(providers)
        accelerated = any(name in ACCELERATORS for name in self.providers)
        if accelerated and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN from the nvidia-* wheels only once they are preloaded
            ort.preload_dlls()
        self.precision: Literal["fp32", "fp16"]
        if graph is None:
            graph = bundle.embedded_onnx_path if embeddings and bundle.embedded_onnx_path else bundle.onnx_path
            graph, self.precision = _graph_at(graph, precision, accelerated=accelerated)
        else:  # a file named by the caller, whose precision the caller names
            self.precision = "fp16" if precision == "fp16" else "fp32"
        self.session = ort.InferenceSession(
            str(graph),
            sess_options=options,
            providers=provider_options(
                self.providers, cache_dir=cache_dir, cuda_algo_search=cuda_algo_search, fp16=self.precision == "fp16"
            ),
        )
        if (
            providers
            and "CUDAExecutionProvider" in providers
            and "CUDAExecutionProvider" not in self.session.get_providers()
        ):
            raise RuntimeError(
                "CUDAExecutionProvider was asked for but the session fell back to the CPU "
                "(CUDA or cuDNN libraries not loadable; see the log above)"
            )
        self.input_names = tuple(item.name for item in self.session.get_inputs())
        outputs = {item.name for item in self.session.get_outputs()}
        self.spaces = tuple(space for space, name in EMBEDDING_OUTPUTS.items() if name in outputs)
        self._outputs = ["logits", *(EMBEDDING_OUTPUTS[space] for space in self.spaces)]
        self.uses_lexical = bundle.has_lexical
        # Batches padded to a few sizes (on an accelerator): each shape's kernels are chosen once.
        self.pad_to = tuple(sorted(pad_to)) if pad_to else ()
        # With padding: score(bound=key) runs through one BoundBatch per key and padded size.
        self.io_binding = False
        self._bound: dict[tuple[Hashable, int], BoundBatch] = {}
        shown = graph.relative_to(bundle.path) if graph.is_relative_to(bundle.path) else graph
        log.info("ONNX Runtime session on %s (%s, %s)", self.session.get_providers(), shown, self.precision)

    @property
    def accelerated(self) -> bool:
        """Whether the session runs on an accelerator (CUDA or TensorRT), not only the CPU."""
        return any(name in ACCELERATORS for name in self.session.get_providers())

    def warm_up(self, example: dict[str, np.ndarray], *, bound: Sequence[Hashable] = ()) -> list[int]:
        """Run each padded batch size once (or the example's own size when there are none) on
        copies of ``example``'s first row, so that no offer pays for a shape's first run; returns
        the sizes run. With :attr:`io_binding`, once under each of the ``bound`` keys, which sets
        up their bindings."""
        sizes = list(self.pad_to) or [len(next(iter(example.values())))]
        keys = list(bound) if self.io_binding and self.pad_to and bound else [None]  # None: a plain run
        for size in sizes:
            rows = {name: np.repeat(array[:1], size, axis=0) for name, array in example.items()}
            for key in keys:
                self.score(rows, bound=key)
        return sizes

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``(N, K)`` logits of a batch: ``inputs`` maps each input field's name to its ``(N, …)``
        array (``core.features.FeatureBatch.inputs``); the graph takes the ones it declares."""
        return self.score(inputs)[0]

    def score(
        self, inputs: dict[str, np.ndarray], *, bound: Hashable | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(logits, vectors)``: :meth:`logits` and, by space, the ``(N, D)`` unit vectors of the
        batch (an empty dict without an embedder).

        ``bound``: with :attr:`io_binding` on and batches padded, run through the I/O binding kept
        under this key for the padded size (:class:`BoundBatch`; the inference loop keys one per
        set of gather buffers). The arrays returned are then views of the binding's own, which
        the key's next run overwrites.
        """
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"this model needs the input(s) {', '.join(missing)}")
        feeds, rows = pad_rows({name: inputs[name] for name in self.input_names}, self.pad_to)
        if bound is not None and self.io_binding and self.pad_to:
            outputs = self._binding(bound, feeds).run(feeds)
        else:
            outputs = self.session.run(self._outputs, feeds)
        logits, *vectors = (output[:rows] for output in outputs)
        return self._with_lexical(logits, inputs), dict(zip(self.spaces, vectors, strict=True))

    def _binding(self, key: Hashable, feeds: dict[str, np.ndarray]) -> BoundBatch:
        rows = len(next(iter(feeds.values())))
        binding = self._bound.get((key, rows))
        if binding is None:
            binding = BoundBatch(self.session, feeds, self._outputs, device=binding_device(self.session))
            self._bound[key, rows] = binding
        return binding

    def _with_lexical(self, logits: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if not self.uses_lexical:
            return logits
        lexical = inputs.get("lexical")
        if lexical is None or lexical.shape[-1] == 0:
            raise ValueError("this model needs the lexical model's scores (lexical)")
        return logits + lexical


def _graph_at(graph: Path, precision: Precision, *, accelerated: bool) -> tuple[Path, Literal["fp32", "fp16"]]:
    """The file to serve for ``graph`` at ``precision``, and the precision it runs at."""
    if precision == "fp32":
        return graph, "fp32"
    half, why = half_precision_graph(graph)
    if precision == "fp16":
        if half is None:
            raise BundleError(f"fp16 was asked for, but {why}")
        log.info("serving fp16: %s", why)
        return half, "fp16"
    if not accelerated:
        return graph, "fp32"  # auto: the CPU gains nothing from fp16
    if half is None:
        log.info("serving fp32 on the accelerator: %s", why)
        return graph, "fp32"
    log.info("serving fp16 on the accelerator: %s", why)
    return half, "fp16"


def vector_fields_of(bundle: ModelBundle) -> tuple[InputField, ...]:
    """The vectors a served offer carries (:data:`SERVED_SPACES` of the graph with the embedder
    attached), as float16 fields of the node's queue; none for a bundle without an embedder."""
    if bundle.embedded_onnx_path is None:
        return ()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # shapes only
    session = ort.InferenceSession(
        str(bundle.embedded_onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    shapes = {item.name: item.shape for item in session.get_outputs()}
    fields = []
    for space in SERVED_SPACES:
        shape = shapes.get(EMBEDDING_OUTPUTS[space])
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            raise BundleError(f"{bundle.embedded_onnx_path}: no {EMBEDDING_OUTPUTS[space]} output of shape (N, D)")
        fields.append(InputField(space, "float16", (shape[1],)))
    return tuple(fields)


class OfferEmbedder:
    """Offers (or free text, as an offer's title) to vectors through the bundle's attached graph,
    featurised as the stream featurises them. What the query service embeds queries with."""

    def __init__(self, bundle: ModelBundle, *, image_policy: ImagePolicy = ImagePolicy(), intra_op_threads: int = 1):
        self.model = OnnxClassifier(bundle, embeddings=True, intra_op_threads=intra_op_threads)
        if not self.model.spaces:
            raise BundleError(f"{bundle.path} has no embedder (catstream train-embedder adds one)")
        self.featurizer = Featurizer.from_bundle(bundle, image_policy=image_policy)

    def embed(self, offers: Sequence[Offer]) -> dict[str, np.ndarray]:
        """By space, the ``(N, D)`` unit vectors of ``offers`` (an unusable image leaves the text's)."""
        _, vectors = self.model.score(self.featurizer.batch(offers).inputs)
        return vectors

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` query vectors: each text read as a title, which the text tower puts in the image space."""
        return self.embed([Offer(offer_id=f"query-{n}", title=text) for n, text in enumerate(texts)])["text"]


def served_probabilities(
    bundle: ModelBundle,
    offers: Sequence[Offer],
    *,
    batch_size: int = 256,
    threads: int = 2,
    progress=None,
    image_policy: ImagePolicy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, masked)`` ``(N, K)`` of ``offers`` as the bundle is served: the featuriser,
    ONNX Runtime, softmax at the bundle's temperature, then the exclusion mask (``masked``).

    ``progress``, if given, wraps the range of batch starts (a progress bar). The offers' images
    are read under ``image_policy``; the default trusts local files, as offer files given on the
    command line are.
    """
    featurizer = Featurizer.from_bundle(bundle, image_policy=image_policy or ImagePolicy.for_offer_files())
    classifier = OnnxClassifier(bundle, intra_op_threads=threads)
    probabilities = np.zeros((len(offers), len(bundle.labels)))
    exclusion = np.zeros((len(offers), len(bundle.labels)), dtype=bool)
    starts = range(0, len(offers), batch_size)
    for start in progress(starts) if progress else starts:
        batch = featurizer.batch(offers[start : start + batch_size])
        probabilities[start : start + len(batch)] = softmax(classifier.logits(batch.inputs), bundle.temperature)
        exclusion[start : start + len(batch)] = batch.exclusion
    masked, _ = apply_exclusions(probabilities, exclusion)
    return probabilities, masked


def check_bundle(
    bundle: ModelBundle,
    *,
    providers: Sequence[str] | None = None,
    precision: Precision = "fp32",
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> None:
    """Check a bundle before it serves: its featuriser loads, its ONNX model gives the logits PyTorch
    gave at export on the same inputs (``parity.npz``; the same tolerances as the export's check),
    and the labels match the outputs. Where ``precision`` picks the fp16 graph, that graph must be
    the one its check accepted (same digests) and run on the same inputs; fp16 asked for and not
    available is refused. :class:`BundleError` says what failed."""
    try:
        Featurizer.from_bundle(bundle)
        # The graph the node will serve: with the embedder attached when the bundle has one.
        served = OnnxClassifier(bundle, providers=providers, embeddings=True, precision=precision)
        full = served if served.precision == "fp32" else OnnxClassifier(bundle, providers=providers, embeddings=True)
        with np.load(bundle.path / PARITY_FILE) as probe:
            feeds = {item.name: probe[item.name] for item in full.session.get_inputs()}
            expected = probe["expected_logits"]
        (actual,) = full.session.run(["logits"], feeds)
        half = served.session.run(["logits"], feeds)[0] if served is not full else None
    except BundleError:
        raise
    except Exception as error:  # a bundle that cannot even be loaded or run is refused with the reason
        raise BundleError(f"{bundle.path}: the model does not load or run ({type(error).__name__}: {error})") from error
    if actual.shape != expected.shape or actual.shape[1] != len(bundle.labels):
        raise BundleError(
            f"{bundle.path}: the model gives {actual.shape} logits, the parity check expects "
            f"{expected.shape} for {len(bundle.labels)} categories"
        )
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        difference = float(np.max(np.abs(actual - expected)))
        raise BundleError(
            f"{bundle.path}: model.onnx does not reproduce the logits of its export (max |diff| "
            f"{difference:.2e}): the file is not the model this bundle was trained with"
        )
    if half is not None and half.shape != actual.shape:
        raise BundleError(f"{bundle.path}: the fp16 graph gives {half.shape} logits, the fp32 graph {actual.shape}")
