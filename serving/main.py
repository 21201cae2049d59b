"""Run the service with uvicorn: `sur serve` and `python -m serving` both end here."""

from __future__ import annotations

import logging

import uvicorn

from serving.auth import ApiKeyError, load_api_keys
from serving.settings import serving_params
from suradapter.config import Params

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ServeError(RuntimeError):
    """The service cannot start: no usable API key configured."""


def serve(params: Params, host: str | None = None, port: int | None = None) -> None:
    """Serve until interrupted. `host`/`port` override `serving.host`/`serving.port`.

    Raises ServeError when the settings or the API keys are unusable.
    """
    try:
        settings = serving_params(params)
        keys = load_api_keys()
    except ApiKeyError as err:
        raise ServeError(str(err)) from None
    from serving.app import create_app  # heavy imports (torch, diffusers) after the checks

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    app = create_app(params, settings, keys)
    uvicorn.run(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_level="info",
        server_header=False,
        timeout_graceful_shutdown=10,
    )
