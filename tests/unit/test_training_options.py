"""Training options from one declaration: the flags, ``--config FILE.toml`` and ``--set``."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from catstream.cli import TRAINING_COMMANDS, _build_parser, _command_of
from catstream.options_cli import option_specs, options_table, training_options
from training.options import TrainOptions


def parse(*argv: str):
    argv = ("train", "--data", "d.csv", "--out", "m", *argv)
    return _build_parser(_command_of(list(argv))).parse_args(argv)


def help_of(command: str) -> str:
    parser = _build_parser(command)
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[command].format_help()


def test_defaults_come_from_the_fields():
    options = training_options(parse())
    reference = TrainOptions()
    assert options == reference
    assert options.threads >= 1 and options.dictionaries.endswith("dictionaries")


def test_a_dozen_everyday_flags_and_every_option_settable():
    everyday = [spec for spec in option_specs() if spec.everyday]
    assert 10 <= len(everyday) <= 16
    text = help_of("train")
    for spec in option_specs():
        assert (spec.flag in text) == spec.everyday, spec.name
    assert "--config" in text and "--set" in text
    table = options_table()
    assert all(f"| `{field.name}` |" in table for field in dataclasses.fields(TrainOptions))


def test_flags_config_and_set_in_that_order(tmp_path):
    config = tmp_path / "experiment.toml"
    config.write_text('epochs = 3\nsplit = "group"\nlabel_columns = ["a", "b"]\nlearning_rate = 1\nlexical = false\n')
    options = training_options(
        parse(
            "--config",
            str(config),
            "--epochs",
            "5",
            "--set",
            "fusion_hidden=1024",
            "--set",
            "lexical_weight=none",
            "--set",
            "inputs=title,mall",
        )
    )
    assert (options.epochs, options.split, options.label_columns) == (5, "group", ["a", "b"])
    assert options.learning_rate == 1.0 and isinstance(options.learning_rate, float)
    assert (options.lexical, options.fusion_hidden, options.lexical_weight) == (False, 1024, None)
    assert options.inputs == ("title", "mall")
    assert training_options(parse("--epochs", "5", "--set", "epochs=7")).epochs == 7  # --set comes last
    flags = training_options(parse("--label-column", "category", "--season-balance", "--split", "time"))
    assert (flags.label_columns, flags.season_balance, flags.split) == (["category"], True, "time")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--set", "epoch=3"), "no training option 'epoch'"),
        (("--set", "epochs"), "use NAME=VALUE"),
        (("--set", "epochs=many"), "epochs takes int values"),
        (("--set", "lexical=maybe"), "lexical takes true or false"),
        (("--set", "cleaning=sometimes"), "cleaning must be one of off, drop, relabel"),
        (("--set", "calibration_folds=1"), "calibration_folds must be at least 2"),
    ],
)
def test_bad_options_are_refused_with_a_reason(argv, message):
    with pytest.raises(ValueError, match=message):
        training_options(parse(*argv))


def test_a_bad_config_file_is_refused_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        training_options(parse("--config", str(tmp_path / "none.toml")))
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = \n")
    with pytest.raises(ValueError, match=r"bad\.toml"):
        training_options(parse("--config", str(bad)))
    bad.write_text('epochs = "x"\n')
    with pytest.raises(ValueError, match="epochs takes int values"):
        training_options(parse("--config", str(bad)))
    bad.write_text("colour = 3\n")
    with pytest.raises(ValueError, match="no training option 'colour'"):
        training_options(parse("--config", str(bad)))


def test_only_the_training_commands_get_training_options():
    assert set(TRAINING_COMMANDS) == {"train", "ablation", "tune"}
    assert "--epochs" not in help_of("run") and "--epochs" in help_of("ablation")
    assert _command_of(["--log-level", "DEBUG", "run", "--model", "m"]) == "run"
    assert _command_of(["--help"]) is None
