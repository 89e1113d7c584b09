"""Locust load test of ``slimsd serve``: users posting to ``POST /v1/images/generations``.

    slimsd serve tiny-sd --port 8000 &
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 4 -t 30s \
        --csv runs/lt/tiny-sd --steps 25 --guidance 7.5
    # installed: locust -f "$(python -c 'import slimsd.loadtest as m; print(m.LOCUSTFILE)')" ...

Each user is a closed loop: it sends the next request as soon as the previous one is answered
(``--think-time`` adds a pause), so ``-u N`` keeps N requests in flight. Prompts are taken in
turn from ``--prompts-file`` (one per line; default: held-out scene prompts of
:func:`slimsd.data.scenes.eval_prompts`, written to a file first); seeds count up from
``--seed`` so every run sends the same requests.

Settings: locust custom arguments, each defaulting to an environment variable (so
``slimsd loadtest compare`` and CI can set them without a command line):

=========================  =========================  =============================================
argument                   variable                   meaning (default)
=========================  =========================  =============================================
``--prompts-file``         ``SLIMSD_LT_PROMPTS``      one prompt per line (held-out scene prompts)
``--size``                 ``SLIMSD_LT_SIZE``         ``"WxH"`` (empty: the model's native size)
``--steps``                ``SLIMSD_LT_STEPS``        ``num_inference_steps`` (empty: the model's default)
``--guidance``             ``SLIMSD_LT_GUIDANCE``     ``guidance_scale`` (empty: the model's default)
``--images-per-request``   ``SLIMSD_LT_N``            ``n`` (1)
``--scheduler``            ``SLIMSD_LT_SCHEDULER``    ddim | euler | euler_a | dpm++ (empty: server default)
``--model``                ``SLIMSD_LT_MODEL``        the served model's id (empty: the server's default)
``--seed``                 ``SLIMSD_LT_SEED``         first seed (0)
``--think-time``           ``SLIMSD_LT_THINK_TIME``   seconds each user waits between requests (0)
``--request-timeout``      ``SLIMSD_LT_TIMEOUT``      client timeout in seconds (600)
``--summary-json``         ``SLIMSD_LT_SUMMARY``      also write the summary below as JSON here
``--api-key``              ``SLIMSD_API_KEY``         Bearer key when the server has one
=========================  =========================  =============================================

At the end it prints (and writes to ``--summary-json``) p50/p95/p99 of the request latency
computed from every response time (exact, unlike locust's own table, which rounds to two
significant digits), failures, requests/s and **images/s** (successful requests x ``n`` per
second between the start and the last answer). A request fails when the status is not 200 or
the body does not hold ``n`` base64 images; the failure names the server's error ``code``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from locust import HttpUser, events, task

from slimsd.loadtest.report import check_response, summarize_latencies

log = logging.getLogger("slimsd.loadtest")
ROUTE = "/v1/images/generations"

_ENV = {  # argument -> (environment variable, default, help)
    "prompts_file": ("SLIMSD_LT_PROMPTS", "", "file with one prompt per line (default: held-out scene prompts)"),
    "size": ("SLIMSD_LT_SIZE", "", "'WxH' (default: the model's native size)"),
    "steps": ("SLIMSD_LT_STEPS", "", "num_inference_steps (default: the model's own)"),
    "guidance": ("SLIMSD_LT_GUIDANCE", "", "guidance_scale (default: the model's own)"),
    "images_per_request": ("SLIMSD_LT_N", "1", "images per request (n)"),
    "scheduler": ("SLIMSD_LT_SCHEDULER", "", "ddim | euler | euler_a | dpm++ (default: the server's)"),
    "model": ("SLIMSD_LT_MODEL", "", "id of one of the server's models (default: its default model)"),
    "seed": ("SLIMSD_LT_SEED", "0", "first seed; request i gets seed + i"),
    "think_time": ("SLIMSD_LT_THINK_TIME", "0", "seconds each user waits between requests"),
    "request_timeout": ("SLIMSD_LT_TIMEOUT", "600", "client timeout per request, seconds"),
    "summary_json": ("SLIMSD_LT_SUMMARY", "", "write the end-of-run summary (p50/p95/p99, images/s) here"),
    "api_key": ("SLIMSD_API_KEY", "", "Bearer key when the server has one"),
}


@events.init_command_line_parser.add_listener
def _arguments(parser):
    for name, (var, default, helptext) in _ENV.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=os.environ.get(var, default),
                            help=f"{helptext} [env {var}]", **({"is_secret": True} if name == "api_key" else {}))


def default_prompts_file(num: int = 64) -> Path:
    """Held-out scene prompts (never seen in training), one per line, in a temp file."""
    from slimsd.loadtest.prompts import write_prompts

    fd, path = tempfile.mkstemp(prefix="slimsd-prompts-", suffix=".txt")
    os.close(fd)
    return write_prompts(path, num)


class _Shared:
    """Prompts, request template and the response-time log, shared by all users of a run."""

    def __init__(self, opts):
        path = opts.prompts_file or str(default_prompts_file())
        self.prompts = [p.strip() for p in Path(path).read_text().splitlines() if p.strip()]
        if not self.prompts:
            raise ValueError(f"{path}: no prompts")
        self.n = int(opts.images_per_request)
        self.body = {"n": self.n, "response_format": "b64_json"}
        if opts.size:
            self.body["size"] = opts.size
        if opts.steps:
            self.body["num_inference_steps"] = int(opts.steps)
        if opts.guidance:
            self.body["guidance_scale"] = float(opts.guidance)
        if opts.scheduler:
            self.body["scheduler"] = opts.scheduler
        if opts.model:
            self.body["model"] = opts.model
        self.headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self.timeout = float(opts.request_timeout)
        self.think = float(opts.think_time)
        self.summary_json = opts.summary_json
        self._counter = itertools.count()
        self._seed0 = int(opts.seed)
        self._lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.t_start: float | None = None
        self.t_last: float | None = None
        log.info("prompts: %d from %s; request: %s", len(self.prompts), path, self.body)

    def next_request(self) -> dict:
        with self._lock:
            i = next(self._counter)
        return {**self.body, "prompt": self.prompts[i % len(self.prompts)], "seed": self._seed0 + i}

    def record(self, ms: float, ok: bool) -> None:
        with self._lock:
            self.t_last = time.time()
            if ok:
                self.latencies_ms.append(ms)
            else:
                self.failures += 1


SHARED: _Shared | None = None


@events.test_start.add_listener
def _start(environment, **_):
    global SHARED
    SHARED = _Shared(environment.parsed_options)
    SHARED.t_start = time.time()


class ImageUser(HttpUser):
    """One client generating images back to back."""

    def wait_time(self):  # locust calls it between tasks: the run's --think-time (0: closed loop)
        return SHARED.think if SHARED else 0.0

    @task
    def generate(self):
        body = SHARED.next_request()
        t0 = time.perf_counter()
        with self.client.post(ROUTE, json=body, headers=SHARED.headers, timeout=SHARED.timeout,
                              name=ROUTE, catch_response=True) as r:
            ms = 1000 * (time.perf_counter() - t0)
            reason = check_response(r.status_code, r.text, SHARED.n)
            if reason:
                r.failure(reason)
            else:
                r.success()
            SHARED.record(ms, reason is None)


@events.quitting.add_listener
def _summary(environment, **_):
    if SHARED is None:
        return
    s = summarize_latencies(SHARED.latencies_ms, SHARED.failures, SHARED.n, SHARED.t_start, SHARED.t_last)
    s.update(users=getattr(environment.parsed_options, "num_users", None), request=SHARED.body,
             prompts=len(SHARED.prompts))
    print(f"slimsd loadtest: {s['requests']} requests, {s['failures']} failures; latency p50 {s['p50_ms']:.0f} ms, "
          f"p95 {s['p95_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; {s['images_per_s']:.3f} images/s", flush=True)
    if SHARED.summary_json:
        Path(SHARED.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(SHARED.summary_json).write_text(json.dumps(s, indent=2) + "\n")
