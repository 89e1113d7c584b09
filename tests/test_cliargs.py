"""slimsd.cliargs: the one way from a settings class (dataclass or pydantic) to CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from slimsd.cliargs import add_fields, from_args


@dataclass
class Cfg:
    student: str = field(default="", metadata={"help": "student folder"})
    max_steps: int = field(default=1000, metadata={"help": "optimisation steps"})
    lr: float | None = None
    mode: Literal["no", "fp16", "bf16"] = "no"
    use_ema: bool = False
    warmup: bool = True
    levels: tuple[int, ...] = (1, 4, 16)
    duration_s: int = field(default=20, metadata={"help": "seconds per level", "flag": "--duration"})


class Settings(BaseModel):
    port: int = Field(8000, description="TCP port")
    precision: Literal["auto", "bf16", "f32"] = Field("auto", description="CPU precision")
    warmup: bool = Field(True, description="one generation before ready")
    models: list[str] = Field(default_factory=list, description="models to serve")


def _parser(cls, **kw):
    p = argparse.ArgumentParser(prog="t")
    add_fields(p, cls, **kw)
    return p


def test_dataclass_flags_types_and_defaults():
    p = _parser(Cfg, required=("student",))
    a = p.parse_args(["--student", "s", "--max-steps", "5", "--lr", "1e-4", "--mode", "bf16", "--use-ema",
                      "--no-warmup", "--levels", "1,2", "--duration", "7"])
    assert from_args(Cfg, a) == {"student": "s", "max_steps": 5, "lr": 1e-4, "mode": "bf16", "use_ema": True,
                                 "warmup": False, "levels": (1, 2), "duration_s": 7}
    # flags not given keep the class default (from_args leaves them out)
    a = p.parse_args(["--student", "s"])
    assert Cfg(**from_args(Cfg, a)) == Cfg(student="s")
    text = p.format_help()
    assert "optimisation steps (default: 1000)" in text and "(default: 1,4,16)" in text
    assert "--duration" in text and "--duration-s" not in text


@pytest.mark.parametrize("argv, message", [
    (["--mode", "fp8"], "invalid choice"),
    (["--levels", "1,x"], "comma list of int"),
    (["--max-steps", "many"], "invalid int"),
    ([], "required: --student"),
])
def test_bad_values_name_the_flag(argv, message, capsys):
    p = _parser(Cfg, required=("student",))
    with pytest.raises(SystemExit):
        p.parse_args((["--student", "s"] if "--student" not in message else []) + argv)
    assert message in capsys.readouterr().err


def test_pydantic_settings_use_the_same_rules():
    p = _parser(Settings, skip=("models",))
    a = p.parse_args(["--port", "9000", "--no-warmup", "--precision", "bf16"])
    assert from_args(Settings, a) == {"port": 9000, "warmup": False, "precision": "bf16"}
    assert "TCP port (default: 8000)" in p.format_help() and "--models" not in p.format_help()
    p = _parser(Settings)
    assert from_args(Settings, p.parse_args(["--models", "a", "--models", "b"]))["models"] == ["a", "b"]


def test_the_real_commands_keep_their_flags():
    from slimsd.cli import build_parser

    def flags(command, *sub):
        p = build_parser(command)
        for name in (command, *sub):
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        return {s for a in p._actions for s in a.option_strings}

    assert {"--max-steps", "--learning-rate", "--mixed-precision", "--use-ema", "--resume-from-checkpoint",
            "--lambda-cfg-kd", "--student", "--out"} <= flags("compress", "train")
    assert {"--backend", "--precision", "--threads", "--no-openvino-cache", "--no-warmup", "--port"} <= flags("serve")
    assert {"--out", "--baseline", "--baseline-steps", "--compressed", "--compressed-steps", "--prune-preset",
            "--backend", "--threads", "--device", "--levels", "--duration", "--short", "--guidance", "--size",
            "--images-per-request", "--prompts", "--max-batch-size", "--one-server", "--no-warmup",
            "--ready-timeout"} <= flags("loadtest", "compare")
    assert {"--out", "--steps", "--num-prompts", "--blocks", "--metrics"} <= flags("compress", "sensitivity")
    assert {"--vae-steps", "--unet-steps", "--no-evaluate", "--caption-dropout"} <= flags("train-teacher")
