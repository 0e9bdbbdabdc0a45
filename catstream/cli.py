"""The ``catstream`` command (also ``python -m catstream``). Every subcommand is documented in
``--help``, the README's command table and docs/.

Settings come from ``CATSTREAM_*`` environment variables; flags override them. A subcommand
imports only what it needs: ``catstream run`` loads neither torch nor the training stage, and the
training options become flags only for the commands that train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from confluent_kafka import KafkaException
from pydantic import ValidationError

from catstream.options_cli import add_training_options, training_options
from core.bundle import EMBEDDER_DIR
from core.offer_index import IndexUnavailableError
from core.registry import MODEL_NAME, Registry, resolve_model_uri
from core.settings import ENV_PREFIX, Settings

__all__ = ["main"]

log = logging.getLogger("catstream")

# training.splits.PROTOCOLS, spelt out so that parsing the arguments of `run` imports no training module
PROTOCOLS = ("random", "time", "group")
TRAINING_COMMANDS = ("train", "ablation", "tune")


def _env(name: str) -> str:
    return f"(env {ENV_PREFIX}{name.upper()})"


def _threshold(low: float):
    """An argparse type: a threshold in [``low``, 1], with a readable error otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= 1:
            raise argparse.ArgumentTypeError(f"{value:g} is outside [{low:g}, 1]")
        return value

    return parse


