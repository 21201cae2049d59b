"""The fixed-mode token mixer: zero-init, fitted standardisation, token mixing, errors, and
its input: the prompt's token embeddings, so the encoder states' float noise never reaches it."""

from __future__ import annotations

import json

import pytest
import torch
from test_adapter import trained_looking

from suradapter.config import AdapterParams, TokenMixerParams
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath, token_embeddings
from suradapter.model.token_mixer import MIXER_INPUT, TokenMixer

WIDTH, TOKENS = 16, 6
MIXER = {"tokens": TOKENS, "hidden": 24, "token_hidden": 8, "depth": 2, "reads": MIXER_INPUT}


def adapter_with_mixer(**kwargs) -> SURAdapter:
    return SURAdapter(width=WIDTH, num_heads=4, ff_dim=32, token_mixer=MIXER, **kwargs)


def test_an_untrained_mixer_changes_nothing():
    plain = SURAdapter(width=WIDTH, num_heads=4, ff_dim=32).eval()
    mixed = adapter_with_mixer().eval()
    x, tokens = torch.randn(3, TOKENS, WIDTH), torch.randn(3, TOKENS, WIDTH)
    with torch.no_grad():
        out = mixed(x, None, tokens)
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
    x = torch.randn(2, TOKENS, WIDTH)
    adapter(x, None, torch.randn(2, TOKENS, WIDTH)).adapted.pow(2).sum().backward()
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
    x, tokens = torch.randn(2, TOKENS, WIDTH), torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, None, tokens).adapted, adapter.eval()(x, None, tokens).adapted
        )


def test_wrong_prompt_length_names_the_expected_length():
    with pytest.raises(ValueError, match=f"padded to {TOKENS} tokens, got 5"):
        adapter_with_mixer()(torch.randn(2, 5, WIDTH), None, torch.randn(2, 5, WIDTH))


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


def test_the_mixer_needs_the_token_embeddings_and_says_so():
    with pytest.raises(ValueError, match="reads the prompts' token embeddings: pass token_embed"):
        adapter_with_mixer()(torch.randn(2, TOKENS, WIDTH))


def test_an_adapter_whose_mixer_read_the_encoder_states_is_refused_at_load(tmp_path):
    adapter_with_mixer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["token_mixer"]["reads"]  # as an adapter saved before this layout
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has no 'reads' .*retrain the adapter"):
        SURAdapter.from_pretrained(tmp_path)


def test_float_noise_on_the_encoder_states_never_reaches_the_mixer():
    """Another runtime's rounding of the CLIP states (1e-6 relative) leaves the mixer's update
    bit-identical, and the adapter's output moves by no more than the noise itself."""
    adapter = trained_looking(adapter_with_mixer()).eval()
    adapter.mixer.fit_statistics([torch.randn(64, TOKENS, WIDTH)])
    states, tokens = torch.randn(4, TOKENS, WIDTH) * 3, torch.randn(4, TOKENS, WIDTH)
    rounding = (torch.rand_like(states) * 2 - 1) * 1e-6 * states.abs()
    with torch.no_grad():
        clean, noisy = adapter(states, None, tokens), adapter(states + rounding, None, tokens)
    assert clean.mixer_output.abs().max() > 0.1  # the mixer does change the output
    assert torch.equal(clean.mixer_output, noisy.mixer_output)
    assert (noisy.adapted - clean.adapted).abs().max() <= 2 * rounding.abs().max()


def test_the_text_path_feeds_the_mixer_the_encoders_token_embeddings(tiny_pipeline):
    encoder = tiny_pipeline.text_encoder
    width = encoder.config.hidden_size
    tokens = tiny_pipeline.tokenizer.model_max_length
    mixer = {**MIXER, "tokens": tokens}
    adapter = SURAdapter(width=width, num_heads=4, ff_dim=32, token_mixer=mixer)
    adapter = trained_looking(adapter).eval()
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, adapter)
    encoded = path.tokenize(["three red circles", "a crimson trio of rings"])
    embedded = token_embeddings(encoder, encoded.input_ids)
    torch.testing.assert_close(embedded, encoder.get_input_embeddings().weight[encoded.input_ids])
    with torch.no_grad():
        states = path.encode_text(encoded.input_ids, encoded.attention_mask)
        expected = adapter(states, encoded.attention_mask, embedded).adapted
        got = path(encoded.input_ids, encoded.attention_mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
