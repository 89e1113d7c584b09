"""Procedural text-to-image dataset: two coloured shapes and a spatial relation.

Every sample is a 64x64 RGB image rendered from a *scene*::

    scene = (orient, colour_A, shape_A, colour_B, shape_B)
    orient  in {"h", "v"}       # A is left of B ("h") or A is above B ("v")

and a caption in one of four phrasings of that scene, e.g.::

    "a red circle left of a blue square"     (canonical, orient h)
    "a blue square right of a red circle"    (same scene, objects swapped)
    "a red circle above a blue square"       (orient v)

Backgrounds are random grey gradients and object size and position jitter, none of
which is in the caption: the model has to learn what the caption controls and
ignore what it does not, and a few-step sampler loses detail measurably.

Splits are by *attribute combination*: ``HELDOUT_SCENES`` (1/8 of all scenes, chosen
by a fixed hash) never occur in the training split under any phrasing, so held-out
evaluation measures compositional generalisation, not memorisation.

Everything is deterministic in ``(split, seed, index)``.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB; saturated and far apart in RGB so a small VAE keeps them apart
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 190, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 210),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# relation word -> (orient, swapped). swapped: caption names B first.
RELATIONS: dict[str, tuple[str, bool]] = {
    "left of": ("h", False),
    "right of": ("h", True),
    "above": ("v", False),
    "below": ("v", True),
}
ORIENTS: tuple[str, ...] = ("h", "v")
IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # render at 4x and downsample: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """Canonical scene: A is left of (h) / above (v) B."""

    orient: str
    colour_a: str
    shape_a: str
    colour_b: str
    shape_b: str

    def labels(self) -> tuple[int, int, int, int, int]:
        """Class indices for the evaluator heads (orient, cA, sA, cB, sB)."""
        return (
            ORIENTS.index(self.orient),
            COLOUR_NAMES.index(self.colour_a),
            SHAPES.index(self.shape_a),
            COLOUR_NAMES.index(self.colour_b),
            SHAPES.index(self.shape_b),
        )

    @classmethod
    def from_labels(cls, labels) -> "Scene":
        o, ca, sa, cb, sb = (int(x) for x in labels)
        return cls(ORIENTS[o], COLOUR_NAMES[ca], SHAPES[sa], COLOUR_NAMES[cb], SHAPES[sb])

    def caption(self, relation: str | None = None) -> str:
        relation = relation or ("left of" if self.orient == "h" else "above")
        orient, swapped = RELATIONS[relation]
        if orient != self.orient:
            raise ValueError(f"relation {relation!r} does not describe orient {self.orient!r}")
        first, second = (self.colour_a, self.shape_a), (self.colour_b, self.shape_b)
        if swapped:
            first, second = second, first
        return f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"


def parse_caption(caption: str) -> Scene:
    """Inverse of :meth:`Scene.caption` (any of the four phrasings)."""
    words = caption.strip().lower().split()
    for relation, (orient, swapped) in RELATIONS.items():
        rel = relation.split()
        n = len(rel)
        # a C1 S1 <rel> a C2 S2
        if len(words) == 6 + n and words[3 : 3 + n] == rel and words[0] == "a" and words[3 + n] == "a":
            first, second = (words[1], words[2]), (words[4 + n], words[5 + n])
            if first[0] not in COLOURS or second[0] not in COLOURS or first[1] not in SHAPES or second[1] not in SHAPES:
                break
            if swapped:
                first, second = second, first
            return Scene(orient, first[0], first[1], second[0], second[1])
    raise ValueError(f"caption is not in the scene grammar: {caption!r}")


def all_scenes() -> list[Scene]:
    """All 2 x 24 x 23 = 1104 scenes with two different objects."""
    objects = list(itertools.product(COLOUR_NAMES, SHAPES))
    return [
        Scene(o, a[0], a[1], b[0], b[1])
        for o in ORIENTS
        for a in objects
        for b in objects
        if a != b
    ]


def _is_heldout(scene: Scene) -> bool:
    key = "|".join((scene.orient, scene.colour_a, scene.shape_a, scene.colour_b, scene.shape_b))
    return hashlib.sha256(key.encode()).digest()[0] < 32  # 32/256 = 1/8 of scenes


HELDOUT_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if _is_heldout(s))
TRAIN_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if not _is_heldout(s))
SPLITS = {"train": TRAIN_SCENES, "heldout": HELDOUT_SCENES}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.85  # equal area-ish to the circle
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` with random background, sizes and positions drawn from ``rng``."""
    s = size * _SUPERSAMPLE
    # background: linear grey gradient in a random direction, values 25..115
    g0, g1 = rng.uniform(25, 115, size=2)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = np.clip(0.5 + xx * np.cos(ang) + yy * np.sin(ang), 0, 1)
    tint = rng.uniform(-8, 8, size=3)  # a faint colour cast
    bg = (g0 + (g1 - g0) * t)[..., None] + tint
    # the gradient is smooth: compute it at output size, upsample for drawing
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB").resize((s, s), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)

    u = size / 64.0 * _SUPERSAMPLE  # layout is defined on a 64 px canvas
    r_a, r_b = rng.uniform(7, 10, size=2)
    # along the relation axis the centres are >= 20 px apart; across it they differ by
    # <= 14 px, so "left of" and "above" can never describe the same picture
    main_a, main_b = rng.uniform(12, 22), rng.uniform(42, 52)
    cross_a, cross_b = rng.uniform(25, 39, size=2)
    if scene.orient == "h":
        pa, pb = (main_a, cross_a), (main_b, cross_b)
    else:
        pa, pb = (cross_a, main_a), (cross_b, main_b)
    for (cx, cy), r, colour, shape in (
        (pa, r_a, scene.colour_a, scene.shape_a),
        (pb, r_b, scene.colour_b, scene.shape_b),
    ):
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        _draw_shape(draw, shape, cx * u, cy * u, r * u, fill)
    return img.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    scene: Scene


class SceneDataset:
    """Deterministic, indexable text-to-image dataset over one split.

    ``dataset[i]`` is always the same sample for the same ``(split, seed)``; any
    length may be asked for since samples are rendered on demand (~0.3 ms each).
    """

    def __init__(self, split: str = "train", seed: int = 0, length: int = 50_000, size: int = IMAGE_SIZE):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split, self.seed, self.length, self.size = split, seed, length, size
        self.scenes = SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        scene = self.scenes[int(rng.integers(len(self.scenes)))]
        relations = [r for r, (o, _) in RELATIONS.items() if o == scene.orient]
        caption = scene.caption(relations[int(rng.integers(len(relations)))])
        return Sample(render(scene, rng, self.size), caption, scene)


def eval_prompts(num: int, seed: int = 0, split: str = "heldout") -> list[tuple[str, Scene]]:
    """``num`` prompts spread evenly over the split's scenes (deterministic)."""
    scenes = list(SPLITS[split])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scenes))
    out = []
    for i in range(num):
        scene = scenes[int(order[i % len(scenes)])]
        relations = [r for r, (o, _) in RELATIONS.items() if o == scene.orient]
        out.append((scene.caption(relations[int(rng.integers(len(relations)))]), scene))
    return out


def to_tensor(images: list[Image.Image]):
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
