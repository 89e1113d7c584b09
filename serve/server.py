"""``slimsd serve``: the app under uvicorn, with drain-on-SIGTERM and exit-on-load-failure.

On SIGTERM / SIGINT the engine drains first while the server still listens (``/health/ready`` ->
503, new generation requests -> 503 so a load balancer retries elsewhere) until the queue is empty
or ``--drain-timeout-s`` has passed (still-queued requests then get 503 ``draining``); then
uvicorn's graceful shutdown lets running requests finish. A model that fails to load stops the
process with exit code 1 rather than leaving a server that can never become ready.
"""

from __future__ import annotations

import logging
import sys
import threading

from .settings import ServeSettings

log = logging.getLogger("slimsd.serve")


def run(settings: ServeSettings) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = {"server": None, "failed": False}

    def on_load_error(_e: BaseException) -> None:
        state["failed"] = True
        if state["server"] is not None:
            state["server"].should_exit = True

    app = create_app(settings, on_load_error=on_load_error)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine = getattr(app.state, "engine", None)
            if engine is None or not engine.ready or engine.draining or self.should_exit:
                return super().handle_exit(sig, frame)  # nothing to drain, or a second signal: exit now
            engine.drain()
            # keep listening while the queue drains (/health/ready and new work answer 503), then let
            # uvicorn's graceful shutdown finish the running requests
            threading.Thread(target=self._exit_when_drained, args=(engine, sig, frame), name="slimsd-drain",
                             daemon=True).start()

        def _exit_when_drained(self, engine, sig, frame):
            engine.finish(settings.drain_timeout_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout_s or None)
    server = state["server"] = Server(config)
    log.info("slimsd serve: http://%s:%d (backend %s); /health/ready turns 200 once the model is loaded",
             settings.host, settings.port, settings.backend)
    server.run()
    return 1 if state["failed"] else 0
