"""The ``catstream`` command. Every subcommand is documented in ``--help`` and the README.

Settings come from ``CATSTREAM_*`` environment variables; flags override them. Heavy imports
(torch) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from confluent_kafka import KafkaException
from pydantic import ValidationError

from catstream.settings import ENV_PREFIX, Settings

__all__ = ["main"]

log = logging.getLogger("catstream")


def _env(name: str) -> str:
    return f"(env {ENV_PREFIX}{name.upper()})"


def _add_kafka(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help=f"Kafka bootstrap servers {_env('bootstrap_servers')}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catstream",
        description="Streaming product-category classifier: Kafka → CPU preprocessing → shared-memory "
        "queue → batched ONNX inference → categorized offers.",
        epilog=f"Kafka security, topics, batching and limits are read from {ENV_PREFIX}* environment "
        "variables; see README.md, 'Configuration'.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker until interrupted")
    broker.add_argument("--port", type=int, default=9092, help="loopback port (default 9092; 0 = any free port)")

    synth = commands.add_parser("synth", help="write a synthetic marketplace (offers.csv + images/)")
    synth.add_argument("--out", required=True, type=Path, help="output directory")
    synth.add_argument("--offers", type=int, default=5000, help="number of offers (default 5000)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")

    train = commands.add_parser("train", help="train the fusion model and write a model bundle")
    train.add_argument("--data", required=True, type=Path, help="offer file: .csv, .jsonl or .parquet")
    train.add_argument("--out", required=True, type=Path, help="model bundle directory to write")
    _add_labels(train)
    train.add_argument("--image-size", type=int, default=224, help="model image input size in pixels (default 224)")
    train.add_argument("--vocab-size", type=int, default=20_000, help="SentencePiece pieces (default 20000)")
    train.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    train.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    train.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    train.add_argument("--min-label-count", type=int, default=5,
                       help="categories with fewer offers are excluded from the label set (default 5)")
    train.add_argument("--target-precision", type=float, default=0.98,
                       help="precision the 'uncertain' threshold must reach on validation data (default 0.98)")
    train.add_argument("--dictionaries", type=Path, help="dictionary directory (default: the repo's dictionaries/)")
    train.add_argument("--pretrained", type=Path, help="ImageNet MobileNetV2 weights file (default: torch hub cache)")
    train.add_argument("--no-pretrained", action="store_true", help="random image-branch initialisation")
    train.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="PyTorch threads (default: all cores)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    produce = commands.add_parser("produce", help="publish offers from a file to the offers topic")
    produce.add_argument("--data", required=True, type=Path, help="offer file: .csv, .jsonl or .parquet")
    produce.add_argument("--rate", type=float, help="offers per second (default: as fast as possible)")
    produce.add_argument("--limit", type=int, help="publish at most this many offers")
    _add_kafka(produce)

    run = commands.add_parser("run", help="run preprocess workers and inference on this node until interrupted")
    run.add_argument("--model", required=True, type=Path, help="model bundle directory")
    run.add_argument("--preprocess-workers", type=int, help=f"preprocess processes {_env('preprocess_workers')}")
    run.add_argument("--max-batch-size", type=int, help=f"inference batch size {_env('max_batch_size')}")
    run.add_argument("--max-wait-ms", type=float, help=f"batch wait after its first offer {_env('max_wait_ms')}")
    run.add_argument("--threshold", type=float, help=f"'uncertain' below this confidence {_env('threshold')}")
    _add_kafka(run)

    demo = commands.add_parser("demo", help="synth → train → embedded broker → pipeline → summary")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="work directory (default ./demo-output)")
    demo.add_argument("--offers", type=int, default=3000, help="offers streamed through the pipeline (default 3000)")
    demo.add_argument("--train-offers", type=int, default=4000, help="offers to train on (default 4000)")
    demo.add_argument("--image-size", type=int, default=96,
                      help="model image size for the demo (default 96, so training takes about a minute)")
    demo.add_argument("--preprocess-workers", type=int, default=1, help="preprocess processes (default 1)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _add_labels(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--label-column", help="the column holding the category (default: category)")
    group.add_argument("--label-columns", help="columns joined with ' > ' into a category path, e.g. "
                       "gender,master_category,sub_category,article_type")


def _label_columns(args: argparse.Namespace) -> list[str]:
    if args.label_columns:
        return [c.strip() for c in args.label_columns.split(",") if c.strip()]
    return [args.label_column or "category"]


def _settings(args: argparse.Namespace, **overrides) -> Settings:
    cli = {
        "bootstrap_servers": getattr(args, "bootstrap_servers", None),
        "preprocess_workers": getattr(args, "preprocess_workers", None),
        "max_batch_size": getattr(args, "max_batch_size", None),
        "max_wait_ms": getattr(args, "max_wait_ms", None),
        "threshold": getattr(args, "threshold", None),
    } | overrides
    base = Settings()
    return base.model_copy(update={k: v for k, v in cli.items() if v is not None}) if cli else base


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except ValidationError as error:
        print(f"catstream: invalid settings: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"catstream {args.command}: {error}", file=sys.stderr)
        return 2
    except (TimeoutError, KafkaException) as error:
        print(f"catstream {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _cmd_broker(args) -> int:
    from catstream.broker import EmbeddedBroker

    with EmbeddedBroker(args.port or None) as broker:
        print(f"embedded broker on {broker.bootstrap_servers} (Ctrl-C to stop)", flush=True)
        try:
            code = broker.wait()
            print(f"embedded broker exited with code {code}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_synth(args) -> int:
    from producers.synthetic import write_marketplace

    path = write_marketplace(args.out, offers=args.offers, seed=args.seed)
    print(f"wrote {args.offers} offers to {path}")
    return 0


def _cmd_train(args) -> int:
    from training.train import DEFAULT_DICTIONARIES, TrainOptions, train_bundle

    options = TrainOptions(
        label_columns=_label_columns(args),
        image_size=args.image_size,
        vocab_size=args.vocab_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        min_label_count=args.min_label_count,
        target_precision=args.target_precision,
        dictionaries=str(args.dictionaries or DEFAULT_DICTIONARIES),
        pretrained=str(args.pretrained) if args.pretrained else None,
        use_pretrained=not args.no_pretrained,
        threads=args.threads,
        seed=args.seed,
    )
    config = train_bundle(args.data, args.out, options)
    validation = config["training"]["validation"]
    print(f"model bundle {args.out} (version {config['model_version']}): validation accuracy "
          f"{validation['accuracy']:.4f}, threshold {config['threshold']:.3f} → coverage "
          f"{validation['coverage']:.3f} at precision {validation['precision']:.4f}")
    return 0


def _cmd_produce(args) -> int:
    from catstream.kafka import ensure_topics
    from catstream.offer_files import offers_from_frame, read_offer_file
    from producers.publish import publish_offers

    settings = _settings(args)
    if not settings.bootstrap_servers:
        raise ValueError(f"no broker given: pass --bootstrap-servers or set {ENV_PREFIX}BOOTSTRAP_SERVERS")
    frame = read_offer_file(args.data)
    if args.limit:
        frame = frame.head(args.limit)
    ensure_topics(settings)
    delivered = publish_offers(offers_from_frame(frame), settings, rate=args.rate, total=len(frame))
    print(f"published {delivered} offers to {settings.offers_topic}")
    return 0


def _cmd_run(args) -> int:
    from catstream.broker import EmbeddedBroker
    from catstream.kafka import ensure_topics, wait_for_broker
    from catstream.node import Node

    from catstream.bundle import ModelBundle

    ModelBundle.load(args.model)  # a bad bundle fails here, before any connection is made
    settings = _settings(args)
    broker = None
    if not settings.bootstrap_servers:
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        print(f"embedded broker on {broker.bootstrap_servers}", flush=True)
    try:
        wait_for_broker(settings)
        ensure_topics(settings)
        node = Node(settings, args.model, log_level=args.log_level.upper())
        node.install_signal_handlers()
        return node.run()
    finally:
        if broker is not None:
            broker.stop()


def _cmd_demo(args) -> int:
    from catstream.demo import run_demo

    return run_demo(args)


_COMMANDS = {
    "broker": _cmd_broker,
    "synth": _cmd_synth,
    "train": _cmd_train,
    "produce": _cmd_produce,
    "run": _cmd_run,
    "demo": _cmd_demo,
}


if __name__ == "__main__":
    sys.exit(main())
