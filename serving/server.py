"""Run the gateway under uvicorn with a graceful drain: on SIGTERM/SIGINT new requests get 503 while
in-flight ones finish (up to the request deadline), then the engine closes."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from cleanplate.admission import tune_allocator

from .app import create_app
from .settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app_state: Any) -> None:
        super().__init__(config)
        self.app_state = app_state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Serve until a signal; blocks. Raises BundleError/InputError before binding if the setup is wrong."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()  # before the engine and the thread pools allocate: memory goes back after bursts
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5, access_log=False)
    DrainingServer(config, app.state).run()