def _add_kafka(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help=f"Kafka bootstrap servers {_env('bootstrap_servers')}")


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; the training options are added only when ``command`` trains (or is None:
    everything, for tests and docs), so that other commands do not import the training stage."""
    with_training = command is None or command in TRAINING_COMMANDS
    parser = argparse.ArgumentParser(
        prog="catstream",
        description="Streaming product-category classifier: Kafka → CPU preprocessing → shared-memory "
        "queue → batched ONNX inference → categorized offers.",
        epilog=f"Kafka security, topics, batching and limits are read from {ENV_PREFIX}* environment "
        "variables; see docs/operations/configuration.md.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker until interrupted")
    broker.add_argument("--port", type=int, default=9092, help="loopback port (default 9092; 0 = any free port)")

    synth = commands.add_parser("synth", help="write a synthetic marketplace (offers.csv + images/)")
    synth.add_argument("--out", required=True, type=Path, help="output directory")
    synth.add_argument("--offers", type=int, default=5000, help="number of offers (default 5000)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")

    train = commands.add_parser("train", help="train the fusion model and write a model bundle (tracked in MLflow)")
    train.add_argument("--data", required=True, type=Path, help="offer file (.csv, .jsonl, .parquet) or history store")
    train.add_argument("--out", required=True, type=Path, help="model bundle directory to write")
    if with_training:
        add_training_options(train)
    _add_tracking(train)
    train.add_argument(
        "--register",
        action="store_true",
        help="register the bundle in the MLflow model registry and promote it to 'champion' "
        "if it beats the current champion on the same held-out data",
    )
    train.add_argument("--no-evaluate", action="store_true", help="skip the held-out evaluation after training")
    train.add_argument(
        "--no-fp16-check",
        action="store_true",
        help="do not make the fp16 graph accelerators may serve (see check-fp16; it runs after the evaluation)",
    )

    evaluate = commands.add_parser(
        "evaluate", help="score a model on held-out offers next to the TF-IDF baselines (JSON + Markdown)"
    )
    evaluate.add_argument("--model", required=True, help="bundle directory or models:/NAME@ALIAS")
    evaluate.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    _add_split(evaluate)
    evaluate.add_argument("--out", type=Path, help="report directory (default: <model>/evaluation)")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the TF-IDF + LinearSVC baselines")
    evaluate.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads")
    evaluate.add_argument(
        "--threshold",
        type=_threshold(0.0),
        help="score it served at this leaf threshold instead of the bundle's, as `run --threshold` "
        "would; the parent threshold then comes from the bundle's operating point for it",
    )
    evaluate.add_argument(
        "--parent-threshold",
        type=_threshold(0.5),
        help="score it served at this parent threshold instead of the bundle's",
    )
    _add_tracking(evaluate)

    audit = commands.add_parser(
        "audit",
        help="per-category error audit with SHAP attributions: HTML report + JSON + candidate dictionary entries",
    )
    audit.add_argument("--model", required=True, help="bundle directory or models:/NAME@ALIAS")
    audit.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    audit.add_argument(
        "--out",
        required=True,
        type=Path,
        help="report directory (audit.html, audit.json, candidates/category_exclusions.tsv)",
    )
    audit.add_argument(
        "--split",
        choices=("auto", *PROTOCOLS, "all"),
        default="auto",
        help="auto: the model's own held-out offers when DATA is its training data, else every "
        "labeled offer (default auto)",
    )
    audit.add_argument("--worst", type=int, default=10, help="categories explained in detail, worst first (default 10)")
    audit.add_argument(
        "--category",
        action="append",
        default=[],
        metavar="PATH",
        help="also explain this category in detail, e.g. 'Kids > Apparel > Dresses' (repeatable)",
    )
    audit.add_argument(
        "--samples", type=int, default=6, help="misclassified offers explained per detailed category (default 6)"
    )
    audit.add_argument(
        "--max-evals",
        type=int,
        default=300,
        help="model evaluations per explained offer; more is slower and less noisy (default 300)",
    )
    audit.add_argument("--image-grid", type=int, default=4, help="image regions per side (default 4: 16 regions)")
    audit.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads")
    audit.add_argument("--seed", type=int, default=0, help="sampling and permutation seed (default 0)")
    _add_tracking(audit)

    ablation = commands.add_parser(
        "ablation",
        help="measure each ingredient: title → + mall → + image → + season balance → + cleaning → + dictionary",
    )
    ablation.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    ablation.add_argument("--out", required=True, type=Path, help="report directory")
    if with_training:
        add_training_options(ablation)
    ablation.add_argument(
        "--image-sizes", default="", help="also train the full model at these sizes, e.g. 64,128 (comma-separated)"
    )
    ablation.add_argument(
        "--without-pretrained", action="store_true", help="also train the full model without ImageNet weights"
    )
    ablation.add_argument(
        "--without-char-ngrams",
        action="store_true",
        help="also train the full model without the title's character n-grams",
    )
    ablation.add_argument(
        "--fresh",
        action="store_true",
        help="train every row again; by default a rerun in the same --out reuses the rows an "
        "interrupted run finished with the same settings, data and machine (OUT/work/rows/)",
    )

    tune = commands.add_parser("tune", help="random search over learning rate, fusion width and dropout (MLflow)")
    tune.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    tune.add_argument("--out", required=True, type=Path, help="work directory (tune.json)")
    tune.add_argument("--trials", type=int, default=10, help="number of trials; the first is the defaults (default 10)")
    if with_training:
        add_training_options(tune)
    _add_tracking(tune)

    embedder = commands.add_parser(
        "train-embedder",
        help="train the offer embedder (image, title, fused vectors) on a product split, then evaluate retrieval",
    )
    embedder.add_argument("--data", required=True, type=Path, help="labeled offer file (.csv, .jsonl, .parquet)")
    embedder.add_argument(
        "--model",
        required=True,
        type=Path,
        help="classifier bundle: its tokenizer is read, and the embedder is written into it (<model>/embedder), "
        "attached to its graph so that `catstream run` serves the vectors with the categories",
    )
    embedder.add_argument("--epochs", type=int, default=8, help="passes over the training products (default 8)")
    embedder.add_argument("--dim", type=int, default=128, help="dimension of the image and text spaces (default 128)")
    embedder.add_argument("--seed", type=int, default=0, help="seed of the product split and of training (default 0)")
    embedder.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="PyTorch threads")
    embedder.add_argument("--feature-cache", type=Path, help="where frozen image features are cached")
    embedder.add_argument("--no-evaluate", action="store_true", help="skip the retrieval evaluation after training")
    embedder.add_argument(
        "--no-fp16-check",
        action="store_true",
        help="do not make the fp16 graph of the new served graph (see check-fp16)",
    )

    half = commands.add_parser(
        "check-fp16",
        help="convert the served graph to fp16 and keep it only if it decides as fp32 does on held-out offers",
    )
    half.add_argument("--model", required=True, help="bundle directory or models:/NAME@ALIAS")
    half.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    _add_split(half)
    half.add_argument(
        "--required",
        type=_threshold(0.5),
        default=0.999,
        help="share of offers on which both graphs must give the same answer (default 0.999)",
    )
    half.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ONNX Runtime threads")
    half.add_argument("--tracking-uri", help="MLflow registry for models:/ URIs (env MLFLOW_TRACKING_URI)")

    retrieval = commands.add_parser(
        "evaluate-retrieval",
        help="duplicate matching, similar products and cold-start search on held-out products, against BM25, "
        "TF-IDF and ImageNet baselines",
    )
    retrieval.add_argument("--data", required=True, type=Path, help="labeled offer file (.csv, .jsonl, .parquet)")
    retrieval.add_argument("--model", required=True, type=Path, help="classifier bundle whose tokenizer it reads")
    retrieval.add_argument("--embedder", type=Path, help="embedder directory (default: <model>/embedder)")
    retrieval.add_argument("--queries", type=int, default=3000, help="matching and similar queries (default 3000)")
    retrieval.add_argument("--out", type=Path, help="report directory (default: the embedder directory)")
    retrieval.add_argument("--feature-cache", type=Path, help="where frozen image features are cached")

    history = commands.add_parser("history", help="the labeled-offer history store (Parquet, one partition per month)")
    history_commands = history.add_subparsers(dest="history_command", required=True, metavar="ACTION")
    add = history_commands.add_parser("add", help="append labeled offers from a file")
    add.add_argument("--store", required=True, type=Path, help="history store directory")
    add.add_argument("--data", required=True, type=Path, help="labeled offer file")
    _add_labels(add)
    show = history_commands.add_parser("show", help="offers per listing month")
    show.add_argument("--store", required=True, type=Path, help="history store directory")

    mine = commands.add_parser(
        "mine-exclusions", help="write candidate (keyword → excluded category) rules with evidence, for review"
    )
    mine.add_argument("--data", required=True, type=Path, help="labeled offer file or history store")
    mine.add_argument("--out", required=True, type=Path, help="TSV to write (category_exclusions.tsv format)")
    _add_labels(mine)
    mine.add_argument("--max-depth", type=int, default=1, help="deepest category level a rule may exclude (default 1)")
    mine.add_argument("--min-support", type=int, default=30, help="titles a keyword must occur in (default 30)")
    mine.add_argument(
        "--min-expected",
        type=float,
        default=10.0,
        help="violations expected by chance for a rule to be worth proposing (default 10)",
    )
    mine.add_argument(
        "--max-violation-rate",
        type=float,
        default=0.005,
        help="largest share of the keyword's offers under the excluded branch (default 0.005)",
    )
    mine.add_argument("--dictionaries", type=Path, help="skip rules already here (default: the repo's dictionaries/)")

    promote = commands.add_parser(
        "promote",
        help="compare a registered version with the champion on its held-out "
        "offers and move 'champion' if it is better",
    )
    promote.add_argument("--version", required=True, help="registered model version")
    promote.add_argument("--data", required=True, type=Path, help="the data that version was trained on")
    _add_tracking(promote)

    produce = commands.add_parser("produce", help="publish offers from a file to the offers topic")
    produce.add_argument("--data", required=True, type=Path, help="offer file: .csv, .jsonl or .parquet")
    produce.add_argument("--rate", type=float, help="offers per second (default: as fast as possible)")
    produce.add_argument("--limit", type=int, help="publish at most this many offers")
    _add_kafka(produce)

    run = commands.add_parser("run", help="run preprocess workers and inference on this node until interrupted")
    run.add_argument(
        "--model", required=True, help="model bundle directory, or models:/catstream@champion from the MLflow registry"
    )
    run.add_argument("--preprocess-workers", type=int, help=f"preprocess processes {_env('preprocess_workers')}")
    run.add_argument("--max-batch-size", type=int, help=f"inference batch size {_env('max_batch_size')}")
    run.add_argument("--max-wait-ms", type=float, help=f"batch wait after its first offer {_env('max_wait_ms')}")
    run.add_argument(
        "--threshold",
        type=float,
        help=f"'uncertain' below this confidence {_env('threshold')}; unless --parent-threshold is "
        "given too, the parent threshold comes from the bundle's operating point for it",
    )
    run.add_argument(
        "--parent-threshold",
        type=float,
        help=f"an uncertain offer's parent category is named from this probability {_env('parent_threshold')}",
    )
    run.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16"),
        help="auto: the bundle's checked fp16 graph on an accelerator, fp32 otherwise; fp16: refuse a bundle "
        f"without one {_env('precision')}",
    )
    run.add_argument(
        "--tracking-uri",
        help="MLflow registry for models:/ URIs (env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db)",
    )
    _add_kafka(run)

    index = commands.add_parser(
        "index",
        help="keep the offer index current from the predictions stream and publish candidate duplicates "
        "(offers.matched) until interrupted",
    )
    index.add_argument("--index-location", help=f"index directory or Qdrant URL {_env('index_location')}")
    index.add_argument(
        "--model",
        help="bundle with an embedder, to embed the queries of POST /search and /match (without it they answer 503)",
    )
    index.add_argument("--http-port", type=int, help=f"query service port, 0 = off {_env('index_http_port')}")
    _add_kafka(index)

    query = commands.add_parser(
        "query",
        help="the query service's operations from the command line, on a saved index: similar products, "
        "text search, candidate duplicates (JSON on stdout)",
    )
    query_commands = query.add_subparsers(dest="query_command", required=True, metavar="OPERATION")
    similar = query_commands.add_parser(
        "similar", help="offers like an indexed offer: its leaf first, then sibling leaves, then higher"
    )
    similar.add_argument("offer_id", help="an offer in the index")
    search = query_commands.add_parser("search", help="offers a text finds (needs --model)")
    search.add_argument("text", help='what a shopper would type, e.g. "women black heels"')
    search.add_argument("--category", help="only offers under this category path (a leaf or any ancestor)")
    search.add_argument(
        "--rank-on",
        choices=("text", "image"),
        default="text",
        help="rank on titles (default) or on pictures only, which finds new offers by what they show",
    )
    match = query_commands.add_parser("match", help="candidate duplicates of an offer document (needs --model)")
    match.add_argument("offer", help="a JSON offer document, as published to the offers topic; - reads stdin")
    for operation in (similar, search, match):
        operation.add_argument("-k", "--k", type=int, default=10, help="results wanted, 1..1000 (default 10)")
        operation.add_argument("--index-location", help=f"index directory or Qdrant location {_env('index_location')}")
        operation.add_argument("--model", help="bundle with an embedder, to embed the query (search and match)")
        operation.add_argument(
            "--tracking-uri",
            help="MLflow registry for models:/ URIs (env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db)",
        )

    demo = commands.add_parser("demo", help="synth → train → embedded broker → pipeline → summary")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="work directory (default ./demo-output)")
    demo.add_argument("--offers", type=int, default=3000, help="offers streamed through the pipeline (default 3000)")
    demo.add_argument("--train-offers", type=int, default=4000, help="offers to train on (default 4000)")
    demo.add_argument(
        "--image-size",
        type=int,
        default=96,
        help="model image size for the demo (default 96, so training takes about a minute)",
    )
    demo.add_argument("--preprocess-workers", type=int, default=1, help="preprocess processes (default 1)")
    demo.add_argument(
        "--target-precision",
        type=float,
        default=0.95,
        help="precision the threshold must reach on the validation offers, measured against their "
        "given labels (default 0.95: the synthetic shops mislabel 2-6%% of their offers, so "
        "99.5%%, the default of `train`, is out of reach there)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _add_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label-columns",
        "--label-column",
        default="category",
        help="the column holding the category, or columns joined with ' > ' into a category path, "
        "e.g. gender,master_category,sub_category,article_type (default category)",
    )


def _add_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split",
        choices=("auto", *PROTOCOLS, "all"),
        default="auto",
        help="auto: the model's own held-out split when DATA is its training data, else every offer (default auto)",
    )


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db in the working directory)",
    )
    parser.add_argument("--experiment", default="catstream", help="MLflow experiment name (default catstream)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _label_columns(args: argparse.Namespace) -> list[str]:
    return [column.strip() for column in args.label_columns.split(",") if column.strip()]


def _settings(args: argparse.Namespace, **overrides) -> Settings:
    cli = {
        "bootstrap_servers": getattr(args, "bootstrap_servers", None),
        "preprocess_workers": getattr(args, "preprocess_workers", None),
        "max_batch_size": getattr(args, "max_batch_size", None),
        "max_wait_ms": getattr(args, "max_wait_ms", None),
        "threshold": getattr(args, "threshold", None),
        "parent_threshold": getattr(args, "parent_threshold", None),
        "precision": getattr(args, "precision", None),
    } | overrides
    base = Settings()
    return base.model_copy(update={k: v for k, v in cli.items() if v is not None}) if cli else base


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (after the global ``--log-level``), None if there is none."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except ValidationError as error:
        print(f"catstream: invalid settings: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"catstream {args.command}: {error}", file=sys.stderr)
        return 2
    except (TimeoutError, KafkaException, IndexUnavailableError) as error:
        print(f"catstream {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _cmd_broker(args) -> int:
    from core.broker import EmbeddedBroker

    # The signals that asked to stop. A list, not a threading.Event: a handler calling Event.set()
    # while the main thread holds the Event's lock inside wait() would hang for good.
    requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):  # either stops the broker, then this process
        signal.signal(signum, lambda received, _frame: requested.append(received))
    with EmbeddedBroker(args.port or None) as broker:
        print(f"embedded broker on {broker.bootstrap_servers} (Ctrl-C or SIGTERM to stop)", flush=True)
        while not requested:
            time.sleep(0.5)
            if (code := broker.poll()) is not None:
                print(f"embedded broker exited with code {code}", file=sys.stderr)
                return 1
    return 0


def _cmd_synth(args) -> int:
    from producers.synthetic import write_marketplace

    path = write_marketplace(args.out, offers=args.offers, seed=args.seed)
    print(f"wrote {args.offers} offers to {path}")
    return 0


def _cmd_train(args) -> int:
    from training.pipeline import train_evaluate_register

    options = training_options(args)
    result = train_evaluate_register(
        args.data,
        args.out,
        options,
        evaluate=not args.no_evaluate,
        fp16_check=not args.no_fp16_check,
        register=args.register,
        tracking=None if args.no_tracking else _tracking(args),
    )
    config = result.config
    if result.half_precision is not None:
        print(_half_precision_line(result.half_precision))
    validation, calibration = config.training.validation, config.training.calibration
    held_out = "out-of-fold" if calibration.mode == "crossfit" else "validation"
    print(
        f"model bundle {args.out} (version {config.model_version}) in {config.training.seconds:.0f} s: "
        f"{held_out} accuracy {validation.accuracy:.4f}, threshold {config.threshold:.3f} → coverage "
        f"{validation.coverage:.3f} at precision {validation.precision:.4f} "
        f"(lower bound {validation.precision_bound:.4f})"
    )
    parents = validation.parents
    if parents.target_reached and config.parent_threshold is not None:
        print(
            f"  parent threshold {config.parent_threshold:.3f}: {parents.answered} of {parents.uncertain} "
            f"uncertain offers filed under a parent category at precision {parents.precision:.4f} "
            f"(lower bound {parents.precision_bound:.4f})"
        )
    elif not parents.uncertain:
        print(
            f"  no {held_out} offer is left uncertain, so there is no parent threshold: "
            "the model names no parent category"
        )
    else:
        print(
            f"  no parent threshold reaches the target on the {parents.uncertain} uncertain offers: "
            "the model names no parent category"
        )
    if result.report is not None:
        print(result.report_summary)
    if result.registered is not None:
        print(result.registered)
    return 0


def _tracking(args):
    from training.tracking import Tracking

    return Tracking(getattr(args, "tracking_uri", None), getattr(args, "experiment", "catstream"))


def _cmd_evaluate(args) -> int:
    from training.evaluate import evaluate_bundle, write_report

    model = resolve_model_uri(args.model, registry=Registry(args.tracking_uri))
    report = evaluate_bundle(
        model,
        args.data,
        split=args.split,
        baselines=not args.no_baselines,
        threads=args.threads,
        threshold=args.threshold,
        parent_threshold=args.parent_threshold,
    )
    written = write_report(report, args.out or Path(model) / "evaluation")
    json_path, md_path = written.json, written.markdown
    sections = md_path.read_text().split("\n## ")
    # The summary table, the paired test that says whether the lead over the baselines is real, and
    # what becomes of the offers left uncertain.
    print(
        "\n\n## ".join(
            [sections[0].strip()]
            + [
                section.strip()
                for section in sections[1:]
                if section.startswith(("catstream against", "Uncertain offers"))
            ]
        )
    )
    print(f"\nreport: {md_path} and {json_path}")
    return 0


def _cmd_audit(args) -> int:
    from training.audit import AuditOptions, run_audit, write_audit

    for name, value, least in (
        ("--worst", args.worst, 0),
        ("--samples", args.samples, 1),
        ("--image-grid", args.image_grid, 1),
    ):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    model = resolve_model_uri(args.model, registry=Registry(args.tracking_uri))
    options = AuditOptions(
        split=args.split,
        worst=args.worst,
        categories=tuple(args.category),
        samples_per_category=args.samples,
        max_evals=args.max_evals,
        image_grid=args.image_grid,
        threads=args.threads,
        seed=args.seed,
    )
    report = run_audit(model, args.data, options)
    paths = write_audit(report, args.out)
    s = report.summary
    print(
        f"audited {s['offers']} offers: top-1 accuracy {100 * s['accuracy']:.2f}%, "
        f"uncertain {100 * s['uncertain_rate']:.1f}%, {s['explained_offers']} errors explained in {s['seconds']} s"
    )
    for row in report.categories[:5]:
        print(f"  {100 * row['error_rate']:5.1f}%  {row['category']}  ({row['support']} offers)")
    print(f"report: {paths['html']} (and {paths['json'].name})")
    print(f"candidate dictionary entries for review: {paths['candidates']} ({len(report.candidates)} rules)")
    return 0


def _cmd_ablation(args) -> int:
    from training.ablation import run_ablation, write_ablation

    sizes = [int(v) for v in args.image_sizes.split(",") if v.strip()]
    report = run_ablation(
        args.data,
        args.out / "work",
        training_options(args),
        image_sizes=sizes,
        without_pretrained=args.without_pretrained,
        without_char_ngrams=args.without_char_ngrams,
        fresh=args.fresh,
    )
    json_path, md_path = write_ablation(report, args.out)
    print(md_path.read_text().split("\n## ")[0].strip())
    print(f"\nreport: {md_path} and {json_path}")
    return 0


def _cmd_tune(args) -> int:
    from training.tune import tune

    report = tune(
        args.data,
        args.out,
        training_options(args),
        trials=args.trials,
        tracking=None if args.no_tracking else _tracking(args),
    )
    best = report["best"]
    for trial in report["trials"]:
        print(
            f"trial {trial['trial']:2d}: learning rate {trial['learning_rate']:.2e}, fusion width "
            f"{trial['fusion_hidden']}, dropout {trial['dropout']:.2f} → validation accuracy "
            f"{trial['val_accuracy']:.4f}"
        )
    print(
        f"best: trial {best['trial']} → catstream train ... --learning-rate {best['learning_rate']:.2e} "
        f"--fusion-hidden {best['fusion_hidden']} --dropout {best['dropout']:.2f}"
    )
    return 0


def _cmd_history(args) -> int:
    from training.history import HistoryStore

    store = HistoryStore(args.store)
    if args.history_command == "add":
        from core.offer_files import read_offer_file

        frame = read_offer_file(args.data, label_columns=_label_columns(args))
        written = store.add(frame)
        print(f"added {sum(written.values())} offers to {args.store} in {len(written)} month partitions")
    for month, rows in store.months().items():
        print(f"{month}\t{rows}")
    return 0


def _cmd_mine_exclusions(args) -> int:
    from core.dictionaries import Dictionaries
    from dictionaries import DEFAULT_DIRECTORY
    from training.data import load_labeled
    from training.mining import contradicted_rules, mine_exclusions, write_candidates

    frame = load_labeled(args.data, _label_columns(args))
    frame = frame[frame["label"] != ""]
    candidates = mine_exclusions(
        frame["title"],
        frame["label"],
        max_depth=args.max_depth,
        min_support=args.min_support,
        min_expected=args.min_expected,
        max_violation_rate=args.max_violation_rate,
        known=(known := Dictionaries.load(args.dictionaries or DEFAULT_DIRECTORY)),
    )
    write_candidates(candidates, args.out)
    for rule in contradicted_rules(frame["title"], frame["label"], known, max_violation_rate=args.max_violation_rate):
        print(
            f"existing rule {rule.keyword!r} → not {rule.excluded} is contradicted by {rule.violations} of "
            f"{rule.offers_with_keyword} labeled offers, e.g. {rule.examples[0]!r}: check those labels or drop the rule"
        )
    print(f"wrote {len(candidates)} candidate rules to {args.out}; review them before adding any to dictionaries/")
    for c in candidates[:10]:
        print(
            f"  {c.keyword!r} → not {c.excluded}: {c.violations} of {c.offers_with_keyword} offers, "
            f"{c.expected:g} expected by chance"
        )
    return 0


def _cmd_promote(args) -> int:
    from training.pipeline import compare_with_champion

    tracking = _tracking(args)
    bundle = tracking.download(MODEL_NAME, args.version)
    print(compare_with_champion(tracking, args.version, bundle, args.data))
    return 0


def _cmd_produce(args) -> int:
    from core.kafka import ensure_topics
    from core.offer_files import offers_from_frame, read_offer_file
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
    from catstream.node import Node
    from core.broker import EmbeddedBroker
    from core.bundle import ModelBundle
    from core.kafka import ensure_topics, wait_for_broker
    from core.scoring import check_bundle

    registry = Registry(args.tracking_uri)
    settings = _settings(args)
    # bad input fails here, before any connection: a missing or broken bundle, a failed parity check
    bundle_path = resolve_model_uri(args.model, registry=registry)
    bundle = ModelBundle.load(bundle_path, dictionaries_dir=settings.dictionaries_dir)
    check_bundle(bundle, providers=settings.providers, precision=settings.precision)
    broker = None
    if not settings.bootstrap_servers:
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        print(f"embedded broker on {broker.bootstrap_servers}", flush=True)
    try:
        wait_for_broker(settings)
        ensure_topics(settings)
        node = Node(settings, args.model, log_level=args.log_level.upper(), registry=registry)
        node.install_signal_handlers()
        return node.run()
    finally:
        if broker is not None:
            broker.stop()


def _cmd_index(args) -> int:
    from catstream.query_service import QueryService
    from core.bundle import ModelBundle
    from core.index_location import open_index
    from core.kafka import ensure_topics, wait_for_broker
    from core.scoring import OfferEmbedder
    from retrieval.indexer import OfferIndexer

    settings = _settings(args)
    if args.index_location:
        settings = settings.model_copy(update={"index_location": args.index_location})
    if not settings.bootstrap_servers:
        raise ValueError(
            "catstream index reads the node's predictions: give --bootstrap-servers (or set it in the env)"
        )
    if args.http_port is not None:
        settings = settings.model_copy(update={"index_http_port": args.http_port})
    # Bad input fails here, before any connection: a damaged index, a bundle without an embedder.
    embedder = OfferEmbedder(ModelBundle.load(resolve_model_uri(args.model))) if args.model else None
    location = settings.index_location
    indexer = OfferIndexer(settings, lambda spaces: open_index(location, spaces=spaces))
    wait_for_broker(settings)
    ensure_topics(settings, extra=(settings.matched_topic,))
    indexer.install_signal_handlers()
    service = None
    if settings.index_http_port:
        service = QueryService(
            lambda: indexer.index,
            indexer.lock,
            embedder=embedder,
            indexer_counts=lambda: dict(indexer.counts),
            unavailable=lambda: indexer.unavailable,
            titles=lambda: indexer.titles,
        ).start(settings.health_host, settings.index_http_port)
    print(f"indexing {settings.categorized_topic} into {location}", flush=True)
    try:
        return indexer.run()
    finally:
        if service is not None:
            service.stop()


def _cmd_query(args) -> int:

    from catstream.query_service import QueryService, k_of
    from core.bundle import ModelBundle
    from core.index_location import open_index
    from core.scoring import OfferEmbedder
    from core.title_index import TitleIndex

    location = args.index_location or Settings().index_location
    k = k_of(args.k)
    if args.query_command in ("search", "match") and not args.model:
        raise ValueError(f"query {args.query_command} embeds its query: give --model BUNDLE (one with an embedder)")
    registry = Registry(args.tracking_uri)
    embedder = OfferEmbedder(ModelBundle.load(resolve_model_uri(args.model, registry=registry))) if args.model else None
    index = open_index(location)
    if index is None:
        raise FileNotFoundError(f"no offer index at {location}: run catstream index first, or give --index-location")
    titles = None
    if args.query_command == "match":
        titles = TitleIndex()
        titles.upsert(index.titles())
    service = QueryService(lambda: index, threading.Lock(), embedder=embedder, titles=lambda: titles)
    try:
        if args.query_command == "similar":
            answer = service.similar(args.offer_id, k)
        elif args.query_command == "search":
            answer = service.search({"q": args.text, "k": k, "category": args.category, "rank_on": args.rank_on})
        else:
            raw = sys.stdin.buffer.read() if args.offer == "-" else Path(args.offer).read_bytes()
            answer = service.match(raw, k)
    finally:
        index.close()
    print(json.dumps(answer, indent=1, ensure_ascii=False))
    return 0


def _cmd_demo(args) -> int:
    from catstream.demo import run_demo

    return run_demo(args)


def _cmd_train_embedder(args) -> int:
    from training.embeddings import EmbedderOptions, fit_embedder, prepare_embedding_data, save_embedder

    if args.epochs < 1 or args.dim < 2:
        raise ValueError(f"--epochs must be at least 1 and --dim at least 2, got {args.epochs} and {args.dim}")
    options = EmbedderOptions(epochs=args.epochs, dim=args.dim, seed=args.seed, threads=args.threads)
    data = prepare_embedding_data(args.data, args.model, options=options, feature_cache=args.feature_cache)
    model, history = fit_embedder(data, options)
    from training.embedder_export import write_embedded_model

    out = args.model / EMBEDDER_DIR
    report = _retrieval_report(model, data, queries=3000, seed=args.seed, out=out) if not args.no_evaluate else {}
    save_embedder(model, out, options=options, history=history, report=report, data=data)
    parity = write_embedded_model(args.model, model, out)
    print(
        f"embedder: {out} ({history[-1]['seconds']:.0f} s of training, final loss {history[-1]['loss']:.3f}); "
        f"attached to the classifier graph (largest difference from PyTorch {max(parity.values()):.1e})"
    )
    if not args.no_fp16_check:
        print(_half_precision_line(_check_fp16(args.model, args.data, split="auto", threads=args.threads)))
    return 0


def _check_fp16(model: Path, data: Path, *, split: str, threads: int, required: float = 0.999):
    from core.bundle import ModelBundle
    from training.evaluate import held_out
    from training.half_precision import check_half_precision

    frame, test_rows, _, protocol = held_out(ModelBundle.load(model), data, split=split)
    return check_half_precision(
        model, frame.iloc[test_rows], data=str(data), split=protocol, required=required, threads=threads
    )


def _half_precision_line(record) -> str:
    measured = (
        f"the same answer as fp32 on {record.agreeing:,} of {record.offers:,} held-out offers "
        f"({100 * record.agreement:.3f}%, {100 * record.required:.2f}% required)"
    )
    if record.accepted:
        return f"fp16 graph {record.graph} accepted: {measured}; accelerators serve it (precision auto)"
    return f"fp16 graph refused: {measured}; accelerators serve fp32"


def _cmd_check_fp16(args) -> int:
    model = Path(resolve_model_uri(args.model, registry=Registry(args.tracking_uri)))
    record = _check_fp16(model, args.data, split=args.split, threads=args.threads, required=args.required)
    print(_half_precision_line(record))
    vectors = "" if record.min_vector_cosine is None else f", lowest vector cosine {record.min_vector_cosine:.5f}"
    print(f"  largest confidence difference {record.max_probability_difference:.2e}{vectors}")
    from core.bundle import HALF_PRECISION_FILE, ModelBundle

    bundle = ModelBundle.load(model)
    print(f"  record: {(bundle.embedded_onnx_path or bundle.onnx_path).parent / HALF_PRECISION_FILE}")
    return 0 if record.accepted else 1


def _cmd_evaluate_retrieval(args) -> int:
    from training.embeddings import load_embedder, prepare_embedding_data

    if not 1 <= args.queries <= 100_000:
        raise ValueError(f"--queries must be in 1..100000, got {args.queries}")
    directory = args.embedder or args.model / EMBEDDER_DIR
    model, options = load_embedder(directory)
    data = prepare_embedding_data(args.data, args.model, options=options, feature_cache=args.feature_cache)
    _retrieval_report(model, data, queries=args.queries, seed=options.seed, out=args.out or directory)
    return 0


def _retrieval_report(model, data, *, queries: int, seed: int, out: Path) -> dict:
    from training.retrieval_eval import evaluate_retrieval, format_report

    report = evaluate_retrieval(model, data, max_queries=queries, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    markdown = format_report(report)
    (out / "retrieval-evaluation.md").write_text(markdown)
    (out / "retrieval-evaluation.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    print(markdown)
    print(f"report: {out / 'retrieval-evaluation.md'} and {out / 'retrieval-evaluation.json'}")
    return report.to_dict()


_COMMANDS = {
    "broker": _cmd_broker,
    "check-fp16": _cmd_check_fp16,
    "synth": _cmd_synth,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "audit": _cmd_audit,
    "ablation": _cmd_ablation,
    "tune": _cmd_tune,
    "train-embedder": _cmd_train_embedder,
    "evaluate-retrieval": _cmd_evaluate_retrieval,
    "history": _cmd_history,
    "mine-exclusions": _cmd_mine_exclusions,
    "promote": _cmd_promote,
    "produce": _cmd_produce,
    "run": _cmd_run,
    "index": _cmd_index,
    "query": _cmd_query,
    "demo": _cmd_demo,
}


if __name__ == "__main__":
    sys.exit(main())
