"""``slimsd loadtest compare``: the teacher at 25 steps vs the compressed model at 8, under load.

For each model in turn (never both under load at once, so they do not share the CPU/GPU):

1. start ``slimsd serve MODEL --backend B --host 127.0.0.1 --port <free port>`` (a subprocess
   in its own process group, log in ``<out>/server-<role>.log``), wait for ``/health/ready``
   (the first start of a model exports it to ONNX; later ones reuse the cache);
2. warm every batch shape the levels will use (one burst of ``min(users, max batch)`` requests
   per level), so the first measured requests do not pay for it;
3. for each concurrency level run ``locust --headless -u N -r N -t <duration>s`` as a
   subprocess with :mod:`slimsd.loadtest.locustfile`, writing ``<out>/locust/<role>-u<N>_*.csv``;
4. stop the server: SIGTERM to its process group, SIGKILL after a grace period. This also
   happens on any error, Ctrl-C or SIGTERM to this command.

Then :func:`slimsd.loadtest.report.write_report` writes ``report.md/.csv/.png/.json``.

``one_server`` (``--one-server``): one ``slimsd serve baseline=A compressed=B`` holds both models
and each role's requests name their model (``model``), as a client of a multi-model server does;
the models still take turns under load.

The compressed model is ``--compressed`` when given, else the preset ``tiny-sd-slim`` when it
resolves (pruned + CFG-aware retrained + step-distilled), else a **pruned-only** stand-in made
once from the baseline with BK-SDM-Small's removals (what ``slimsd compress prune <baseline>
--preset bk-small`` writes; cached under ``$SLIMSD_CACHE/loadtest``): same speed as the real
student, images not worth looking at. The report says which one ran.

Bounded: at most :data:`MAX_LEVELS` levels of at most :data:`MAX_USERS` users, each at most
:data:`MAX_DURATION_S` s; server start-up is bounded by ``--ready-timeout`` and each locust run by
its duration + 120 s. Loopback only: the servers bind 127.0.0.1 and locust targets it.

(Just over ~400 lines: the run is one sequence, servers up, levels, servers down, report, and
reads best top to bottom in one file.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from slimsd.cliargs import option

from . import LOCUSTFILE
from .report import level_from_locust, read_locust_stats, write_report

MAX_LEVELS = 8
MAX_USERS = 256
MAX_DURATION_S = 3600  # an SD-size baseline on a CPU takes minutes per request: 5 of them need > 600 s
HOST = "127.0.0.1"
SHORT_LEVELS = (1, 2)
SHORT_DURATION_S = 5
BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt", "triton")  # triton: a running Triton (--triton-url)
STUDENT = "tiny-sd-slim"


@dataclass
class CompareConfig:
    out: Path = option(Path("runs/loadtest"), "report folder")
    baseline: str = option("tiny-sd", "baseline model (the teacher)")
    baseline_steps: int = option(25, "baseline steps")
    compressed: str | None = option(None, "compressed model (default: tiny-sd-slim when it resolves, else the baseline "
                                      "pruned with --prune-preset only, made once into $SLIMSD_CACHE/loadtest)")
    compressed_steps: int = option(8, "compressed model's steps")
    prune_preset: str = option("bk-small", "preset of the pruned-only stand-in")
    backend: str = option("onnxruntime", "the same for both models", choices=BACKENDS)
    threads: int | None = option(None, "server intra-op threads (default: all cores)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "server device")
    levels: tuple[int, ...] = option((1, 4, 16), f"concurrent users per level (at most {MAX_LEVELS} levels of "
                                             f"1-{MAX_USERS} users)")
    duration_s: int = option(20, f"seconds per level (1-{MAX_DURATION_S})", flag="--duration")
    guidance: float = option(7.5, "CFG scale of every request")
    size: str | None = option(None, "'WxH' (default: the model's native size)")
    images_per_request: int = option(1, "images per request (n)")
    prompts: Path | None = option(None, "prompt file, one per line (default: 64 held-out scene prompts)")
    max_batch_size: int = option(8, "server micro-batch limit (images)")
    max_wait_ms: int = option(0, "server batching window; 0 = continuous batching (the server's default)")
    triton_url: str = option("localhost:8001", "with --backend triton: the Triton server (gRPC) holding both models")
    triton_model_prefix: str = option("{model}_", "with --backend triton: model-name prefix, '{model}' = the model as "
                                      "named (a repository of `slimsd export triton --prefix tiny-sd_` etc.)")
    one_server: bool = option(False, "one slimsd serve holding both models; each role's requests pick theirs with "
                                 "`model` (the models still take turns under load)")
    warmup: bool = option(True, "warm each batch shape before measuring")
    ready_timeout_s: float = option(
        600.0, "seconds to wait for /health/ready (includes the first start's ONNX export)", flag="--ready-timeout")
    stop_grace_s: float = option(15.0, "seconds a server gets to stop after SIGTERM before SIGKILL")
    short: bool = option(False, "smoke test: levels 1,2 for 5 s each")
    command: str = field(default="", repr=False)

    def __post_init__(self):
        if self.short:
            self.levels, self.duration_s = SHORT_LEVELS, SHORT_DURATION_S
        self.levels = tuple(int(u) for u in self.levels)
        self.out = Path(self.out)
        if not 1 <= len(self.levels) <= MAX_LEVELS:
            raise ValueError(f"levels: 1 to {MAX_LEVELS} concurrency levels; got {len(self.levels)}")
        if any(not 1 <= u <= MAX_USERS for u in self.levels):
            raise ValueError(f"levels: users must be 1 to {MAX_USERS}; got {list(self.levels)}")
        if not 1 <= self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration: 1 to {MAX_DURATION_S} s per level; got {self.duration_s}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: one of {', '.join(BACKENDS)}; got {self.backend!r}")

    @property
    def planned_load_s(self) -> float:
        return 2 * len(self.levels) * self.duration_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def slimsd_command() -> list[str]:
    exe = Path(sys.executable).with_name("slimsd")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "slimsd.cli"]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URL we built
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict, timeout: float) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback URL we built
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Server:
    """``slimsd serve`` on a free loopback port; always stopped on exit from the ``with`` block."""

    def __init__(self, model: str | list[str], cfg: CompareConfig, log_path: Path, log=print):
        models = [model] if isinstance(model, str) else list(model)
        self.model, self.cfg, self.log_path, self.log = " ".join(models), cfg, log_path, log
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        max_users = max(cfg.levels)
        self.args = [*models, "--backend", cfg.backend, "--host", HOST, "--port", str(self.port),
                     "--device", cfg.device, "--max-batch-size", str(cfg.max_batch_size),
                     "--max-wait-ms", str(cfg.max_wait_ms), "--max-queue", str(max(32, 2 * max_users)),
                     "--request-timeout-s", "600", "--drain-timeout-s", "5", "--log-level", "warning"]
        if cfg.threads:
            self.args += ["--threads", str(cfg.threads)]
        if cfg.backend == "triton":  # both models' runners call the one Triton server
            self.args += ["--triton-url", cfg.triton_url, "--triton-model-prefix", cfg.triton_model_prefix]

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"starting: slimsd serve {shlex.join(self.args)}")
        self._logf = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if k != "SLIMSD_API_KEY"}  # the load test sends no key
        self.proc = subprocess.Popen(slimsd_command() + ["serve", *self.args], env=env, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slimsd serve {self.model} exited with {self.proc.returncode} before it was "
                                   f"ready; log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() - t0 > self.cfg.ready_timeout_s:
                raise TimeoutError(f"slimsd serve {self.model} not ready after {self.cfg.ready_timeout_s:.0f} s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if _get(self.url + "/health/ready", timeout=2)[0] == 200:
                    self.ready_s = time.monotonic() - t0
                    self.log(f"ready in {self.ready_s:.1f} s at {self.url}")
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def model_card(self, model: str | None = None) -> dict:
        """``/v1/models``' card of ``model`` (None: the first)."""
        status, body = _get(self.url + "/v1/models")
        if status != 200:
            return {}
        cards = json.loads(body)["data"]
        return next((c for c in cards if model is None or c["id"] == model), {})

    def images_served(self) -> dict[str, int]:
        """``slimsd_images_total`` per model id, from ``/metrics``."""
        status, body = _get(self.url + "/metrics")
        out: dict[str, int] = {}
        for line in body.decode().splitlines() if status == 200 else []:
            if line.startswith('slimsd_images_total{model="'):
                series, _, value = line.rpartition(" ")
                out[series.split('"')[1]] = int(float(value))
        return out

    def wait_idle(self, timeout_s: float = 120.0) -> dict[str, int]:
        """Wait until nothing is queued or running (A1111 progress ``job_count`` 0); the image counts then."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            status, body = _get(self.url + "/sdapi/v1/progress?skip_current_image=true")
            if status != 200 or json.loads(body)["state"]["job_count"] == 0:
                break
            time.sleep(0.1)
        return self.images_served()

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL after ``stop_grace_s``."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(self.cfg.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.log(f"server {p.pid} still running {self.cfg.stop_grace_s:.0f} s after SIGTERM: SIGKILL")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            except ProcessLookupError:
                pass
        if p is not None:
            try:  # anything left in its group (it started none, but be sure)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_logf", None):
            self._logf.close()
            self._logf = None


def request_body(cfg: CompareConfig, steps: int, model: str | None = None) -> dict:
    body = {"prompt": "warm-up", "n": cfg.images_per_request, "num_inference_steps": steps,
            "guidance_scale": cfg.guidance, "seed": 0}
    if cfg.size:
        body["size"] = cfg.size
    if model:
        body["model"] = model
    return body


def warm_up(server: Server, cfg: CompareConfig, steps: int, model: str | None = None) -> None:
    """One burst per batch size the levels will produce, so no measured request pays for a new shape."""
    sizes = sorted({min(u * cfg.images_per_request, cfg.max_batch_size) // cfg.images_per_request or 1
                    for u in cfg.levels})
    url = server.url + "/v1/images/generations"
    for c in sizes:
        with ThreadPoolExecutor(c) as ex:
            codes = list(ex.map(lambda i: _post(url, {**request_body(cfg, steps, model), "seed": i}, 600), range(c)))
        if any(code != 200 for code in codes):
            raise RuntimeError(f"warm-up requests to {server.model} failed: HTTP {codes}; log:\n{server.log_tail()}")


def run_locust(url: str, users: int, cfg: CompareConfig, steps: int, prefix: Path, prompts: Path,
               model: str | None = None) -> dict:
    """One level: locust headless as a subprocess; returns the parsed level."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{cfg.duration_s}s", "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "0",
           "--loglevel", "WARNING", "--exit-code-on-error", "0", "--prompts-file", str(prompts),
           "--steps", str(steps), "--guidance", str(cfg.guidance), "--images-per-request", str(cfg.images_per_request),
           "--summary-json", f"{prefix}_summary.json"]
    if cfg.size:
        cmd += ["--size", cfg.size]
    if model:
        cmd += ["--model", model]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSD_LT_") and k != "SLIMSD_API_KEY"}
    with open(f"{prefix}.log", "w") as logf:
        r = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=cfg.duration_s + 120)
    stats = Path(f"{prefix}_stats.csv")
    if r.returncode != 0 or not stats.is_file():
        raise RuntimeError(f"locust exited with {r.returncode}; log {prefix}.log:\n{Path(f'{prefix}.log').read_text()[-3000:]}")
    return level_from_locust(read_locust_stats(stats), cfg.images_per_request)


