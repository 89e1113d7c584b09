"""``slimsd triton serve REPO``: a real ``tritonserver`` from the ``nvidia-pytriton`` wheel, on CPU.

The wheel (``pip install "slimsd[triton-server]"``, or ``pip install --no-deps nvidia-pytriton``
to keep numpy 2: see docs/export.md) ships Triton's server binary, its Python backend and
one Python-backend stub per Python version, but no ONNX Runtime or TensorRT backend: it serves
the ``--backend python`` flavour of ``slimsd export triton``. This module only uses the
wheel's files (it never imports ``pytriton``):

* ``pytriton/tritonserver/bin/tritonserver`` with the wheel's bundled libraries
  (``nvidia_pytriton.libs``) on ``LD_LIBRARY_PATH``;
* a backend directory made in a temporary folder: ``python/`` links the wheel's
  ``libtriton_python.so`` and ``triton_python_backend_utils.py`` and the stub built for *this*
  interpreter's version (``python_backend_stubs/3.X/triton_python_backend_stub``);
* the stub embeds ``libpython3.X.so``: this interpreter's own comes first on
  ``LD_LIBRARY_PATH`` and ``PYTHONHOME``/``PYTHONPATH`` point at this interpreter, so the models
  import the same slimsd, numpy and onnxruntime as the caller.

:class:`TritonServer` starts it in its own process group bound to 127.0.0.1 by default,
waits for ``/v2/health/ready`` and stops the whole group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = ('pip install "slimsd[triton-server]" (or `pip install --no-deps "nvidia-pytriton>=0.7"` '
                "to keep numpy 2)")


class TritonNotInstalled(RuntimeError):
    """The ``nvidia-pytriton`` wheel (or a file it should hold) is missing."""


class TritonStartError(RuntimeError):
    """tritonserver exited or did not get ready in time; the message ends with its log."""


@dataclass
class TritonServerConfig:
    """Settings of ``slimsd triton serve`` (its flags are these fields: :func:`slimsd.cliargs.add_fields`)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address the HTTP, gRPC and metrics endpoints bind to (0.0.0.0 exposes them)"})
    http_port: int = field(default=8000, metadata={"help": "HTTP/REST port (/v2/...)"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC port (slimsd serve --backend triton's default)"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus /metrics port"})
    ready_timeout_s: float = field(default=180.0, metadata={
        "help": "seconds to wait for /v2/health/ready before giving up"})
    stop_timeout_s: float = field(default=20.0, metadata={
        "help": "seconds between SIGTERM and SIGKILL when stopping"})
    log_verbose: int = field(default=0, metadata={"help": "tritonserver --log-verbose level"})
    python_path: list[str] = field(default_factory=list, metadata={
        "help": "folders put first on the models' sys.path (a `pip install --target DIR 'numpy<2'`: see docs/export.md)"})


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel's files are."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so
    stub: Path  # the Python-backend stub for this interpreter
    libs: Path  # bundled shared libraries
    caches: Path


def find_tritonserver() -> TritonDist:
    """The wheel's ``tritonserver`` and Python backend; :class:`TritonNotInstalled` naming what is missing."""
    spec = importlib.util.find_spec("pytriton")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(f"nvidia-pytriton is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libs = root / "tritonserver" / "external_libs"
    if not libs.is_dir():
        libs = root.parent / "nvidia_pytriton.libs"
    found = TritonDist(binary=dist / "bin" / "tritonserver", python_backend=dist / "backends" / "python",
                       stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                       libs=libs, caches=dist / "caches")
    for what, path in (("tritonserver binary", found.binary),
                       ("python backend", found.python_backend / "libtriton_python.so"),
                       (f"python backend stub for Python {version}", found.stub),
                       ("bundled libraries", found.libs)):
        if not path.exists():
            raise TritonNotInstalled(f"{path}: {what} missing from nvidia-pytriton ({INSTALL_HINT})")
    return found


def make_backend_dir(dist: TritonDist, folder: Path, python_path=()) -> Path:
    """``folder/backends/python/`` linking the wheel's Python backend and this Python's stub, and
    ``folder/venv``, the environment the stubs' embedded interpreter starts in (see :func:`server_env`)."""
    folder = Path(folder)
    python = folder / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in dist.python_backend.iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / "triton_python_backend_stub").symlink_to(dist.stub)
    _stub_venv(folder / "venv", python_path)
    return python.parent


def _stub_venv(venv: Path, python_path=()) -> None:
    """A venv over this interpreter. The stub embeds libpython in isolated mode (no PYTHONPATH):
    it finds its prefix through ``python3`` on PATH, so PATH leads it here, to
    ``pyvenv.cfg`` (base site-packages included) and a ``.pth`` that puts ``python_path`` first,
    then the caller's own site folders (a caller in a venv)."""
    import site

    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for name in ("python3", "python", f"python{version}"):
        (bin_dir / name).symlink_to(Path(sys.executable).resolve())
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).resolve().parent}\n"
                                     "include-system-site-packages = true\n"
                                     f"version = {sys.version.split()[0]}\n")
    site_dir = venv / "lib" / f"python{version}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(Path(p).resolve()) for p in python_path]
    lines += [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages() if Path(d).is_dir()]
    (site_dir / "slimsd_triton.pth").write_text("\n".join(lines) + "\n")


