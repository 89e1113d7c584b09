"""Triton :class:`~slimsd.denoise.Runners`: the three models of a ``slimsd export triton`` repository.

The denoising loop stays in this process (one :func:`slimsd.denoise.generate`); each runner
call is one ``infer`` on the ``text_encoder`` / ``unet`` / ``vae_decoder`` model of a Triton
server, over gRPC (``tritonclient.grpc``, default, port 8001) or HTTP (``tritonclient.http``,
port 8000). Tensor names and dtypes come from the same specs as the ONNX files and the
generated ``config.pbtxt``, so a request that builds here is one Triton accepts.

Several URLs spread calls round-robin over several Triton servers (one per GPU, say); each
call is self-contained (the latents travel with it), so any server can take any step.
Clients are created per thread: the HTTP client (gevent) must stay in the thread that made it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Sequence

import numpy as np

from slimsd.runners import ComponentRunners
from slimsd.specs import COMPONENTS, ComponentSpec

log = logging.getLogger("slimsd.serve")


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as m
    elif protocol == "http":
        import tritonclient.http as m
    else:
        raise ValueError(f"triton protocol must be grpc or http, got {protocol!r}")
    return m


def _strip_scheme(url: str) -> str:
    # tritonclient wants host:port; accept grpc:// and http:// for readability
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    if url.startswith("https://"):
        raise ValueError(f"{url}: use host:port with ssl options of tritonclient for TLS (not supported here)")
    return url


def _max_batch_size(config) -> int:
    """``max_batch_size`` of a ``get_model_config`` answer (gRPC: a protobuf with ``.config``; HTTP: a dict)."""
    if isinstance(config, dict):
        return int(config.get("config", config).get("max_batch_size", 0))
    return int(getattr(getattr(config, "config", config), "max_batch_size", 0))


class TritonRunners(ComponentRunners):
    def __init__(self, urls: str | Sequence[str], specs: dict[str, ComponentSpec], protocol: str = "grpc",
                 models: dict[str, str] | None = None, timeout_s: float = 60.0, client_factory=None):
        """``specs``: :func:`slimsd.specs.component_specs` of the ONNX export Triton serves.

        ``client_factory(url)`` replaces ``InferenceServerClient(url)`` (tests).
        """
        self.urls = [_strip_scheme(u) for u in ([urls] if isinstance(urls, str) else list(urls))]
        if not self.urls:
            raise ValueError("triton: give at least one server URL")
        self.protocol = protocol
        self.m = _module(protocol)
        self.specs = specs
        self.models = {n: n for n in COMPONENTS} | dict(models or {})
        self.timeout_s = timeout_s
        self._factory = client_factory or (lambda url: self.m.InferenceServerClient(url=url))
        self._next = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()
        self._local = threading.local()
        self.batched: set[str] = set()  # components whose config has max_batch_size > 0 (read by check_ready)

    def _client(self):
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = [self._factory(u) for u in self.urls]
        with self._lock:
            i = next(self._next)
        return clients[i]

    def check_ready(self) -> None:
        """Raise unless every server reports the three models ready (start-up check)."""
        for url in self.urls:
            client = self._factory(url)
            for name, model in self.models.items():
                if not client.is_model_ready(model):
                    raise RuntimeError(f"triton at {url}: model {model!r} ({name}) is not ready")
                try:
                    config = client.get_model_config(model)
                except Exception as e:  # noqa: BLE001 - a server without the config API: unbatched layout
                    log.warning("triton at %s: no model config for %r (%s); sending the full batch shape", url, model, e)
                    continue
                if _max_batch_size(config) > 0:
                    self.batched.add(name)

    def build_inputs(self, component: str, **arrays) -> list:
        """``InferInput`` objects named, typed and shaped by the spec."""
        inputs = []
        spec = self.specs[component]
        for t, a in zip(spec.inputs, spec.cast_inputs(arrays).values()):
            if component in self.batched and a.ndim == 1:  # batch-only (timestep): Triton wants [batch, 1]
                a = a.reshape(-1, 1)
            inp = self.m.InferInput(t.name, list(a.shape), t.wire_dtype)
            if self.protocol == "http":
                inp.set_data_from_numpy(a, binary_data=True)  # raw bytes, not a JSON list of floats
            else:
                inp.set_data_from_numpy(a)
            inputs.append(inp)
        return inputs

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        """One ``infer`` of model ``name`` asking for its main output only."""
        out_name = self.specs[name].main_output
        outputs = [self.m.InferRequestedOutput(out_name, binary_data=True) if self.protocol == "http"
                   else self.m.InferRequestedOutput(out_name)]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._client().infer(self.models[name], self.build_inputs(name, **inputs), outputs=outputs, **kw)
        out = result.as_numpy(out_name)
        if out is None:
            raise RuntimeError(f"triton model {self.models[name]!r} returned no {out_name!r}")
        return {out_name: np.array(out, dtype=np.float32)}  # a writable copy: the client's array views its buffer
