"""Issue 23: the trainer's settings are one frozen, typed dataclass; the flag parser is generated
from its fields (with the seed aliases), and a config file and key=value overrides set the same fields."""
import argparse
import dataclasses
import typing

import pytest

import train.config as config_module
from train.args import build_parser, parse_args
from train.config import TrainConfig, settings

BASE = ["--mixture", "L", "--model_config", "C", "--output_dir", "O", "--max_steps", "10"]


def test_every_setting_is_typed_documented_and_a_flag():
    hints = typing.get_type_hints(TrainConfig, vars(config_module))
    actions = {a.dest: a for a in build_parser()._actions}
    for f in settings():
        assert f.metadata["help"], f"{f.name}: no help"
        assert f.name in hints and hints[f.name] is not typing.Any, f.name
        if f.metadata["cli"]:
            a = actions[f.name]  # the parser's action for this field, under every name it answers to
            assert a.option_strings == list(f.metadata["flags"] or (f"--{f.name}",))
            if f.metadata["choices"]:
                assert tuple(a.choices) == f.metadata["choices"]
        else:
            assert f.name not in actions, f"{f.name} is config-file only"


def test_seed_aliases_set_the_same_field():
    for alias, name, value in (("--model_max_length", "max_seq_length", 256), ("--max-length", "max_seq_length", 256),
                               ("--trainable", "lora_target_modules", "q_proj"),
                               ("--evaluation_strategy", "eval_strategy", "no"),
                               ("--tokenizer", "tokenizer_name_or_path", "T")):
        c = parse_args(BASE + [alias, str(value)])
        assert getattr(c, name) == value and name in c.explicit


def test_frozen_typed_and_round_trips():
    c = parse_args(BASE + ["--learning_rate", "3e-4", "--bf16"])
    assert TrainConfig(**c.as_dict()) == c
    assert c.replace(max_steps=5).max_steps == 5 and c.max_steps == 10
    with pytest.raises(dataclasses.FrozenInstanceError, match="frozen"):
        c.max_steps = 1
    assert c.explicit == {"mixture", "model_config", "output_dir", "max_steps", "learning_rate", "bf16"}
    assert isinstance(c.learning_rate, float) and c.bf16 is True and c.packing == "packed"  # field default


def test_config_file_and_key_value_are_the_same_view(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("model_name_or_path: M\ndataset: d\noutput_dir: o\nlearning_rate: 1.0e-4\ncutoff_len: 512\n"
                 "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  min_lr: 1.0e-6\n")
    b = tmp_path / "b.yaml"
    b.write_text("model_name_or_path: M\n")
    from_file = parse_args([str(a)])
    from_overrides = parse_args([str(b), "dataset=d", "output_dir=o", "learning_rate=1e-4", "cutoff_len=512",
                                 "lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs.min_lr=1e-6"])
    strip = lambda c: {k: v for k, v in c.as_dict().items() if k not in ("notes",)}  # noqa: E731
    assert strip(from_file) == strip(from_overrides)
    assert from_file.min_lr == 1e-6 and from_file.max_seq_length == 512


def test_help_lists_every_flag_once():
    text = build_parser().format_help()
    assert "--lora_target_modules LORA_TARGET_MODULES, --trainable" in text
    assert isinstance(build_parser(), argparse.ArgumentParser) and not build_parser().allow_abbrev
