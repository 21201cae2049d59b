"""Losses: the distances point the right way, and gradients reach exactly the right parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from suradapter.config import DenoiseParams, DistanceParams, LossParams
from suradapter.model.adapter import SURAdapter
from suradapter.model.losses import (
    alignment_loss,
    combine_losses,
    denoising_loss,
    denoising_target,
    feature_distance,
    llm_distillation_loss,
    min_snr_weights,
    preservation_loss,
)

DISTANCES = ["softmax_kl", "mse", "cosine"]


@pytest.mark.parametrize("distance", DISTANCES)
def test_distance_is_zero_at_target_and_grows_with_distance(distance):
    target = torch.randn(2, 5, 16)
    near = target + 0.1 * torch.randn(2, 5, 16)
    far = target + 1.0 * torch.randn(2, 5, 16)
    at = feature_distance(target.clone(), target, distance)
    assert at.abs() < 1e-6
    assert 0 < feature_distance(near, target, distance) < feature_distance(far, target, distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_a_gradient_step_reduces_the_distance(distance):
    target = torch.randn(2, 5, 16)
    prediction = torch.randn(2, 5, 16, requires_grad=True)
    before = feature_distance(prediction, target, distance)
    before.backward()
    with torch.no_grad():
        stepped = prediction - 0.1 * prediction.grad / prediction.grad.norm()
    assert feature_distance(stepped, target, distance) < before


def test_softmax_kl_equals_the_reference_formula():
    target, prediction, temperature = torch.randn(3, 7, 16), torch.randn(3, 7, 16), 2.0
    reference = (
        F.kl_div(
            F.log_softmax(target / temperature, -1),
            F.softmax(prediction / temperature, -1),
            reduction="batchmean",
        )
        * temperature**2
    )
    ours = feature_distance(prediction, target, "softmax_kl", temperature)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_teacher_feature_broadcasts_over_tokens_and_mask_drops_padding():
    prediction, teacher = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    full = feature_distance(prediction, teacher, "mse")
    torch.testing.assert_close(full, feature_distance(prediction, teacher.expand(2, 5, 8), "mse"))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    spoiled = prediction.clone()
    spoiled[0, 3:] += 100.0
    torch.testing.assert_close(
        feature_distance(prediction, teacher, "mse", mask=mask),
        feature_distance(spoiled, teacher, "mse", mask=mask),
    )


def _grads(module: torch.nn.Module, prefix: str) -> list[torch.Tensor]:
    return [p.grad for n, p in module.named_parameters() if n.startswith(prefix)]


def _has_grad(module, prefix) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module, prefix))


@pytest.fixture
def reference_adapter():
    return SURAdapter(width=32, num_heads=4, ff_dim=64, mode="reference", dropout=0.0)


def test_reference_distillation_trains_the_encoder_not_fc(reference_adapter):
    out = reference_adapter(torch.randn(2, 5, 32))
    teacher = torch.randn(2, 1, 32)
    llm_distillation_loss(out.encoder_features, teacher, DistanceParams()).backward()
    assert _has_grad(reference_adapter, "transformer_encoder.")
    assert not _has_grad(reference_adapter, "fc.")
    assert not _has_grad(reference_adapter, "attention.")


def test_alignment_at_init_updates_only_fc(reference_adapter):
    """fc.weight starts at zero, so no gradient flows behind it on the first step."""
    out = reference_adapter(torch.randn(2, 5, 32))
    alignment_loss(out.adapted, torch.randn(2, 5, 32), DistanceParams()).backward()
    assert _has_grad(reference_adapter, "fc.")
    assert not _has_grad(reference_adapter, "transformer_encoder.")
    assert not _has_grad(reference_adapter, "attention.")


def test_alignment_never_trains_the_keyword_side(reference_adapter):
    keyword = torch.randn(2, 5, 32, requires_grad=True)
    out = reference_adapter(torch.randn(2, 5, 32))
    alignment_loss(out.adapted, keyword, DistanceParams()).backward()
    assert keyword.grad is None


@pytest.mark.parametrize(("gradient", "reaches_adapter"), [("through", True), ("detach", False)])
def test_denoising_gradient_switch(tiny_pipeline, gradient, reaches_adapter):
    unet = tiny_pipeline.unet
    adapter = SURAdapter(width=32, num_heads=4, ff_dim=64, dropout=0.0)
    states = torch.randn(2, 8, 32)
    prompt_embeds = adapter(states).adapted
    latents = torch.randn(2, 4, 8, 8)
    loss = denoising_loss(
        unet,
        latents,
        torch.tensor([10, 500]),
        prompt_embeds,
        torch.randn_like(latents),
        DenoiseParams(gradient=gradient),
    )
    assert loss.requires_grad is reaches_adapter
    if reaches_adapter:
        loss.backward()
        assert _has_grad(adapter, "fc.")
    assert all(p.grad is None for p in unet.parameters())


def test_the_denoising_target_follows_the_schedulers_prediction_type():
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([0, 500, 999])
    epsilon = DDPMScheduler(prediction_type="epsilon")
    assert denoising_target(epsilon, latents, noise, timesteps) is noise
    velocity = DDPMScheduler(prediction_type="v_prediction")
    alpha_bar = velocity.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = (
        alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    )  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(denoising_target(velocity, latents, noise, timesteps), expected)
    with pytest.raises(ValueError, match="predicts 'sample'"):
        denoising_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = min_snr_weights(snr, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(snr, 5.0, "sample")


def test_combine_uses_the_params_weights():
    params = LossParams(
        llm_distill=DistanceParams(weight=2.0),
        alignment=DistanceParams(weight=0.5),
        denoise=DenoiseParams(weight=3.0),
    )
    terms = combine_losses(params, torch.tensor(1.0), torch.tensor(10.0), torch.tensor(100.0))
    assert float(terms.total) == pytest.approx(3.0 + 20.0 + 50.0)
    assert terms.as_floats()["alignment"] == 100.0


def test_combine_adds_the_weighted_preservation_term_and_defaults_it_to_zero():
    params = LossParams(preservation=DistanceParams(weight=4.0))
    one = torch.tensor(1.0)
    terms = combine_losses(params, one, one, one, torch.tensor(2.0))
    assert float(terms.total) == pytest.approx(1.0 + 1.0 + 1.0 + 8.0)
    assert terms.as_floats()["preservation"] == 2.0
    without = combine_losses(params, one, one, one)
    assert float(without.total) == pytest.approx(3.0)
    assert LossParams().preservation.weight == 0.0  # the reference has no such term


def test_preservation_is_zero_for_an_identity_adapter_and_trains_only_the_adapter():
    keyword = torch.randn(3, 6, 32, requires_grad=True)
    identity = SURAdapter(width=32, depth=1, num_heads=4, ff_dim=64, adapter_weight=0.0).eval()
    params = DistanceParams()
    assert preservation_loss(identity(keyword).adapted, keyword, params).abs() < 1e-6

    adapter = SURAdapter(width=32, depth=1, num_heads=4, ff_dim=64, adapter_weight=0.5).eval()
    loss = preservation_loss(adapter(keyword).adapted, keyword, params)
    assert loss > 0
    loss.backward()
    assert adapter.fc.weight.grad is not None and adapter.fc.weight.grad.abs().sum() > 0
    # the target side is detached: only the adapted copy carries gradient to the input
    adapted_only = torch.autograd.grad(
        preservation_loss(adapter(keyword).adapted, keyword, params), keyword
    )[0]
    through_target = torch.autograd.grad(
        feature_distance(adapter(keyword).adapted, keyword, params.distance), keyword
    )[0]
    assert not torch.allclose(adapted_only, through_target)


def test_a_step_on_preservation_moves_keyword_outputs_back_towards_their_inputs():
    torch.manual_seed(0)
    keyword = torch.randn(4, 6, 32)
    adapter = SURAdapter(width=32, depth=1, num_heads=4, ff_dim=64, adapter_weight=0.5).eval()
    with torch.no_grad():
        adapter.fc.weight.normal_(std=0.5)
    optimiser = torch.optim.SGD(adapter.parameters(), lr=0.05)
    params = DistanceParams(distance="mse")
    before = preservation_loss(adapter(keyword).adapted, keyword, params)
    before.backward()
    optimiser.step()
    after = preservation_loss(adapter(keyword).adapted, keyword, params)
    assert after < before
