"""The scene classifier behind the offline evaluator: five attribute heads and the 128-d FD space.

A small CNN (``SceneClassifier``) trained on rendered scenes of the *training* split
predicts, for an image, the scene it shows: orientation and colour/shape of both objects.
:mod:`slimsd.evaluator` scores generated images with it; ``slimsd evaluator train`` trains it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimsd.data.scenes import COLOUR_NAMES, ORIENTS, SHAPES, SceneDataset, to_tensor

EVALUATOR_DIR = Path(__file__).parent / "assets" / "evaluator"
HEADS = (("orient", len(ORIENTS)), ("colour_a", len(COLOUR_NAMES)), ("shape_a", len(SHAPES)),
         ("colour_b", len(COLOUR_NAMES)), ("shape_b", len(SHAPES)))


class SceneClassifier(nn.Module):
    """64x64 RGB in [-1, 1] (or uint8) -> 5 attribute logits; ``features`` is the 128-d FD space."""

    num_features = 128  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, 32, 2),  # 32x32: objects are 14-20 px, still 7-10 px here
            block(32, 64, 1), block(64, 64, 2),  # 16x16
            block(64, 128, 2),  # 8x8
            block(128, 128, 2),  # 4x4: position is kept (no global pool) - the relation needs it
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(self.num_features, n) for _, n in HEADS)

    @staticmethod
    def _prep(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self._prep(x)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchmetrics calls the feature extractor's forward: return features."""
        return self.features(x)

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [h(f) for h in self.heads]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 5) predicted class indices (orient, cA, sA, cB, sB)."""
        return torch.stack([l.argmax(-1) for l in self.logits(x)], dim=1)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and contrast changes: generated images are softer than renders."""
    n = x.shape[0]
    k = torch.arange(-2, 3, dtype=torch.float32)
    out = []
    for chunk in x.chunk(4):  # one blur strength per quarter batch: sigma in [0, 1.2]
        sigma = float(torch.rand((), generator=g)) * 1.2
        if sigma < 0.2:
            out.append(chunk)
            continue
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = w / w.sum()
        c = F.conv2d(F.pad(chunk, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        out.append(F.conv2d(F.pad(c, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3))
    x = torch.cat(out)
    x = x * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return x.clamp(-1, 1)


def _render_set(split: str, seed: int, n: int):
    ds = SceneDataset(split, seed=seed, length=n)
    samples = [ds[i] for i in range(n)]
    return to_tensor([s.image for s in samples]), torch.tensor([s.scene.labels() for s in samples])


def accuracy(model: SceneClassifier, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    pred = torch.cat([model.predict(x[i : i + 512]) for i in range(0, len(x), 512)])
    ok = pred == y
    per = {name: float(ok[:, j].float().mean()) for j, (name, _) in enumerate(HEADS)}
    return {"per_attribute": per, "min_attribute": min(per.values()), "all_attributes": float(ok.all(1).float().mean())}


def train_evaluator(out: str | Path = EVALUATOR_DIR, steps: int = 1500, batch: int = 64, n_train: int = 30_000,
                    lr: float = 2e-3, seed: int = 0) -> dict:
    """Train the scene classifier on *training-split* renders; report accuracy on held-out scenes."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = _render_set("train", seed + 100, n_train)
    x_test, y_test = _render_set("heldout", seed + 200, 2000)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in (bar := tqdm(range(steps), desc="evaluator", dynamic_ncols=True)):
        idx = torch.randint(n_train, (batch,), generator=g)
        logits = model.logits(_augment(x_train[idx], g))
        loss = sum(F.cross_entropy(l, y_train[idx, j]) for j, l in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    acc = accuracy(model, x_test, y_test)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "model.safetensors")
    manifest = {
        "what": "scene attribute classifier for FD / alignment (slimsd.evaluator)",
        "trained_on": f"{n_train} renders of the training split (seed {seed + 100}), blur/noise/contrast augmentation",
        "steps": steps, "batch": batch, "lr": lr, "seed": seed,
        "heldout_accuracy": acc, "heldout_images": len(x_test),
        "wall_time_s": round(time.time() - t0, 1),
        "command": f"slimsd evaluator train --steps {steps}",
    }
    from slimsd.manifest import write_manifest

    return write_manifest(out, **manifest)


def load_evaluator(path: str | Path = EVALUATOR_DIR) -> SceneClassifier:
    from safetensors.torch import load_file

    from slimsd.manifest import verify_manifest

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"evaluator weights missing: {f} (train them with `slimsd evaluator train`)")
    verify_manifest(Path(path))
    model = SceneClassifier()
    try:
        model.load_state_dict(load_file(f))
    except Exception as e:  # corrupt or foreign file: refuse, name it
        raise ValueError(f"evaluator weights {f} could not be loaded: {e}") from e
    return model.eval()
