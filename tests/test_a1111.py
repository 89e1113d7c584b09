"""AUTOMATIC1111's API against A1111's own field names (``modules/api/models.py``), progress seen mid-render,
interrupt, and several models in one server (in-process, like tests/test_serve_api.py).

The second model is the committed 8-step student ``tiny-sd-slim`` on the torch backend (no export
step); the first is tiny-sd on ONNX Runtime from test_serve_api's fixture.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from test_serve_api import A1111, GEN, PROMPT, Slow, assert_error, metric, pipe, png, serving  # noqa: F401 - pipe: fixture

SAMPLER_FIELDS = {"name", "aliases", "options"}
SD_MODEL_FIELDS = {"title", "model_name", "hash", "sha256", "filename", "config"}
SCHEDULER_FIELDS = {"name", "label", "aliases", "default_rho", "need_inner_model"}
PROGRESS_FIELDS = {"progress", "eta_relative", "state", "current_image", "textinfo"}
STATE_FIELDS = {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
                "sampling_steps"}


@pytest.fixture(scope="module")
def slim():
    from slimsd.serve.pipeline import load_served_pipeline
    from slimsd.serve.settings import ServeSettings

    return load_served_pipeline(ServeSettings(model="tiny-sd-slim", backend="torch", threads=1))


class HeldAt(Slow):
    """Runners whose U-Net call number ``at`` (0-based, counted over the runner's life) blocks until ``release``."""

    def __init__(self, inner, at: int):
        super().__init__(inner, 0.0)
        self.at, self.calls = at, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def unet(self, *a):
        if self.calls == self.at:
            self.reached.set()
            assert self.release.wait(30), "never released"
        self.calls += 1
        return self.inner.unet(*a)


def test_setup_routes_answer_in_a1111_shapes(pipe):
    with serving(pipe) as c:
        models = c.get("/sdapi/v1/sd-models").json()
        assert len(models) == 1 and set(models[0]) == SD_MODEL_FIELDS
        m = models[0]
        assert m["model_name"] == "tiny-sd" and len(m["hash"]) == 10 and m["sha256"].startswith(m["hash"])
        assert m["title"] == f"tiny-sd [{m['hash']}]" and m["filename"].endswith("tiny-sd")
        opts = c.get("/sdapi/v1/options").json()
        assert opts["sd_model_checkpoint"] == m["title"]
        samplers = c.get("/sdapi/v1/samplers").json()
        assert all(set(s) == SAMPLER_FIELDS for s in samplers)
        assert [s["name"] for s in samplers] == ["DDIM", "Euler", "Euler a", "DPM++ 2M"]
        assert "euler_a" in samplers[2]["aliases"]
        scheds = c.get("/sdapi/v1/schedulers").json()
        assert [set(s) for s in scheds] == [SCHEDULER_FIELDS] and scheds[0]["label"] == "Automatic"
        flags = c.get("/sdapi/v1/cmd-flags").json()
        assert flags["api"] is True and flags["ckpt"] == "tiny-sd"
        idle = c.get("/sdapi/v1/progress").json()
        assert set(idle) == PROGRESS_FIELDS and set(idle["state"]) == STATE_FIELDS
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        # every sampler the list offers renders, under its A1111 name
        for s in samplers:
            r = c.post(A1111, json={"prompt": PROMPT, "steps": 2, "sampler_name": s["name"], "scheduler": "Automatic"})
            assert r.status_code == 200, (s, r.text)
            assert json.loads(r.json()["info"])["sampler_name"] == s["name"]


def test_txt2img_info_and_unsupported_routes(pipe):
    with serving(pipe) as c:
        r = c.post(A1111, json={"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6,
                                "seed": -1, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2,
                                "sampler_name": "DPM++ 2M",
                                "override_settings": {"sd_model_checkpoint": "tiny-sd", "CLIP_stop_at_last_layers": 2}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["images"]) == 4 and isinstance(body["info"], str)
        info = json.loads(body["info"])
        seed = info["seed"]
        assert 0 <= seed < 2**32 and body["parameters"]["seed"] == seed  # -1 = random, the one used reported
        assert info["all_seeds"] == [seed + i for i in range(4)] and info["all_prompts"] == [PROMPT] * 4
        assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["width"], info["height"]) == \
            ("DPM++ 2M", 3, 6, 64, 64)
        assert info["sd_model_name"] == "tiny-sd" and len(info["infotexts"]) == 4
        # the 4th image is its seed's image alone
        alone = c.post(A1111, json={"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6,
                                    "seed": seed + 3, "sampler_name": "DPM++ 2M"}).json()
        assert np.abs(png(alone["images"][0]).astype(int) - png(body["images"][3]).astype(int)).max() <= 1
        err = assert_error(c.post("/sdapi/v1/img2img", json={"init_images": []}), 501, code="unsupported_route")
        assert "POST /sdapi/v1/img2img" in err["message"] and "/sdapi/v1/txt2img" in err["message"]
        assert_error(c.get("/sdapi/v1/upscalers"), 501, code="unsupported_route", contains="/sdapi/v1/upscalers")
        assert_error(c.get(A1111), 405, code="method_not_allowed", contains="POST")
        assert_error(c.post(A1111, json={"prompt": PROMPT, "scheduler": "Karras"}), 400, "scheduler", contains="Automatic")
        assert_error(c.post(A1111, json={"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "sdxl"}}),
                     404, "override_settings.sd_model_checkpoint", "model_not_found", contains="'tiny-sd'")


def test_progress_is_seen_step_by_step_mid_render(pipe):
    held = HeldAt(pipe.runners, at=2)  # blocks in the U-Net call of step 2 (steps 0 and 1 done)
    with serving(replace(pipe, runners=held)) as c, ThreadPoolExecutor(1) as ex:
        fut = ex.submit(c.post, A1111, json={"prompt": PROMPT, "steps": 6, "seed": 1})
        assert held.reached.wait(30)
        p = c.get("/sdapi/v1/progress").json()
        assert set(p) == PROGRESS_FIELDS and set(p["state"]) == STATE_FIELDS
        assert p["state"]["sampling_step"] == 2 and p["state"]["sampling_steps"] == 6
        assert p["progress"] == pytest.approx(2 / 6) and p["eta_relative"] >= 0
        assert p["state"]["job_count"] == 1 and "step 2/6" in p["textinfo"]
        assert png(p["current_image"]).shape == (64, 64, 3)  # the latents so far, decoded
        assert c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
        held.release.set()
        r = fut.result(30)
        assert r.status_code == 200, r.text
        assert c.get("/sdapi/v1/progress").json()["progress"] == 0  # idle again


def test_interrupt_stops_at_the_next_step_and_the_queue_goes_on(pipe):
    held = HeldAt(pipe.runners, at=1)
    with serving(replace(pipe, runners=held)) as c, ThreadPoolExecutor(2) as ex:
        first = ex.submit(c.post, A1111, json={"prompt": PROMPT, "steps": 8, "seed": 1})
        assert held.reached.wait(30)
        second = ex.submit(c.post, GEN, json={"prompt": PROMPT, "num_inference_steps": 3, "seed": 2})  # other key
        t0 = time.monotonic()
        while metric(c, "slimsd_queue_depth") != 1:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        assert c.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True
        held.release.set()
        err = assert_error(first.result(30), 409, code="interrupted")
        assert "interrupted at step 2 of 8" in err["message"]  # step 1 finished, step 2 never ran
        assert second.result(30).status_code == 200
        assert held.calls == 2 + 3  # 2 U-Net calls of the interrupted job, then the queued one's 3
        assert metric(c, "slimsd_rejections_total", {"reason": "interrupted"}) == 1


def _gen(c, model=None, steps=None, seed=0):
    body = {"prompt": PROMPT, "seed": seed, **({"model": model} if model else {}),
            **({"num_inference_steps": steps} if steps else {})}
    r = c.post(GEN, json=body)
    assert r.status_code == 200, r.text
    return png(r.json()["data"][0]["b64_json"]), r.headers


def test_two_models_in_one_server_give_the_images_of_two_single_model_servers(pipe, slim):
    alone = {}
    for name, p in (("tiny-sd", pipe), ("tiny-sd-slim", slim)):
        with serving({name: (lambda p=p: p)}) as c:
            alone[name] = _gen(c, seed=4)
    with serving({"tiny-sd": lambda: pipe, "tiny-sd-slim": lambda: slim}) as c:
        cards = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["default"], m["default_steps"]) for m in cards] == \
            [("tiny-sd", True, 25), ("tiny-sd-slim", False, 8)]
        assert all(isinstance(m["memory_bytes"], int) and m["memory_bytes"] >= 0 for m in cards)
        both = {name: _gen(c, name, seed=4) for name in alone}
        for name in alone:
            assert np.array_equal(both[name][0], alone[name][0]), name
            assert both[name][1]["x-slimsd-model"] == name
        assert both["tiny-sd"][1]["x-slimsd-steps"] == "25" and both["tiny-sd-slim"][1]["x-slimsd-steps"] == "8"
        assert "inference;dur=" in both["tiny-sd-slim"][1]["server-timing"]
        assert not np.array_equal(both["tiny-sd"][0], both["tiny-sd-slim"][0])
        # A1111 picks per request (title or id), and through options for the requests that name none
        titles = {m["model_name"]: m["title"] for m in c.get("/sdapi/v1/sd-models").json()}
        r = c.post(A1111, json={"prompt": PROMPT, "seed": 4, "override_settings": {
            "sd_model_checkpoint": titles["tiny-sd-slim"]}}).json()
        assert np.array_equal(png(r["images"][0]), alone["tiny-sd-slim"][0])
        assert json.loads(r["info"])["steps"] == 8
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny-sd-slim"]}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["tiny-sd-slim"]
        assert np.array_equal(_gen(c, seed=4)[0], alone["tiny-sd-slim"][0])  # the new default
        assert [m["default"] for m in c.get("/v1/models").json()["data"]] == [False, True]
        err = assert_error(c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd-xl"}), 404,
                           "sd_model_checkpoint", "model_not_found")
        assert "'tiny-sd', 'tiny-sd-slim'" in err["message"]
        err = assert_error(c.post(GEN, json={"prompt": PROMPT, "model": "dall-e-3"}), 404, "model", "model_not_found")
        assert err["message"].startswith("model: 'dall-e-3'") and "'tiny-sd', 'tiny-sd-slim'" in err["message"]
        # each model has its own queue and metrics
        assert metric(c, "slimsd_images_total", {"model": "tiny-sd-slim"}) == 3
        assert metric(c, "slimsd_images_total", {"model": "tiny-sd"}) == 1


def test_model_list_is_bounded_and_names_are_unique():
    from pydantic import ValidationError

    from slimsd.serve.app import create_app
    from slimsd.serve.models import check_memory
    from slimsd.serve.settings import ServeSettings

    with pytest.raises(ValidationError, match="3 models given, at most max_models=2"):
        ServeSettings(model="tiny-sd", models=["tiny-sd-slim", "x=tiny-sd"], max_models=2)
    s = ServeSettings(model="tiny-sd", models=["teacher=tiny-sd", "/some/dir=x/y"], model_name="t")
    assert s.served() == [("t", "tiny-sd"), ("teacher", "tiny-sd"), ("/some/dir=x/y", "/some/dir=x/y")]
    with pytest.raises(ValueError, match="same id served twice: tiny-sd"):
        create_app(ServeSettings(model="tiny-sd", models=["tiny-sd"]))
    with pytest.raises(MemoryError, match="'tiny-sd'.*only 1 MiB of memory is available"):
        check_memory("tiny-sd", available=2**20)


def test_serve_cli_takes_several_models():
    from slimsd.cli import build_parser

    a = build_parser().parse_args(["serve", "tiny-sd", "tiny-sd-slim", "--model", "t=tiny-sd", "--max-models", "3"])
    assert a.model == ["tiny-sd", "tiny-sd-slim"] and a.models == ["t=tiny-sd"] and a.max_models == 3
