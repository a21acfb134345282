"""``hires train``'s flags are generated from :class:`~hires_lmm.train.TrainConfig` (one definition):
every flag maps to a field, every field is a flag or marked off the command line, and the
parser's defaults are the dataclass's."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from hires_lmm.cli import build_parser
from hires_lmm.train.config import TrainConfig, cli_fields, config_from_args

REQUIRED = ["-m", "llava-1.5", "--data-path", "d.json", "--output-dir", "out"]
#: every flag ``hires train`` had before the flags were generated: none may go
OLD_FLAGS = {"--method", "-m", "--stage", "--tiny", "--vision", "--llm", "--convnext", "--init", "--data-path",
             "--image-folder", "--output-dir", "--template", "--max-steps", "--epochs", "--batch-size", "--grad-accum",
             "--lr", "--warmup-ratio", "--lr-schedule", "--weight-decay", "--max-length", "--seed", "--save-steps",
             "--keep-last", "--resume", "--allow-changed", "--overwrite", "--skip-bad", "--no-group-by-length",
             "--num-workers", "--gradient-checkpointing", "--mixed-precision", "--max-visual-tokens", "--no-progress"}


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def flag_actions() -> list[argparse.Action]:
    return [a for a in train_parser()._actions if not isinstance(a, argparse._HelpAction)]


def test_every_flag_maps_to_a_field_and_every_field_is_a_flag_or_marked_off():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    dests = [a.dest for a in flag_actions()]
    assert len(dests) == len(set(dests)) and set(dests) <= names
    assert set(dests) == {f.name for f in cli_fields()}
    off = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True) is False}
    assert off == names - set(dests) and {"log_steps", "connector"} <= off
    assert all(f.metadata.get("help") for f in cli_fields())  # one help text per flag, on its field
    flags = {s for a in flag_actions() for s in a.option_strings}
    assert OLD_FLAGS <= flags


def test_parser_defaults_are_the_dataclass_defaults():
    args = train_parser().parse_args(REQUIRED)
    for f in cli_fields():
        if f.default is not dataclasses.MISSING:
            assert getattr(args, f.name) == f.default, f.name
    assert config_from_args(args) == TrainConfig(method="llava-1.5", data_path="d.json", output_dir="out")
    required = {a.dest for a in flag_actions() if a.required}
    assert required == {f.name for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING}


def test_flags_parse_to_the_fields_types():
    args = train_parser().parse_args([*REQUIRED, "--allow-changed", "max-steps, epochs", "--no-group-by-length",
                                      "--no-progress", "--tiny", "--max-steps", "3", "--lr", "1e-3",
                                      "--max-visual-tokens", "400", "--lr-schedule", "constant", "--mixed-precision",
                                      "no", "--epochs", "2"])
    cfg = config_from_args(args, connector={"method_spec": {}})
    assert cfg.allow_changed == ("max_steps", "epochs")
    assert (cfg.group_by_length, cfg.progress, cfg.tiny) == (False, False, True)
    assert (cfg.max_steps, cfg.lr, cfg.max_visual_tokens, cfg.epochs) == (3, 1e-3, 400, 2.0)
    assert (cfg.lr_schedule, cfg.mixed_precision, cfg.connector) == ("constant", "no", {"method_spec": {}})


@pytest.mark.parametrize("bad", [["--lr-schedule", "linear"], ["--mixed-precision", "fp8"],
                                 ["--max-visual-tokens", "0"], ["--max-steps", "x"]])
def test_bad_flags_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as e:
        train_parser().parse_args([*REQUIRED, *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


def test_building_the_train_flags_imports_no_torch():
    code = ("import sys; from hires_lmm.cli import build_parser; build_parser().parse_args(['train', '-m', 'slime', "
            "'--data-path', 'd', '--output-dir', 'o']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
