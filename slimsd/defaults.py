"""Per-model generation defaults (steps, guidance), read from the model's own folder.

A step-distilled student is meant to run at 8 steps and the teacher at 25, so the number a
server or a CLI uses when the caller names none belongs to the model, not to the tool.
Looked up, first match wins:

1. ``manifest.json`` top-level ``default_steps`` / ``default_guidance`` (the keys
   ``slimsd export onnx`` already copies into an export's ``pipeline`` section);
2. ``manifest.json`` or ``slimsd.json``: ``{"defaults": {"steps": 8, "guidance": 7.5}}``;
3. an exported folder's ``manifest.json`` ``pipeline.default_steps`` / ``default_guidance``;
4. 25 steps, guidance 7.5 (SD's usual settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class GenerationDefaults:
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    source: str = "built-in"  # where the numbers came from, for logs and /v1/models


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def generation_defaults(folder: str | Path) -> GenerationDefaults:
    """Default steps / guidance of the model in ``folder`` (pipeline or exported folder)."""
    folder = Path(folder)
    for name in ("manifest.json", "slimsd.json"):
        data = _read(folder / name)
        candidates = (
            (data.get("default_steps"), data.get("default_guidance")),
            ((data.get("defaults") or {}).get("steps"), (data.get("defaults") or {}).get("guidance")),
            ((data.get("pipeline") or {}).get("default_steps"), (data.get("pipeline") or {}).get("default_guidance")),
        )
        for steps, guidance in candidates:
            if steps is not None or guidance is not None:
                return GenerationDefaults(int(steps if steps is not None else DEFAULT_STEPS),
                                          float(guidance if guidance is not None else DEFAULT_GUIDANCE),
                                          f"{folder / name}")
    return GenerationDefaults()
