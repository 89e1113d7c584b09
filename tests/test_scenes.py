import numpy as np
import pytest

from slimsd.data.scenes import (
    HELDOUT_SCENES, RELATIONS, TRAIN_SCENES, Scene, SceneDataset, all_scenes, eval_prompts, parse_caption, render,
)


def test_splits_partition_scenes_and_heldout_never_in_training():
    assert set(TRAIN_SCENES).isdisjoint(HELDOUT_SCENES)
    assert set(TRAIN_SCENES) | set(HELDOUT_SCENES) == set(all_scenes())
    assert 0.08 < len(HELDOUT_SCENES) / len(all_scenes()) < 0.18
    ds = SceneDataset("train", seed=3, length=3000)
    seen = {ds[i].scene for i in range(3000)}
    assert not seen & set(HELDOUT_SCENES)  # under any phrasing: scenes are canonical


def test_every_object_of_heldout_scenes_appears_in_training():
    # held-out = unseen *combinations*, not unseen words
    train_objects = {(s.colour_a, s.shape_a) for s in TRAIN_SCENES} | {(s.colour_b, s.shape_b) for s in TRAIN_SCENES}
    for s in HELDOUT_SCENES:
        assert (s.colour_a, s.shape_a) in train_objects and (s.colour_b, s.shape_b) in train_objects


def test_deterministic_by_seed_and_index():
    a, b, c = SceneDataset("train", seed=1), SceneDataset("train", seed=1), SceneDataset("train", seed=2)
    assert a[5].caption == b[5].caption
    assert np.array_equal(np.asarray(a[5].image), np.asarray(b[5].image))
    assert any(a[i].caption != c[i].caption for i in range(10))
    assert a[0].image.size == (64, 64) and a[0].image.mode == "RGB"


@pytest.mark.parametrize("relation", list(RELATIONS))
def test_caption_round_trip_all_phrasings(relation):
    orient = RELATIONS[relation][0]
    scene = Scene(orient, "red", "circle", "blue", "square")
    assert parse_caption(scene.caption(relation)) == scene


def test_swapped_phrasing_names_b_first():
    s = Scene("h", "red", "circle", "blue", "square")
    assert s.caption("right of") == "a blue square right of a red circle"
    with pytest.raises(ValueError, match="does not describe"):
        s.caption("above")
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a dog on a sofa")


def test_render_puts_object_a_left_of_b():
    rng = np.random.default_rng(0)
    img = np.asarray(render(Scene("h", "red", "square", "blue", "square"), rng)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    assert red.sum() > 50 and blue.sum() > 50
    assert np.nonzero(red)[1].mean() < np.nonzero(blue)[1].mean()


def test_eval_prompts_are_heldout_and_cover_scenes():
    pairs = eval_prompts(256, seed=0)
    assert len(pairs) == 256
    assert all(parse_caption(p) == s and s in HELDOUT_SCENES for p, s in pairs)
    assert len({s for _, s in pairs}) == len(HELDOUT_SCENES)  # 256 >= 135: every held-out scene is asked


@pytest.mark.parametrize("orient", ["h", "v"])
def test_relation_is_never_ambiguous(orient):
    """Along the relation axis objects are further apart than across it, in every render."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        img = np.asarray(render(Scene(orient, "red", "circle", "blue", "circle"), rng)).astype(int)
        red = np.argwhere((img[..., 0] > 150) & (img[..., 2] < 100)).mean(0)  # (y, x)
        blue = np.argwhere((img[..., 2] > 150) & (img[..., 0] < 100)).mean(0)
        d_main, d_cross = (blue - red)[::-1] if orient == "h" else (blue - red)
        assert d_main > 15 and abs(d_cross) < d_main - 5