def server_env(dist: TritonDist, venv: Path, base: dict | None = None) -> dict:
    """The environment tritonserver and its Python stubs need (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    env.pop("PYTHONHOME", None)
    env["PATH"] = os.pathsep.join([str(Path(venv) / "bin"), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # each model instance is one process: no thread oversubscription
    return env


def server_command(dist: TritonDist, repo, backend_dir, cfg: TritonServerConfig) -> list[str]:
    return [
        str(dist.binary), f"--model-repository={Path(repo).resolve()}", f"--backend-directory={backend_dir}",
        f"--cache-directory={dist.caches}",
        f"--http-address={cfg.host}", f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}", f"--grpc-port={cfg.grpc_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
        f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
        f"--log-verbose={cfg.log_verbose}", "--exit-on-error=true", "--strict-readiness=true",
    ]


def default_python_path() -> Path:
    """``$SLIMSD_TRITON_PYTHON``, else ``~/.cache/slimsd/triton-python``: where ``.ci/run`` (and
    docs/export.md) put numpy 1 for the stubs. An install location, not a cache: ``$SLIMSD_CACHE``
    (which tests point at a temp folder) does not move it."""
    return Path(os.environ.get("SLIMSD_TRITON_PYTHON") or Path.home() / ".cache" / "slimsd" / "triton-python")


def models_python_path(python_path=()) -> list[Path]:
    """The folders first on the models' sys.path: ``python_path``, else :func:`default_python_path`
    when it exists. :class:`TritonNotInstalled` when the models would import numpy 2: the wheel's
    stubs are built against numpy 1 (nvidia-pytriton requires numpy<2) and with numpy 2 every
    tensor crosses as zeros or garbage (measured: a float32 output arrives with 0 bytes)."""
    import importlib.metadata

    paths = [Path(p) for p in python_path] or [p for p in (default_python_path(),) if p.is_dir()]
    for p in paths:
        found = sorted(Path(p).glob("numpy-*.dist-info"))
        if found:
            version = found[0].name[len("numpy-"):].split(".dist-info")[0]
            break
    else:
        version = importlib.metadata.version("numpy")
    if int(version.split(".")[0]) >= 2:
        target = paths[0] if paths else default_python_path()
        raise TritonNotInstalled(
            f"the Triton Python-backend stubs of nvidia-pytriton need numpy<2, but the models would import numpy "
            f"{version}: run `pip install --target {target} 'numpy<2'` (then it is found by default, or pass "
            f"--python-path {target})")
    return paths


class TritonServer:
    """One tritonserver process serving ``repo``; a context manager (``with TritonServer(repo) as s:``)."""

    def __init__(self, repo, cfg: TritonServerConfig | None = None, log_path=None):
        self.repo = Path(repo)
        if not (self.repo.is_dir() and any(self.repo.glob("*/config.pbtxt"))):
            raise FileNotFoundError(f"{self.repo}: not a Triton model repository (no */config.pbtxt)")
        self.cfg = cfg or TritonServerConfig()
        self.dist = find_tritonserver()
        self.python_path = models_python_path(self.cfg.python_path)
        self._tmp = tempfile.TemporaryDirectory(prefix="slimsd-triton-")
        self.backend_dir = make_backend_dir(self.dist, Path(self._tmp.name), self.python_path)
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.metrics_port}/metrics"

    @property
    def command(self) -> list[str]:
        return server_command(self.dist, self.repo, self.backend_dir, self.cfg)

    def start(self) -> "TritonServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("tritonserver is already running")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, env=server_env(self.dist, Path(self._tmp.name) / "venv"), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> "TritonServer":
        """Block until ``/v2/health/ready`` is 200; :class:`TritonStartError` (with the log) when the
        process exits first or ``timeout_s`` (``ready_timeout_s``) passes (the server is then stopped)."""
        timeout_s = self.cfg.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise TritonStartError(f"tritonserver exited (code {code}) before getting ready; log:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TritonStartError(f"tritonserver not ready within {timeout_s:g} s (ready_timeout_s); log:\n{self.log_tail()}")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        timeout_s = self.cfg.stop_timeout_s if timeout_s is None else timeout_s
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stubs left behind by a crash
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, for tests)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "TritonServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(repo, cfg: TritonServerConfig | None = None, log=print) -> int:
    """Run tritonserver in the foreground until it exits or this process gets SIGTERM / SIGINT
    (then the server's group is stopped cleanly); returns tritonserver's exit code."""
    server = TritonServer(repo, cfg)
    server.log_path = Path(server._tmp.name) / "tritonserver.log"
    stop = {"requested": False}

    def on_signal(signum, _frame):
        stop["requested"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        log(f"tritonserver starting: {' '.join(server.command)}")
        deadline = time.monotonic() + server.cfg.ready_timeout_s
        while not stop["requested"] and not server.ready():
            if server.proc.poll() is not None:
                raise TritonStartError(f"tritonserver exited (code {server.proc.returncode}); log:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise TritonStartError(f"tritonserver not ready within {server.cfg.ready_timeout_s:g} s; "
                                       f"log:\n{server.log_tail()}")
            time.sleep(0.2)
        if not stop["requested"]:
            log(f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url} "
                f"(log: {server.log_path})")
        while not stop["requested"] and server.proc.poll() is None:
            time.sleep(0.2)
        if server.proc.poll() is not None and not stop["requested"]:
            log(f"tritonserver exited with code {server.proc.returncode}; log:\n{server.log_tail()}")
            return server.proc.returncode
        code = server.stop()
        log(f"tritonserver stopped (code {code})")
        return 0
    finally:
        server.close()
        for s, h in old.items():
            signal.signal(s, h)
