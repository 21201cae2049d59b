"""SURAdapter: reference parity and strict loading, fixed-mode semantics, save/load, init."""

from __future__ import annotations

import pytest
import torch

from reference_impl import ReferenceAdapter
from suradapter.model.adapter import SURAdapter

WIDTH, HEADS, FF = 32, 8, 64


def trained_looking(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Overwrite every weight with seeded noise so no zero-init hides a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return module


@pytest.fixture
def reference_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = trained_looking(ReferenceAdapter(2, 0.1, WIDTH, HEADS, FF)).eval()
    path = tmp_path / "adapter.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.parametrize("batch", [1, 3])
def test_reference_mode_matches_reference_forward(reference_checkpoint, batch):
    reference, path = reference_checkpoint
    adapter = SURAdapter.from_reference_checkpoint(path, adapter_weight=0.1)
    x = torch.randn(batch, 7, WIDTH, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = reference(x)
        got = adapter(x)
    for want, have in zip(
        expected, (got.adapted, got.encoder_features, got.fc_output), strict=True
    ):
        assert (want - have).abs().max() <= 1e-6


def test_reference_state_dict_keys_are_the_official_ones():
    adapter = SURAdapter(width=WIDTH, num_heads=HEADS, ff_dim=FF, mode="reference")
    reference = ReferenceAdapter(2, 0.1, WIDTH, HEADS, FF)
    assert set(adapter.state_dict()) == set(reference.state_dict())
    assert any(k.startswith("encoder_layer.") for k in adapter.state_dict())
    assert "attention.value_layer.weight" in adapter.state_dict()


def test_reference_mode_attends_across_the_batch():
    """batch_first=False: sample 0's output depends on the other samples (the reference bug)."""
    adapter = trained_looking(SURAdapter(width=WIDTH, num_heads=HEADS, ff_dim=FF, mode="reference"))
    adapter.eval()
    x = torch.randn(3, 5, WIDTH)
    y = x.clone()
    y[1:] = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        assert not torch.allclose(adapter(x).adapted[0], adapter(y).adapted[0], atol=1e-4)


def test_strict_loading_rejects_a_foreign_state_dict(tmp_path):
    state = SURAdapter(width=WIDTH, num_heads=HEADS, ff_dim=FF, mode="reference").state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="reference layout"):
        SURAdapter.from_reference_checkpoint(tmp_path / "bad.pt")
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SUR-adapter"):
        SURAdapter.from_reference_checkpoint(tmp_path / "other.pt")


def test_convert_then_from_pretrained_round_trips(reference_checkpoint, tmp_path):
    _, path = reference_checkpoint
    original = SURAdapter.from_reference_checkpoint(path, adapter_weight=0.25)
    original.save_pretrained(tmp_path / "converted")
    loaded = SURAdapter.from_pretrained(tmp_path / "converted").eval()
    assert loaded.config.mode == "reference" and loaded.config.adapter_weight == 0.25
    x = torch.randn(2, 6, WIDTH)
    with torch.no_grad():
        assert torch.equal(original(x).adapted, loaded(x).adapted)


def test_parameter_counts_at_sd_width():
    fixed = SURAdapter(width=768, mode="fixed")
    reference = SURAdapter(width=768, mode="reference")
    fixed_count = fixed.num_parameters()
    assert 13.9e6 < fixed_count < 14.1e6
    assert fixed.num_inference_parameters() == fixed_count
    assert reference.num_inference_parameters() == fixed_count
    assert 20.0e6 < reference.num_parameters() < 20.2e6


def test_fixed_mode_has_no_unused_parameters():
    adapter = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, teacher_dim=12)
    adapter.fc.weight.data.normal_()  # let gradient reach the encoder through fc
    out = adapter(torch.randn(2, 5, WIDTH))
    teacher = adapter.project_teacher(torch.randn(2, 12))
    (out.adapted.sum() + out.encoder_features.sum() + teacher.sum()).backward()
    unused = [n for n, p in adapter.named_parameters() if p.grad is None or not p.grad.any()]
    assert unused == []


def test_zero_init_fusion_is_scaled_input_plus_bias():
    adapter = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, adapter_weight=0.1).eval()
    assert not adapter.fc.weight.any()
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        out = adapter(x).adapted
    torch.testing.assert_close(out, 0.9 * x + 0.1 * adapter.fc.bias, rtol=0, atol=1e-6)


def test_eta_zero_is_exact_identity():
    adapter = trained_looking(SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, adapter_weight=0.0))
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        assert torch.equal(adapter.eval()(x).adapted, x)


def test_fixed_mode_eval_is_deterministic_and_train_mode_is_not():
    adapter = trained_looking(SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, dropout=0.3))
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        adapter.eval()
        assert torch.equal(adapter(x).adapted, adapter(x).adapted)
        adapter.train()
        assert not torch.equal(adapter(x).adapted, adapter(x).adapted)


def test_fixed_mode_sample_ignores_its_batch_neighbours():
    adapter = trained_looking(SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF)).eval()
    x = torch.randn(3, 6, WIDTH)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    alone = adapter(x[:1], mask[:1]).adapted
    others = torch.randn(4, 6, WIDTH)
    crowd = adapter(torch.cat([x[:1], others]), torch.cat([mask[:1], torch.ones(4, 6).long()]))
    torch.testing.assert_close(crowd.adapted[:1], alone, rtol=0, atol=1e-6)


def test_fixed_mode_padding_is_masked_out():
    adapter = trained_looking(SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF)).eval()
    x = torch.randn(1, 6, WIDTH)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, WIDTH) * 5
    with torch.no_grad():
        a, b = adapter(x, mask).adapted, adapter(y, mask).adapted
        torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
        unmasked = adapter(x).adapted
    assert not torch.allclose(a[:, :4], unmasked[:, :4], atol=1e-4)


def test_save_pretrained_carries_config(tmp_path):
    adapter = SURAdapter(
        width=WIDTH, depth=3, adapter_weight=0.3, num_heads=4, ff_dim=FF, teacher_dim=10
    )
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SURAdapter.from_pretrained(tmp_path)
    for key in ("width", "depth", "adapter_weight", "mode", "teacher_dim"):
        assert loaded.config[key] == adapter.config[key]
    for (name, a), (_, b) in zip(
        adapter.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, init_seed=7)
    after = torch.rand(1)
    b = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, init_seed=7)
    c = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF, init_seed=8)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.attention.query_layer.weight, c.attention.query_layer.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bogus"}, "mode 'bogus'"),
        ({"width": 30, "num_heads": 4}, "not divisible"),
        ({"mode": "reference", "teacher_dim": 8}, "teacher projection"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SURAdapter(**{"width": WIDTH, "ff_dim": FF, **kwargs})


def test_wrong_input_shape_names_the_expected_shape():
    adapter = SURAdapter(width=WIDTH, num_heads=4, ff_dim=FF)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 32\]"):
        adapter(torch.randn(2, 5, 16))
