"""One frozen settings object for every stage, read from ``CATSTREAM_*`` environment variables.

The CLI reads it once at the entry point, applies flag overrides, and passes it down; library
code never reads the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.images import ImagePolicy

__all__ = ["ENV_PREFIX", "Settings"]

ENV_PREFIX = "CATSTREAM_"


class Settings(BaseSettings):
    """Runtime settings of the stream (Kafka, queue, batching, limits)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- Kafka connection -------------------------------------------------------------------
    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers; unset means start the embedded broker."
    )
    security_protocol: str | None = Field(
        None, description="librdkafka security.protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)."
    )
    sasl_mechanism: str | None = Field(None, description="librdkafka sasl.mechanism (PLAIN, SCRAM-SHA-512, ...).")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_ca_location: str | None = Field(None, description="CA certificate file for TLS.")
    ssl_certificate_location: str | None = Field(None, description="Client certificate file for mutual TLS.")
    ssl_key_location: str | None = Field(None, description="Client private key file for mutual TLS.")
    kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka properties as a JSON object, passed through to every client.",
    )

    # --- Topics and group -------------------------------------------------------------------
    offers_topic: str = Field("offers", description="Input topic of offer messages.")
    categorized_topic: str = Field("offers.categorized", description="Output topic of predictions.")
    dead_letter_topic: str = Field("offers.dlq", description="Topic for rejected messages.")
    consumer_group: str = Field("catstream-preprocess", description="Consumer group of preprocess workers.")
    topic_partitions: int = Field(4, ge=1, description="Partitions used when this node creates a topic.")

    # --- Offer index (catstream index) ------------------------------------------------------------
    matched_topic: str = Field(
        "offers.matched", description="Output topic of the candidate duplicates the index finds for each new offer."
    )
    index_group: str = Field("catstream-index", description="Consumer group of the offer indexer.")
    index_location: str = Field(
        "offer-index",
        description="Where the offer index lives: a directory (embedded Faiss, the default), "
        "qdrant+http(s)://HOST:PORT for a Qdrant cluster, or qdrant:DIRECTORY for Qdrant's local mode.",
    )
    index_save_interval_s: float = Field(
        5.0, gt=0, description="How often the embedded index is saved with its offsets (what a crash re-reads)."
    )
    match_candidates: int = Field(10, ge=1, le=1000, description="Candidate duplicates published per new offer.")
    index_http_port: int = Field(
        8091, ge=0, le=65535, description="Port of the index's query service (/similar, /search, /match); 0 = off."
    )

    # --- Node layout and queue ----------------------------------------------------------------
    preprocess_workers: int = Field(2, ge=1, description="Preprocess processes on this node.")
    slots_per_worker: int = Field(
        64, ge=1, description="Shared-memory queue slots owned by each preprocess worker (queue depth)."
    )
    max_buffered_messages: int = Field(
        4096,
        ge=1,
        description="Consumed offers a worker may hold while its slots are full; then it pauses "
        "its partitions, and resumes at half. Keep it above about two seconds of a worker's "
        "offers: a paused partition's prefetched offers are dropped and fetched again.",
    )
    max_buffered_bytes: int = Field(64_000_000, ge=1024, description="The same bound in bytes of message values.")
    queue_dir: str = Field("/dev/shm", description="Directory of the shared-memory queue file.")

    health_host: str = Field("0.0.0.0", description="Address of the health and metrics HTTP server.")
    health_port: int = Field(
        8080, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics (0 = any free port, logged)."
    )

    # --- Batching and inference ---------------------------------------------------------------
    max_batch_size: int = Field(
        16,
        ge=1,
        description="Flush a batch when it holds this many offers. 16 suits the CPU (measured in bench/README.md); "
        "an accelerator wants larger batches (helm/catstream/ci/gpu-values.yaml).",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, description="Flush a batch this long after its first offer arrived, even if not full."
    )
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads of the inference process.")
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Confidence below which the answer is 'uncertain'; unset uses the bundle's. "
        "Unless parent_threshold is set too, the parent threshold then comes from the bundle's operating point "
        "for this threshold (the one chosen in training for the offers it leaves uncertain).",
    )
    parent_threshold: float | None = Field(
        None,
        ge=0.5,
        le=1,
        description="Probability an uncertain offer's parent category must reach to be named "
        "(summed over the categories under it); unset uses the bundle's.",
    )
    providers: list[str] | None = Field(
        None,
        description="ONNX Runtime providers in order; unset picks CUDA when available, then CPU. "
        'TensorRT is opted into here: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"].',
    )
    pad_batches: bool | None = Field(
        None,
        description="Pad each batch to one of a few sizes (powers of two from 8, and max_batch_size), each run "
        "once before the node reports ready; unset: on an accelerator only (on the CPU padding is work for nothing).",
    )
    cuda_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE",
        description="cuDNN's convolution algorithm search on CUDA: it runs once per batch shape, during the warm-up.",
    )
    engine_cache_dir: str | None = Field(
        None, description="Where TensorRT keeps its built engines, so that a restart does not build them again."
    )
    inference_overlap: bool | None = Field(
        None,
        description="Run the model in a thread of its own, so that deciding for one batch and gathering the next "
        "overlap with its run (measured in bench/inference_loop.py); off: gather, run and decide one after another. "
        "Unset: on an accelerator only (on the CPU the model's own thread is busy with all of it anyway).",
    )
    io_binding: bool | None = Field(
        None,
        description="Bind the model's inputs and outputs to memory allocated once (ONNX Runtime's IOBinding): on an "
        "accelerator a device buffer per input, per padded batch size and per gather buffer set, refilled in place, "
        "and host arrays the outputs land in. Needs padded batches. Unset: on an accelerator only.",
    )
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto",
        description="auto: the bundle's fp16 graph on an accelerator where its fp16 check accepted it "
        "(catstream check-fp16), fp32 otherwise; fp32: always the exported graph; fp16: the checked fp16 graph, "
        "and the node refuses a bundle without one.",
    )

    dictionaries_dir: str | None = Field(
        None,
        description="Serve with the dictionary files in this directory instead of the bundle's (e.g. "
        "reviewed exclusion rules mounted from a ConfigMap).",
    )

    # --- Limits ---------------------------------------------------------------------------------
    max_message_bytes: int = Field(2_000_000, ge=1024, description="Offer messages larger than this are dead-lettered.")
    dead_letter_max_bytes: int = Field(
        900_000,
        ge=4096,
        description="Largest dead letter (value, key and headers): a bigger message is "
        "dead-lettered truncated, with headers giving its original size and SHA-256. Keep it below the "
        "dead-letter topic's max.message.bytes.",
    )
    max_image_bytes: int = Field(10_000_000, ge=1024, description="Images larger than this are not used.")
    max_image_pixels: int = Field(
        40_000_000, ge=1024, description="JPEG images with more pixels are not used (JPEG decodes at a reduced scale)."
    )
    max_image_full_decode_pixels: int = Field(
        4_000_000,
        ge=1024,
        description="Images of every other format (PNG, WebP, ...) with more pixels are not "
        "used: they decode in full, at a cost that grows with their pixels.",
    )

    # --- Images from messages (untrusted) -------------------------------------------------------
    image_timeout_s: float = Field(
        3.0, gt=0, description="Deadline of one image fetch as a whole: DNS, connect, TLS, headers and body."
    )
    image_max_redirects: int = Field(3, ge=0, description="Redirects an image fetch follows (to http(s) only).")
    image_fetch_threads: int = Field(
        64,
        ge=1,
        description="Image URLs a preprocess worker fetches at once, while it goes on consuming "
        "(bounded by its slots too).",
    )
    image_fetch_per_host: int = Field(
        32,
        ge=1,
        description="Of those, at most this many to one host (name and port): a slow host holds up only its "
        "own offers. A marketplace's images mostly come from a few CDN hosts: 4 per host gave 121 offers/s "
        "against a 30 ms host, 32 gave 364 (docs/benchmarks.md).",
    )
    image_allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Image hosts fetched, as a JSON list: "cdn.example.com" or '
        '"*.example.com"; empty: any public host.',
    )
    image_allow_private_hosts: bool = Field(
        False,
        description="Fetch images from loopback, private, link-local and other non-public addresses too "
        "(refused by default, after DNS resolution and on every redirect).",
    )
    image_local_root: str | None = Field(
        None,
        description="Local image paths and file:// URLs in messages are read only under this directory; "
        "unset: never (`catstream produce` inlines local images into the message).",
    )
    max_poll_interval_ms: int = Field(
        300_000, ge=10_000, description="librdkafka max.poll.interval.ms of preprocess consumers."
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often completed offsets are committed.")
    worker_stuck_s: float = Field(
        30.0,
        gt=0,
        description="A preprocess worker on one offer longer than this is killed and restarted; an "
        "offer that wedges a worker twice is dead-lettered with reason 'stuck'. Image fetches run beside "
        "the worker's loop and do not count.",
    )
    model_poll_s: float = Field(
        30.0,
        ge=0,
        description="How often the node looks where --model points for a new model (the registry "
        "alias, or the bundle directory, e.g. a symlink swapped to a new bundle) and switches to it without a "
        "gap; 0 = never.",
    )
    broker_unreachable_exit_s: float = Field(
        60.0,
        gt=0,
        description="With no Kafka broker reachable this long, the node exits non-zero so that the "
        "orchestrator restarts it (readiness turns 503 at once).",
    )
    drain_timeout_s: float = Field(
        8.0, gt=0, description="On SIGTERM, how long in-flight offers may take to finish before exit."
    )

    def image_policy(self) -> ImagePolicy:
        """Where images named by stream messages may come from, and what one may cost."""
        return ImagePolicy(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_full_decode_pixels=self.max_image_full_decode_pixels,
            timeout_s=self.image_timeout_s,
            max_redirects=self.image_max_redirects,
            allowed_hosts=tuple(self.image_allowed_hosts),
            allow_private=self.image_allow_private_hosts,
            local_root=Path(self.image_local_root) if self.image_local_root else None,
        )