def pruned_stand_in(baseline: str, preset: str, log=print) -> tuple[str, str]:
    """A pruned-only copy of ``baseline`` (BK-SDM preset), made once into the slimsd cache."""
    from slimsd.compress.prune import PRESETS, prune_pipeline
    from slimsd.models import cache_dir, resolve_model

    src = resolve_model(baseline)
    h = hashlib.sha256()
    for f in sorted((src / "unet").iterdir()):
        h.update(f.name.encode() + f.read_bytes() if f.stat().st_size < 2**28 else f"{f.name}{f.stat()}".encode())
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(baseline).strip("/").split("/")[-1])
    out = cache_dir() / "loadtest" / f"{slug}-{preset}-{h.hexdigest()[:12]}"
    if not (out / "prune_plan.json").is_file():
        log(f"making the pruned-only stand-in: slimsd compress prune {baseline} --preset {preset} --out {out}")
        prune_pipeline(baseline, PRESETS[preset], out, plan={"preset": preset})
    return str(out), (f"`{baseline}` pruned with the `{preset}` preset only (no retraining, no step distillation: "
                      f"the speed of the compressed model, not its images; `slimsd compress prune {baseline} "
                      f"--preset {preset}`)")


def resolve_compressed(cfg: CompareConfig, log=print) -> tuple[str, str]:
    if cfg.compressed:
        return cfg.compressed, "given with --compressed"
    from slimsd.models import resolve_model

    try:
        resolve_model(STUDENT)
        return STUDENT, "pruned, CFG-aware retrained and step-distilled (the `tiny-sd-slim` preset)"
    except Exception as e:  # noqa: BLE001 - not built yet: fall back to the pruned-only stand-in
        log(f"{STUDENT} does not resolve ({e}); using a pruned-only stand-in")
        return pruned_stand_in(cfg.baseline, cfg.prune_preset, log)


