"""The FastAPI app: keyed model endpoints, public health probes, the web page, OpenAPI docs.

Public (no key): `/healthz`, `/readyz`, the static web page (`/`, `/static/*`) and the
OpenAPI docs; they carry no model output. Everything else needs `X-API-Key`.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from serving.api import ApiContext, build_router
from serving.batcher import TextPathBatcher
from serving.errors import install_error_handlers
from serving.metrics import ServingMetrics
from serving.middleware import BodySizeLimit, RequestObservability
from serving.model import BaseModels
from serving.schemas import ReadyResponse, request_models
from serving.settings import ServingParams
from serving.source import RegistrySource, VersionSource
from serving.swap import AliasWatcher, ModelSlot, VersionLoader
from suradapter.config import Params

STATIC_DIR = Path(__file__).parent / "static"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(
    params: Params,
    settings: ServingParams,
    keys: tuple[bytes, ...],
    source: VersionSource | None = None,
) -> FastAPI:
    """The service for `params`; it starts watching the alias when the app starts."""
    source = source or RegistrySource(params)
    metrics = ServingMetrics()
    slot = ModelSlot()
    loader = VersionLoader(source, params, settings, BaseModels(params, settings.device))
    watcher = AliasWatcher(
        slot,
        source,
        loader,
        metrics,
        settings.alias,
        params.registry.poll_seconds,
        settings.retry_seconds,
    )

    batcher = TextPathBatcher(settings.batch_window_ms, settings.max_batch_rows, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            batcher.stop()
            loader.close()

    app = FastAPI(
        title="SUR-adapter serving",
        summary=f"Embeddings and images from models:/{params.registry.model_name}"
        f"@{settings.alias}, hot-swapped when the alias moves.",
        version="1",
        lifespan=lifespan,
    )
    app.state.slot = slot
    app.state.watcher = watcher
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestObservability, metrics=metrics)
    models = request_models(settings.limits)
    context = ApiContext(slot, settings, params.sampling, metrics, models, batcher)
    app.include_router(build_router(context, keys))

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "No version served yet."}},
        tags=["operations"],
    )
    def readyz() -> JSONResponse:
        """Readiness: the served version, and the last hot-swap error if any."""
        served, error = slot.current, slot.last_error
        body = ReadyResponse(
            ready=served is not None,
            alias=settings.alias,
            version=served.version if served else None,
            base_model=served.base_model if served else None,
            provider=served.text_path.provider if served else None,
            last_swap_error=error.message if error else None,
            last_checked=slot.last_checked,
        )
        return JSONResponse(body.model_dump(), status_code=200 if served else 503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
