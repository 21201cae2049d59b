"""The keyed endpoints: /v1/embed, /v1/generate, /v1/model and /metrics."""

import base64
import io
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import JSONResponse
from PIL import Image

from serving.auth import ApiKeyChecker
from serving.batcher import TextPathBatcher
from serving.metrics import ServingMetrics
from serving.model import SamplingSpec, ServedVersion
from serving.schemas import (
    MAX_SEED,
    CompareResponse,
    EmbedResponse,
    ModelInfo,
    RequestModels,
)
from serving.settings import ServingParams
from serving.swap import ModelSlot
from suradapter.config import SamplingParams


@dataclass
class ApiContext:
    """What the endpoints share: the served slot, settings, defaults, metrics and the
    text-path batcher."""

    slot: ModelSlot
    settings: ServingParams
    sampling: SamplingParams
    metrics: ServingMetrics
    models: RequestModels
    batcher: TextPathBatcher

    def __post_init__(self) -> None:
        self.generate_slots = threading.BoundedSemaphore(
            self.settings.limits.max_concurrent_generate
        )

    def served(self) -> ServedVersion:
        """The version now served (read once per request). Raises 503 before the first load."""
        served = self.slot.current
        if served is None:
            raise HTTPException(
                503,
                f"no version is served yet (waiting for @{self.settings.alias}; see /readyz)",
                headers={"Retry-After": "5"},
            )
        return served


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sampling_spec(request: Any, served: ServedVersion, context: ApiContext) -> SamplingSpec:
    """Fill the defaults of a generate request; 422 when a size is not a valid step."""
    limits = context.settings.limits
    native = min(served.base.native_size, limits.max_image_size)
    multiple = served.base.size_multiple
    width, height = request.width or native, request.height or native
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            raise HTTPException(
                422,
                f"{name} {value} is not a multiple of {multiple} (this model's size step; "
                f"its native size is {served.base.native_size})",
            )
    steps = request.steps or min(context.sampling.steps, limits.max_steps)
    guidance = request.guidance
    if guidance is None:
        guidance = min(context.sampling.guidance, limits.max_guidance)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return SamplingSpec(
        request.prompt, request.negative_prompt, steps, guidance, seed, width, height
    )


def build_router(context: ApiContext, keys: tuple[bytes, ...]) -> APIRouter:
    """The keyed routes; every one requires a valid `X-API-Key`."""
    router = APIRouter(dependencies=[Depends(ApiKeyChecker(keys))])
    unauthorized = {401: {"description": "Missing or invalid X-API-Key."}}
    EmbedRequest, GenerateRequest = context.models.embed, context.models.generate

    @router.post(
        "/v1/embed",
        response_model=EmbedResponse,
        response_model_exclude_none=True,
        responses={**unauthorized, 503: {"description": "No version served yet."}},
        tags=["model"],
    )
    async def embed(request: EmbedRequest) -> Any:  # type: ignore[valid-type]
        """Adapted prompt embeddings [prompts, tokens, width] from the served text path."""
        served = context.served()
        # awaited on the event loop: the batcher's thread runs ONNX Runtime, no thread per call
        embeds = await context.batcher.embed_async(served, list(request.prompts))
        context.metrics.embedded_prompts.inc(len(request.prompts))
        body: dict[str, Any] = {"version": served.version, "shape": list(embeds.shape)}
        if request.encoding == "base64":
            body["data_base64"] = base64.b64encode(embeds.astype("<f4").tobytes()).decode()
        else:
            body["embeddings"] = embeds.astype("float32", copy=False)
        body["dtype"] = "float32"
        # orjson writes the numpy array directly: several times faster than tolist + json
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(payload, media_type="application/json")

    @router.post(
        "/v1/generate",
        response_class=Response,
        responses={
            200: {
                "description": "The adapted image (image/png), or with compare_base both "
                "images as base64 PNGs (application/json).",
                "model": CompareResponse,
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
            **unauthorized,
            429: {"description": "Too many generate requests in progress."},
            503: {"description": "No version served yet."},
        },
        tags=["model"],
    )
    def generate(request: GenerateRequest) -> Response:  # type: ignore[valid-type]
        """Render a prompt with the adapted text path and the base UNet/VAE."""
        served = context.served()
        spec = sampling_spec(request, served, context)
        if not context.generate_slots.acquire(blocking=False):
            limit = context.settings.limits.max_concurrent_generate
            raise HTTPException(
                429,
                f"{limit} generate requests are already in progress "
                "(serving.limits.max_concurrent_generate); retry shortly",
                headers={"Retry-After": "1"},
            )
        context.metrics.generate_in_progress.inc()
        try:
            rendered = served.generate(
                spec,
                compare_base=request.compare_base,
                embed=lambda prompts: context.batcher.embed(served, prompts),
            )
        finally:
            context.metrics.generate_in_progress.dec()
            context.generate_slots.release()
        for stage, seconds in rendered.seconds.items():
            context.metrics.generate_stage.labels(stage).observe(seconds)
        headers = {
            "X-Model-Version": served.version,
            "X-Seed": str(spec.seed),
            "Server-Timing": ", ".join(
                f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in rendered.seconds.items()
            ),
        }
        adapted = png_bytes(rendered.adapted)
        if rendered.base is None:
            return Response(adapted, media_type="image/png", headers=headers)
        body = CompareResponse(
            version=served.version,
            seed=spec.seed,
            steps=spec.steps,
            guidance=spec.guidance,
            width=spec.width,
            height=spec.height,
            adapted_png_base64=base64.b64encode(adapted).decode(),
            base_png_base64=base64.b64encode(png_bytes(rendered.base)).decode(),
        )
        return JSONResponse(body.model_dump(), headers=headers)

    @router.get("/v1/model", response_model=ModelInfo, responses=unauthorized, tags=["model"])
    def model_info() -> ModelInfo:
        """The served version, its base model, token count, width, image sizes and limits."""
        served = context.served()
        return ModelInfo(
            version=served.version,
            alias=context.settings.alias,
            base_model=served.base_model,
            provider=served.text_path.provider,
            device=str(served.base.device),
            max_tokens=served.text_path.max_length,
            width=served.width,
            native_size=served.base.native_size,
            size_multiple=served.base.size_multiple,
            limits=context.settings.limits,
        )

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **unauthorized,
        },
        tags=["operations"],
    )
    def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        payload, content_type = context.metrics.exposition()
        return Response(payload, media_type=content_type)

    return router
