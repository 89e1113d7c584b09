"""One way from a settings class to command-line flags: dataclasses and pydantic models alike.

    @dataclass
    class TrainConfig:
        max_steps: int = field(default=1000, metadata={"help": "optimisation steps"})
        mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    add_fields(parser, TrainConfig, required=("student", "out"))
    cfg = TrainConfig(**from_args(TrainConfig, parser.parse_args()))

Rules, the same for every command:

* the flag is the field name with ``-`` for ``_`` (``max_steps`` -> ``--max-steps``), or
  ``metadata={"flag": "--duration"}`` (pydantic: ``json_schema_extra={"flag": ...}``) where
  the field's name carries a unit the flag never had (``duration_s``);
* help is the dataclass field's ``metadata["help"]`` (:func:`option` writes it) or the pydantic field's ``description``,
  and the default is shown;
* ``bool``: default False -> ``--name`` turns it on; default True -> ``--no-name`` turns it off;
* ``Literal[...]`` (or ``metadata={"choices": ...}``) -> ``choices``; ``int`` / ``float``
  (optional or not) -> that type, else str;
* ``list[...]`` -> the flag may be repeated; ``tuple[int, ...]`` -> one comma list of that type.

Why a small helper and not tyro / simple-parsing / jsonargparse: every existing flag keeps its
name and the parsers stay plain argparse sub-commands (``slimsd serve --help`` is unchanged in
shape); those libraries bring their own flag naming and nesting rules and would have renamed
flags users already script against.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default=dataclasses.MISSING, help: str = "", **metadata):
    """A dataclass field with its ``--help`` text (and e.g. ``flag=`` / ``choices=``): ``option(20, "steps")``."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _fields(cls) -> list[tuple[str, typing.Any, typing.Any, str, str | None]]:
    """``(name, annotation, default, help, flag)`` of a dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            ann = hints[f.name]
            if "choices" in f.metadata:  # choices known only at run time (a registry's names)
                ann = typing.Literal[tuple(f.metadata["choices"])]
            out.append((f.name, ann, default, f.metadata.get("help", ""), f.metadata.get("flag")))
        return out
    if hasattr(cls, "model_fields"):  # pydantic v2
        return [(n, f.annotation, f.get_default(call_default_factory=True), f.description or "",
                 (f.json_schema_extra or {}).get("flag") if isinstance(f.json_schema_extra, dict) else None)
                for n, f in cls.model_fields.items()]
    raise TypeError(f"{cls!r} is neither a dataclass nor a pydantic model")


def _strip_optional(ann):
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and args:
        return args[0]
    return ann


def _comma_tuple(item_type):
    def parse(text: str) -> tuple:
        try:
            return tuple(item_type(s.strip()) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"a comma list of {item_type.__name__} expected, got {text!r}") from None

    parse.__name__ = f"comma list of {item_type.__name__}"
    return parse


def add_fields(parser: argparse.ArgumentParser, cls, *, skip: typing.Iterable[str] = (),
               required: typing.Iterable[str] = (), extra_help: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``cls`` (a dataclass or pydantic model) to ``parser``."""
    skip, required, extra_help = set(skip), set(required), extra_help or {}
    for name, ann, default, helptext, flag in _fields(cls):
        if name in skip:
            continue
        flag = flag or "--" + name.replace("_", "-")
        helptext = helptext + extra_help.get(name, "")
        base = _strip_optional(ann)
        if base is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=name, action="store_false",
                                    default=None, help="turn off: " + (helptext or name))
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=helptext)
            continue
        shown = "" if default in (None, [], (), "") or name in required else \
            f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        kw: dict = {"dest": name, "help": helptext + shown}
        if name in required:
            kw["required"] = True
        else:
            kw["default"] = None  # None = "not given": from_args leaves the class default
        origin = typing.get_origin(base)
        if origin is typing.Literal:
            kw["choices"] = typing.get_args(base)
        elif origin is list:
            kw["action"] = "append"
            kw["help"] += "; repeat for several"
        elif origin is tuple:
            kw["type"] = _comma_tuple(typing.get_args(base)[0])
            kw["help"] += " (comma list)"
        else:
            kw["type"] = {int: int, float: float}.get(base, str)
        parser.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, skip: typing.Iterable[str] = ()) -> dict:
    """The fields of ``cls`` that were given on the command line (others keep the class default)."""
    skip = set(skip)
    given = vars(args)
    return {name: given[name] for name, *_ in _fields(cls)
            if name not in skip and name in given and given[name] is not None}
