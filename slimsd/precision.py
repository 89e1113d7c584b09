"""One precision type for export, runners, serve settings and reports.

:data:`Precision` is what a backend computes in: ``f32``, ``bf16`` or ``fp16`` (the names
``/v1/models``, logs and load-test reports print). Two narrower vocabularies of it are what
users type, and each keeps its existing values:

* :data:`ExportDtype` (``--dtype``): what an ONNX export or a torch module *stores* —
  ``float32`` | ``float16`` (the manifest records these names, so caches keep matching);
* :data:`RequestedPrecision` (``--precision``): what a CPU backend is *asked* to compute in —
  ``auto`` | ``bf16`` | ``f32`` | ``int8``; ``auto`` is decided per machine (:func:`slimsd.hardware.cpu_bf16`,
  and for int8 the report of ``slimsd export int8``); ``int8`` is OpenVINO's only.

:func:`precision_of` turns any of those names (or a torch dtype name) into a :data:`Precision`;
:func:`dtype_name` goes back to the torch / numpy dtype name.
"""

from __future__ import annotations

import typing
from typing import Literal

Precision = Literal["f32", "bf16", "fp16", "int8"]
ExportDtype = Literal["float32", "float16"]
RequestedPrecision = Literal["auto", "bf16", "f32", "int8"]

PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
EXPORT_DTYPES: tuple[str, ...] = typing.get_args(ExportDtype)
REQUESTED_PRECISIONS: tuple[str, ...] = typing.get_args(RequestedPrecision)

_DTYPE = {"f32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
_ALIASES = {"f32": "f32", "fp32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", "int8": "int8"}


def precision_of(value: str, field: str = "precision") -> Precision:
    """``f32`` / ``bf16`` / ``fp16`` / ``int8`` for any name of it (``float16``, ``bfloat16``, ``torch.float32``, ...).

    ValueError naming ``field`` for anything else (``auto`` included: resolve it first).
    """
    key = str(value).removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"{field}: must be one of {', '.join(sorted(_ALIASES))}; got {value!r}")
    return _ALIASES[key]  # type: ignore[return-value]


def dtype_name(precision: str) -> str:
    """The torch / numpy dtype name of a precision (any of its names): ``bf16`` -> ``bfloat16``."""
    return _DTYPE[precision_of(precision)]
