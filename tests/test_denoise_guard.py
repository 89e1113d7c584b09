"""slimsd.denoise.generate refuses to return a wrong picture: NaN/inf from any runner, or a
blank decode (what a corrupt compiled-model cache gave in issue #12), is a GenerationError."""

from __future__ import annotations

import numpy as np
import pytest

from slimsd.denoise import GenerationError, generate, load_scheduler, load_tokenizer
from slimsd.models import TINY_SD_DIR


class Runners:
    def __init__(self, bad: str | None = None, blank: bool = False):
        self.bad, self.blank = bad, blank

    def _out(self, name, arr):
        if self.bad == name:
            arr = arr.copy()
            arr.flat[3] = np.nan
        return arr

    def text_encoder(self, ids):
        return self._out("text_encoder", np.random.default_rng(0).standard_normal((ids.shape[0], 77, 128), np.float32))

    def unet(self, sample, t, emb):
        return self._out("unet", 0.1 * sample)

    def vae_decoder(self, z):
        n, _, h, w = z.shape
        img = np.broadcast_to(np.linspace(-1, 1, w * 8, dtype=np.float32), (n, 3, h * 8, w * 8)).copy()
        return self._out("vae_decoder", np.zeros_like(img) if self.blank else img)


def _gen(runners):
    tok = load_tokenizer(TINY_SD_DIR / "tokenizer")
    sched = load_scheduler(TINY_SD_DIR / "scheduler")
    return generate(runners, tok, sched, ["a red circle left of a blue square"] * 2, steps=2, seeds=0,
                    height=64, width=64, vae_scaling_factor=1.0)


def test_a_good_run_returns_images():
    assert _gen(Runners()).shape == (2, 64, 64, 3)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_non_finite_values_are_an_error_naming_the_component(component):
    with pytest.raises(GenerationError, match=f"{component} returned 1 non-finite"):
        _gen(Runners(bad=component))


def test_a_blank_decode_is_an_error_not_a_black_image():
    with pytest.raises(GenerationError, match="blank image"):
        _gen(Runners(blank=True))
