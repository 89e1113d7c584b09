"""The evaluator must tell right images from wrong ones, or FD / alignment mean nothing."""

import numpy as np
import pytest
import torch

from slimsd.data.scenes import Scene, eval_prompts, render, to_tensor
from slimsd.evaluator import EVALUATOR_DIR, accuracy, load_evaluator, score_scene_images


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_evaluator_is_accurate_on_heldout_renders(evaluator):
    rng = np.random.default_rng(123)
    pairs = eval_prompts(400, seed=7)
    x = to_tensor([render(s, rng) for _, s in pairs])
    y = torch.tensor([s.labels() for _, s in pairs])
    acc = accuracy(evaluator, x, y)
    assert acc["min_attribute"] >= 0.99, acc


def test_fd_and_alignment_separate_right_from_wrong_images(evaluator):
    pairs = eval_prompts(256, seed=1)
    prompts = [p for p, _ in pairs]
    rng = np.random.default_rng(5)
    right = [render(s, rng) for _, s in pairs]
    # wrong: the objects swapped (same colours and shapes, wrong relation)
    wrong = [render(Scene(s.orient, s.colour_b, s.shape_b, s.colour_a, s.shape_a), rng) for _, s in pairs]
    blurred = [im.resize((16, 16)).resize((64, 64)) for im in right]
    r_right = score_scene_images(right, prompts, evaluator=evaluator)
    r_wrong = score_scene_images(wrong, prompts, evaluator=evaluator)
    r_blur = score_scene_images(blurred, prompts, evaluator=evaluator)
    assert r_right["alignment"] >= 0.97
    assert r_wrong["alignment"] <= 0.05
    assert r_right["fd"] < r_blur["fd"]  # FD sees quality, not only content
    assert r_right["fd"] < 0.5 * r_wrong["fd"] or r_right["fd"] < r_wrong["fd"] - 1.0


def test_corrupt_evaluator_weights_are_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_evaluator(tmp_path)
    with pytest.raises(FileNotFoundError, match="evaluator weights missing"):
        load_evaluator(tmp_path / "nothing")


def test_evaluator_manifest_records_heldout_accuracy(evaluator):
    """The manifest's held-out accuracy is what the committed weights score on the recorded
    protocol (train_evaluator's held-out set: seed + 200, ``heldout_images`` renders), recomputed."""
    from slimsd.evaluator import _render_set
    from slimsd.manifest import verify_manifest

    m = verify_manifest(EVALUATOR_DIR)  # the weights are the ones the manifest describes
    x, y = _render_set("heldout", m["seed"] + 200, m["heldout_images"])
    acc = accuracy(evaluator, x, y)
    want = m["heldout_accuracy"]
    assert acc["per_attribute"] == pytest.approx(want["per_attribute"], abs=1e-9)
    assert acc["all_attributes"] == pytest.approx(want["all_attributes"], abs=1e-9)
    assert acc["min_attribute"] >= 0.99
