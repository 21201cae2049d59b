"""Request and response bodies. Request limits come from `serving.limits`, so they show in
the OpenAPI schema and a request above one gets a 422 that names the field and the limit."""

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from serving.settings import ServingLimits

MAX_SEED = 2**32 - 1


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


class EmbedResponse(BaseModel):
    version: str = Field(description="Registry version that computed the embeddings.")
    shape: list[int] = Field(description="[prompts, tokens, width].")
    dtype: Literal["float32"] = "float32"
    embeddings: list[list[list[float]]] | None = Field(
        None, description="Nested lists (encoding 'float')."
    )
    data_base64: str | None = Field(
        None, description="Little-endian float32, row-major, base64 (encoding 'base64')."
    )


class CompareResponse(BaseModel):
    version: str = Field(description="Registry version of the adapted text path.")
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    adapted_png_base64: str = Field(description="PNG from the adapted text path.")
    base_png_base64: str = Field(description="PNG from the base model's text encoder, same seed.")


class ReadyResponse(BaseModel):
    ready: bool
    alias: str
    version: str | None = Field(description="Version now served; null before the first load.")
    base_model: str | None
    provider: str | None = Field(description="ONNX Runtime provider of the text path.")
    last_swap_error: str | None = Field(description="Why the latest load failed, if it did.")
    last_checked: float | None = Field(description="Unix time the alias was last read.")


class ModelInfo(BaseModel):
    version: str
    alias: str
    base_model: str
    provider: str = Field(description="ONNX Runtime provider of the text path.")
    device: str = Field(description="Torch device of the base UNet/VAE.")
    max_tokens: int
    width: int
    native_size: int = Field(description="Default image side, in pixels.")
    size_multiple: int = Field(description="Image sides must be multiples of this.")
    limits: ServingLimits


@dataclass(frozen=True)
class RequestModels:
    """The request bodies for one set of limits."""

    embed: type[BaseModel]
    generate: type[BaseModel]


def request_models(limits: ServingLimits) -> RequestModels:
    """Build the request bodies with `limits` baked into their validation and schema."""
    Prompt = Annotated[
        str, StringConstraints(max_length=limits.max_prompt_chars), AfterValidator(_utf8)
    ]

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompts: list[Prompt] = Field(
            min_length=1,
            max_length=limits.max_batch,
            description=f"1 to {limits.max_batch} prompts of at most "
            f"{limits.max_prompt_chars} characters.",
        )
        encoding: Literal["float", "base64"] = Field(
            "float", description="'float': nested lists; 'base64': packed float32."
        )

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: Prompt
        negative_prompt: Prompt = ""
        steps: int | None = Field(
            None, ge=1, le=limits.max_steps, description="Denoising steps (default: params)."
        )
        guidance: float | None = Field(
            None,
            ge=0,
            le=limits.max_guidance,
            allow_inf_nan=False,
            description="Classifier-free guidance scale (default: params).",
        )
        seed: int | None = Field(
            None, ge=0, le=MAX_SEED, description="Noise seed; null picks one (sent back)."
        )
        width: int | None = Field(
            None, ge=8, le=limits.max_image_size, description="Pixels (default: native)."
        )
        height: int | None = Field(
            None, ge=8, le=limits.max_image_size, description="Pixels (default: native)."
        )
        compare_base: bool = Field(
            False,
            description="false: the adapted image as image/png; true: JSON with the adapted "
            "and the base model's image for the same seed, as base64 PNGs.",
        )

    return RequestModels(embed=EmbedRequest, generate=GenerateRequest)
