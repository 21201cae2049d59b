"""The fixed-mode token mixer: zero-init, fitted standardisation, token mixing, errors."""

from __future__ import annotations

import pytest
import torch
from test_adapter import trained_looking

from suradapter.config import AdapterParams, TokenMixerParams
from suradapter.model.adapter import SURAdapter
from suradapter.model.token_mixer import TokenMixer

WIDTH, TOKENS = 16, 6
MIXER = {"tokens": TOKENS, "hidden": 24, "token_hidden": 8, "depth": 2}


def adapter_with_mixer(**kwargs) -> SURAdapter:
    return SURAdapter(width=WIDTH, num_heads=4, ff_dim=32, token_mixer=MIXER, **kwargs)


def test_an_untrained_mixer_changes_nothing():
    plain = SURAdapter(width=WIDTH, num_heads=4, ff_dim=32).eval()
    mixed = adapter_with_mixer().eval()
    x = torch.randn(3, TOKENS, WIDTH)
    with torch.no_grad():
        out = mixed(x)
        torch.testing.assert_close(out.adapted, plain(x).adapted, rtol=0, atol=0)
    assert not out.mixer_output.any()
    assert plain(x).mixer_output is None


def test_fitted_statistics_standardise_every_token_and_channel():
    mixer = TokenMixer(WIDTH, TOKENS, 8, 4, 1)
    states = torch.randn(200, TOKENS, WIDTH) * (torch.rand(TOKENS, WIDTH) * 5 + 0.1) + 3
    states[:, 0] = torch.randn(WIDTH)  # a constant token (CLIP's first) ...
    states[:, 1, 0] = 7.0  # ... and a constant feature
    assert mixer.fit_statistics(states.split(64)) == 200
    standardised = (states - mixer.input_mean) * mixer.input_scale
    varying = standardised[:, 2:]
    torch.testing.assert_close(varying.mean(0), torch.zeros(TOKENS - 2, WIDTH))
    torch.testing.assert_close(varying.std(0), torch.ones(TOKENS - 2, WIDTH))
    assert not mixer.input_scale[0].any() and mixer.input_scale[1, 0] == 0
    assert mixer.input_scale[1, 1:].all()
    with pytest.raises(ValueError, match="at least 2 rows"):
        mixer.fit_statistics([states[:1]])


def test_float_noise_on_a_constant_feature_is_not_amplified():
    mixer = trained_looking(TokenMixer(WIDTH, TOKENS, 8, 4, 1))
    states = torch.randn(64, TOKENS, WIDTH, dtype=torch.float64).float()
    states[:, 0] = 0.5  # constant: every prompt's first token
    mixer.fit_statistics([states])
    noisy = states.clone()
    noisy[:, 0] += 1e-6  # what another runtime's rounding looks like
    with torch.no_grad():
        change = (mixer(noisy) - mixer(states)).abs().max()
    assert change < 1e-5


def test_the_mixer_moves_information_between_tokens_of_one_prompt_only():
    adapter = trained_looking(adapter_with_mixer()).eval()
    x = torch.randn(4, TOKENS, WIDTH)
    y = x.clone()
    y[0, 3] += 1.0  # one token of the first prompt changes
    with torch.no_grad():
        a, b = adapter.mixer(x), adapter.mixer(y)
    assert not torch.allclose(a[0, 0], b[0, 0])  # it reaches another position
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)  # and no other prompt


def test_every_mixer_parameter_receives_gradient():
    adapter = trained_looking(adapter_with_mixer())
    adapter(torch.randn(2, TOKENS, WIDTH)).adapted.pow(2).sum().backward()
    missing = [n for n, p in adapter.mixer.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert not any(name.startswith("mixer.input_") for name, _ in adapter.named_parameters())


def test_the_mixer_learns_a_move_a_per_token_map_cannot():
    """Copy token 2's features to token 0: a cross-position map, learned in a few steps."""
    torch.manual_seed(0)
    mixer = TokenMixer(WIDTH, TOKENS, 32, 16, 1)
    x = torch.randn(256, TOKENS, WIDTH)
    target = x.clone()
    target[:, 0] = x[:, 2]
    mixer.fit_statistics([x])
    optimiser = torch.optim.Adam(mixer.parameters(), lr=3e-3)

    def error() -> float:
        with torch.no_grad():
            return float((x + mixer(x) - target).pow(2).mean())

    before = error()
    for _ in range(150):
        loss = (x + mixer(x) - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error() < 0.2 * before


def test_save_and_load_keep_the_mixer_and_its_statistics(tmp_path):
    adapter = adapter_with_mixer()
    adapter.mixer.fit_statistics([torch.randn(10, TOKENS, WIDTH) * 2 + 1])
    trained_looking(adapter.mixer)
    adapter.save_pretrained(tmp_path)
    loaded = SURAdapter.from_pretrained(tmp_path).eval()
    assert loaded.config.token_mixer == MIXER
    for name, value in adapter.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).adapted, adapter.eval()(x).adapted)


def test_wrong_prompt_length_names_the_expected_length():
    with pytest.raises(ValueError, match=f"padded to {TOKENS} tokens, got 5"):
        adapter_with_mixer()(torch.randn(2, 5, WIDTH))


def test_reference_mode_refuses_a_mixer():
    with pytest.raises(ValueError, match="fixed-mode branch"):
        SURAdapter(width=WIDTH, num_heads=4, ff_dim=32, mode="reference", token_mixer=MIXER)


def test_from_params_takes_the_length_from_the_tokenizer_and_checks_it():
    params = AdapterParams(num_heads=4, ff_dim=32, token_mixer=TokenMixerParams(hidden=24))
    adapter = SURAdapter.from_params(params, text_width=WIDTH, text_tokens=TOKENS)
    assert adapter.config.token_mixer["tokens"] == TOKENS
    with pytest.raises(ValueError, match="token mixer length unknown"):
        SURAdapter.from_params(params, text_width=WIDTH)
    fixed = params.model_copy(update={"token_mixer": TokenMixerParams(tokens=9)})
    with pytest.raises(ValueError, match="tokens 9 does not match the tokenizer's max length 6"):
        SURAdapter.from_params(fixed, text_width=WIDTH, text_tokens=TOKENS)
    assert not SURAdapter.from_params(
        params.model_copy(update={"token_mixer": None}), WIDTH
    ).has_token_mixer
