"""The training options (``training.options.TrainOptions``) as command-line flags, a TOML file and
``--set key=value``, all from the one declaration of the fields.

``train``, ``ablation`` and ``tune`` show the everyday options as flags; every option can also
be set from ``--config FILE.toml`` (keys are the option names) or ``--set name=value``. Later
sources win: the defaults, then the file, then the flags, then ``--set``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = ["add_training_options", "option_specs", "options_table", "training_options"]


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One training option as the CLI and the docs see it."""

    name: str
    kind: Any  # int, float, str, bool, list, tuple
    optional: bool  # None is allowed (unset)
    choices: tuple[Any, ...]
    default: Any
    help: str
    everyday: bool
    flag: str
    aliases: tuple[str, ...] = ()

    def parse(self, text: str) -> Any:
        """``text`` (from ``--set`` or a flag) as this option's value; ValueError says what is wrong."""
        text = text.strip()
        if self.optional and text.lower() in ("", "none", "null"):
            return None
        if self.kind is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"{self.name} takes true or false, got {text!r}")
        if self.kind in (list, tuple):
            items = [item.strip() for item in text.split(",") if item.strip()]
            return items if self.kind is list else tuple(items)
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"{self.name} takes {self.kind.__name__} values, got {text!r}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {text!r}")
        return value

    def coerce(self, value: Any) -> Any:
        """A value from a TOML file as this option's value (TOML has its own types)."""
        if isinstance(value, str):
            return self.parse(value)
        if self.kind in (list, tuple) and isinstance(value, list):
            return [str(v) for v in value] if self.kind is list else tuple(str(v) for v in value)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool)):
            return value
        raise ValueError(f"{self.name} takes {self.kind.__name__} values, got {value!r}")

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return "unset"
        if isinstance(self.default, (list, tuple)):
            return ",".join(map(str, self.default))
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


def option_specs() -> list[OptionSpec]:
    """Every training option, in declaration order."""
    from training.options import TrainOptions

    hints = typing.get_type_hints(TrainOptions)
    specs = []
    for field in dataclasses.fields(TrainOptions):
        annotation = hints[field.name]
        args = typing.get_args(annotation)
        optional = (typing.get_origin(annotation) in (typing.Union, types.UnionType)) and type(None) in args
        if optional:
            annotation = next(arg for arg in args if arg is not type(None))
        origin = typing.get_origin(annotation)
        choices: tuple[Any, ...] = ()
        if origin is Literal:
            choices, kind = typing.get_args(annotation), type(typing.get_args(annotation)[0])
        elif origin in (list, tuple):
            kind = origin
        else:
            kind = annotation
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        metadata = field.metadata
        specs.append(
            OptionSpec(
                field.name,
                kind,
                optional,
                choices,
                default,
                metadata.get("help", ""),
                bool(metadata.get("everyday")),
                "--" + field.name.replace("_", "-"),
                tuple(metadata.get("aliases", ())),
            )
        )
    return specs


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The everyday options as flags, plus ``--config`` and ``--set`` for all of them."""
    group = parser.add_argument_group(
        "training options",
        "the everyday ones; every option (the table in "
        "docs/training.md) can be set with --set NAME=VALUE or in --config FILE.toml",
    )
    for spec in option_specs():
        if not spec.everyday:
            continue
        help_text = f"{spec.help} (default {spec.shown_default})"
        if spec.kind is bool:
            action = "store_false" if spec.default else "store_true"
            group.add_argument(
                spec.flag, *spec.aliases, dest=spec.name, action=action, default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                spec.flag,
                *spec.aliases,
                dest=spec.name,
                type=_flag_type(spec),
                default=argparse.SUPPRESS,
                choices=spec.choices or None,
                metavar=None if spec.choices else spec.name.upper(),
                help=help_text,
            )
    group.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="training options from a TOML file, one 'name = value' per option",
    )
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="set_options",
        help="set any training option, e.g. --set lexical=false --set fusion_hidden=1024 (repeatable)",
    )


def _flag_type(spec: OptionSpec):
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = spec.kind.__name__  # argparse names the type in its errors
    return parse


def training_options(args: argparse.Namespace, **overrides: Any):
    """``TrainOptions`` from the defaults, ``--config``, the flags, ``--set`` and then ``overrides``."""
    from training.options import TrainOptions

    specs = {spec.name: spec for spec in option_specs()}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values |= _read_config(args.config, specs)
    values |= {name: getattr(args, name) for name, spec in specs.items() if spec.everyday and hasattr(args, name)}
    for assignment in getattr(args, "set_options", []):
        name, separator, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not separator:
            raise ValueError(f"--set {assignment!r}: use NAME=VALUE")
        if name not in specs:
            raise ValueError(f"--set {assignment!r}: no training option {name!r}; the options are {', '.join(specs)}")
        values[name] = specs[name].parse(text)
    return TrainOptions(**(values | overrides))


def _read_config(path: Path, specs: dict[str, OptionSpec]) -> dict[str, Any]:
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"--config {path}: {error}") from None
    values = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in specs:
            raise ValueError(f"--config {path}: no training option {key!r}; the options are {', '.join(specs)}")
        try:
            values[name] = specs[name].coerce(value)
        except ValueError as error:
            raise ValueError(f"--config {path}: {error}") from None
    return values


def options_table() -> str:
    """Every training option as a Markdown table (docs/training.md is generated from it)."""
    lines = ["| option | flag | default | values | what it does |", "|---|---|---|---|---|"]
    for spec in option_specs():
        flag = f"`{spec.flag}`" if spec.everyday else "–"
        values = " / ".join(f"`{choice}`" for choice in spec.choices) or _kind_name(spec)
        lines.append(f"| `{spec.name}` | {flag} | `{spec.shown_default}` | {values} | {spec.help} |")
    return "\n".join(lines) + "\n"


def _kind_name(spec: OptionSpec) -> str:
    name = {
        int: "integer",
        float: "number",
        str: "text",
        bool: "true / false",
        list: "comma-separated list",
        tuple: "comma-separated list",
    }[spec.kind]
    return name + (", or unset" if spec.optional else "")
