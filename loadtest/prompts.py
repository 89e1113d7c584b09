"""Prompt files for load tests: held-out scene prompts by default."""

from __future__ import annotations

from pathlib import Path


def heldout_prompts(num: int = 64, seed: int = 0) -> list[str]:
    """``num`` captions of held-out scenes (attribute combinations never seen in training)."""
    from slimsd.data.scenes import eval_prompts

    return [caption for caption, _ in eval_prompts(num, seed=seed, split="heldout")]


def write_prompts(path: str | Path, num: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(heldout_prompts(num, seed)) + "\n")
    return path