def _unet_params(model: str) -> int | None:
    """U-Net parameters from the safetensors headers (no weights loaded); None if unreadable."""
    from slimsd.models import resolve_model, stored_params

    try:
        return stored_params(resolve_model(model), "unet")
    except Exception:  # noqa: BLE001 - informative only
        return None


def run_compare(cfg: CompareConfig, log=print) -> dict:
    """Run both models at every level and write the report; returns the result (with ``files``)."""
    from .machine import describe, machine_info
    from .prompts import write_prompts

    t0 = time.monotonic()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    prompts = Path(cfg.prompts) if cfg.prompts else write_prompts(out / "prompts.txt", 64)
    compressed, what = resolve_compressed(cfg, log)
    models = {"baseline": {"model": cfg.baseline, "steps": cfg.baseline_steps,
                           "what": "the teacher" if cfg.baseline == "tiny-sd" else "baseline"},
              "compressed": {"model": compressed, "steps": cfg.compressed_steps, "what": what}}
    for m in models.values():
        m["unet_params"] = _unet_params(m["model"])
    machine_before = machine_info(cfg.threads)
    log(f"plan: 2 models x {len(cfg.levels)} levels {list(cfg.levels)} x {cfg.duration_s} s = "
        f"{cfg.planned_load_s:.0f} s of load, plus start-ups; backend {cfg.backend}")
    rows = []
    old_term = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_exit)  # SIGTERM -> finally blocks stop the server
    def measure(server: Server, role: str, m: dict, model: str | None) -> None:
        m["ready_s"] = round(server.ready_s, 1)
        m["card"] = server.model_card(model)
        before = server.wait_idle()  # the previous role's last requests (locust stops, they finish) are done
        if cfg.warmup:
            warm_up(server, cfg, m["steps"], model)
        for users in cfg.levels:
            prefix = out / "locust" / f"{role}-u{users}"
            level = run_locust(server.url, users, cfg, m["steps"], prefix, prompts, model)
            row = {"label": role, "model": m["model"], "steps": m["steps"], "users": users,
                   "duration_s": cfg.duration_s, **level}
            rows.append(row)
            log(f"{role:<10} {users:>3} users: {row['requests']} requests, {row['failures']} failures, "
                f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, {row['images_per_s']:.3f} images/s")
        after = server.images_served()  # which of the server's models made this role's images
        m["images_served"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}

    try:
        if cfg.one_server:  # one server holding both, each role's requests name their model
            with Server([f"{role}={m['model']}" for role, m in models.items()], cfg, out / "server.log", log) as server:
                for role, m in models.items():
                    measure(server, role, m, role)
        else:
            for role, m in models.items():
                with Server(m["model"], cfg, out / f"server-{role}.log", log) as server:
                    measure(server, role, m, None)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    machine = machine_info(cfg.threads)
    machine["load_average_before"] = machine_before["load_average"]
    notes = []
    if machine_before["load_average"][0] > 0.75 * (machine["logical_cores"] or 1):
        notes.append(f"The machine was busy (load average {machine_before['load_average'][0]} before, "
                     f"{machine['load_average'][0]} after, on {machine['logical_cores']} cores): other "
                     f"processes took CPU from both runs; ratios are more reliable than absolute numbers.")
    if cfg.short:
        notes.append("--short: 2 levels of 5 s each; a smoke test, not a measurement.")
    result = {"backend": cfg.backend, "threads": cfg.threads, "one_server": cfg.one_server, "levels": list(cfg.levels), "duration_s": cfg.duration_s,
              "guidance": cfg.guidance, "size": cfg.size, "images_per_request": cfg.images_per_request,
              "models": models, "rows": rows, "machine": machine, "machine_line": describe(machine),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "command": cfg.command or "slimsd loadtest compare", "wall_s": time.monotonic() - t0, "notes": notes}
    write_report(out, result)
    return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
