"""SUR-adapter training losses: LLM distillation, semantic alignment and denoising.

Distances compare a `prediction` (the adapter side, which gets gradients) with a `target`
over token-wise features [B, T, D] and reduce like the reference's `batchmean`: summed over
tokens (and over padding-masked tokens only, when a mask is given), averaged over the batch.

`softmax_kl` is the reference distance: `kl_div(log_softmax(target), softmax(prediction))`,
i.e. KL(softmax(prediction) || softmax(target)) over the hidden dimension, times T^2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suradapter.config import DenoiseParams, Distance, DistanceParams, LossParams


def softmax_kl_per_token(
    prediction: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(prediction/T) || softmax(target/T)) * T^2 per token, [B, T]."""
    log_p = F.log_softmax(prediction / temperature, dim=-1)
    log_q = F.log_softmax(target / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def mse_per_token(
    prediction: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean squared error over the hidden dimension, [B, T]."""
    return (prediction - target).pow(2).mean(-1)


def cosine_per_token(
    prediction: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """1 - cosine similarity over the hidden dimension, [B, T]."""
    return 1.0 - F.cosine_similarity(prediction, target, dim=-1)


PER_TOKEN: dict[Distance, Callable[..., torch.Tensor]] = {
    "softmax_kl": softmax_kl_per_token,
    "mse": mse_per_token,
    "cosine": cosine_per_token,
}


def feature_distance(
    prediction: torch.Tensor,
    target: torch.Tensor,
    distance: Distance,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar distance: per-token `distance`, summed over (masked) tokens, mean over batch.

    `target` broadcasts over tokens ([B, 1, D] against [B, T, D]). Raises KeyError for an
    unknown distance.
    """
    target = target.expand_as(prediction)
    per_token = PER_TOKEN[distance](prediction, target.to(prediction.dtype), temperature)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum() / prediction.shape[0]


def llm_distillation_loss(
    encoder_features: torch.Tensor,
    projected_teacher: torch.Tensor,
    params: DistanceParams,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adapter encoder features [B, T, D] vs the projected teacher feature [B, 1, D]."""
    return feature_distance(
        encoder_features, projected_teacher, params.distance, params.softmax_temperature, mask
    )


def alignment_loss(
    adapted_narrative: torch.Tensor,
    keyword_states: torch.Tensor,
    params: DistanceParams,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adapted narrative embedding vs frozen CLIP(keyword prompt), both [B, T, D]."""
    return feature_distance(
        adapted_narrative,
        keyword_states.detach(),
        params.distance,
        params.softmax_temperature,
        mask,
    )


def preservation_loss(
    adapted_keyword: torch.Tensor,
    keyword_states: torch.Tensor,
    params: DistanceParams,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adapted keyword embedding vs the frozen CLIP(keyword prompt) it came from, [B, T, D].

    The adapter should leave a prompt the base already follows as it is; this keeps the
    keyword-prompt quality that the alignment term alone does not protect.
    """
    return feature_distance(
        adapted_keyword, keyword_states.detach(), params.distance, params.softmax_temperature, mask
    )


def denoising_loss(
    unet: nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    target: torch.Tensor,
    params: DenoiseParams,
    snr: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """MSE of the frozen UNet's prediction conditioned on adapted `prompt_embeds`.

    With `params.gradient == "detach"` the conditioning is cut from the graph, as in the
    reference code, so the adapter gets no gradient from this term. With `snr` [B] and
    `params.snr_gamma`, applies Min-SNR weighting for `prediction_type`.
    """
    condition = prompt_embeds.detach() if params.gradient == "detach" else prompt_embeds
    condition = condition.to(noisy_latents.dtype)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states=condition).sample
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if params.snr_gamma is not None and snr is not None:
        per_sample = per_sample * min_snr_weights(snr, params.snr_gamma, prediction_type)
    return per_sample.mean()


def denoising_target(
    scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet predicts for `scheduler`'s `prediction_type`: the noise (epsilon) or the
    velocity (v_prediction). Raises ValueError for any other type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"the base model's scheduler predicts '{prediction_type}'; the denoising loss supports "
        "'epsilon' and 'v_prediction'"
    )


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023)."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr
    raise ValueError(f"min-SNR weighting: unknown prediction_type '{prediction_type}'")


@dataclass(frozen=True)
class LossTerms:
    """The weighted total and its unweighted parts (for logging)."""

    total: torch.Tensor
    denoise: torch.Tensor
    llm_distill: torch.Tensor
    alignment: torch.Tensor
    preservation: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


def combine_losses(
    params: LossParams,
    denoise: torch.Tensor,
    llm_distill: torch.Tensor,
    alignment: torch.Tensor,
    preservation: torch.Tensor | None = None,
) -> LossTerms:
    """total = w_denoise * denoise + w_llm * llm_distill + w_align * alignment
    + w_keep * preservation (a missing preservation term counts as 0)."""
    if preservation is None:
        preservation = torch.zeros_like(alignment)
    total = (
        params.denoise.weight * denoise
        + params.llm_distill.weight * llm_distill
        + params.alignment.weight * alignment
        + params.preservation.weight * preservation
    )
    return LossTerms(total, denoise, llm_distill, alignment, preservation)
