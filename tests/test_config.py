"""Typed params: profiles load, bad keys name key and file, every field is described."""

from __future__ import annotations

import shutil

import pytest
import yaml
from pydantic import BaseModel

from suradapter.config import Params, ParamsError, TokenMixerParams, load_params, params_section


@pytest.fixture
def params_copy(tmp_path, repo_root):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo_root / "configs", tmp_path / "configs")
    return tmp_path / "params.yaml"


def _edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("profile", ["shapes", "tiny", "sd15"])
def test_every_profile_loads(params_path, profile):
    params = load_params(params_path, profile=profile)
    assert params.profile == profile


def test_overlay_changes_only_what_it_names(params_path):
    shapes, tiny = load_params(params_path), load_params(params_path, profile="tiny")
    assert shapes.profile == "shapes"
    assert tiny.adapter.ff_dim != shapes.adapter.ff_dim
    assert tiny.loss == shapes.loss


def test_profile_from_environment(params_path, monkeypatch):
    monkeypatch.setenv("SUR_PROFILE", "sd15")
    assert load_params(params_path).base_model.dtype == "float16"


def test_unknown_key_names_key_file_and_suggestion(params_copy):
    _edit(params_copy, lambda d: d["adapter"].update(adaptor_weight=0.2))
    with pytest.raises(ParamsError) as err:
        load_params(params_copy)
    message = str(err.value)
    assert "adapter.adaptor_weight" in message and str(params_copy) in message
    assert "did you mean 'adapter_weight'" in message


def test_mistyped_value_names_key_and_file(params_copy):
    _edit(params_copy, lambda d: d["adapter"].update(depth="two"))
    with pytest.raises(ParamsError, match=r"params.yaml: key 'adapter.depth'"):
        load_params(params_copy)


def test_unknown_key_in_an_optional_section_lists_its_keys(params_copy):
    """`adapter.token_mixer` is `TokenMixerParams | None`: its keys are still known."""
    _edit(params_copy, lambda d: d["adapter"]["token_mixer"].update(hiden=32))
    with pytest.raises(ParamsError) as err:
        load_params(params_copy)
    message = str(err.value)
    assert "unknown key 'adapter.token_mixer.hiden' (did you mean 'hidden'?)" in message
    assert "known: depth, fit_rows, hidden, token_hidden, tokens" in message


def test_a_reference_mode_adapter_with_fixed_mode_branches_fails_when_params_load(params_copy):
    _edit(params_copy, lambda d: d["adapter"].update(mode="reference", teacher_dim=64))
    with pytest.raises(ParamsError) as err:
        load_params(params_copy)
    message = str(err.value)
    assert "key 'adapter'" in message
    assert "set teacher_dim: null" in message and "set token_mixer: null" in message


def test_bad_key_in_an_overlay_names_the_overlay(params_copy):
    overlay = params_copy.parent / "configs" / "tiny.yaml"
    _edit(overlay, lambda d: d.update(loss={"denoise": {"gradiant": 1}}))
    with pytest.raises(ParamsError) as err:
        load_params(params_copy, profile="tiny")
    assert "configs/tiny.yaml: unknown key 'loss.denoise.gradiant'" in str(err.value)


def test_unknown_profile_lists_the_known_ones(params_path):
    with pytest.raises(ParamsError, match="known profiles: shapes, sd15, tiny"):
        load_params(params_path, profile="sdxl")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "params.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("adapter: {depth: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if section := params_section(field.annotation):
            yield from _models(section)


def test_every_field_has_a_description():
    assert TokenMixerParams in set(_models(Params))  # optional sections are walked too
    missing = [
        f"{model.__name__}.{name}"
        for model in _models(Params)
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert missing == []


def test_params_file_sets_every_field_explicitly(params_path):
    """params.yaml is the complete default profile: nothing hides in code defaults."""
    raw = yaml.safe_load(params_path.read_text())

    walked = []

    def walk(model: type[BaseModel], data: dict, prefix: str):
        walked.append(model)
        for name, field in model.model_fields.items():
            assert name in data, f"params.yaml lacks '{prefix}{name}'"
            section = params_section(field.annotation)
            if section and data[name] is not None:  # null: an optional section left out
                walk(section, data[name], f"{prefix}{name}.")

    walk(Params, raw, "")
    assert TokenMixerParams in walked  # params.yaml states the token mixer's keys too


def test_the_profile_key_of_the_params_file_applies_its_overlay(params_copy, monkeypatch):
    monkeypatch.delenv("SUR_PROFILE", raising=False)
    _edit(params_copy, lambda d: d.update(profile="tiny"))
    params = load_params(params_copy)
    assert params.profile == "tiny"
    assert params.base_model.id == "tiny"  # from configs/tiny.yaml, not params.yaml


REAL_PROFILE_SECTIONS = (
    "base_model", "adapter", "loss", "prepare", "embed", "encode", "train", "sampling", "export",
    "evaluate",
)  # fmt: skip


def _unset_keys(model: type[BaseModel], data, prefix: str) -> list[str]:
    if not isinstance(data, dict):
        return []  # a section set to null (no token mixer) is stated
    missing = []
    for name, field in model.model_fields.items():
        if name not in data:
            missing.append(f"{prefix}{name}")
        elif section := params_section(field.annotation):
            missing += _unset_keys(section, data[name], f"{prefix}{name}.")
    return missing


def test_the_sd15_profile_states_every_stage_key(repo_root):
    """A real profile is complete: no stage parameter is inherited from the shapes world."""
    overlay = yaml.safe_load((repo_root / "configs" / "sd15.yaml").read_text())
    missing = []
    for section in REAL_PROFILE_SECTIONS:
        model = Params.model_fields[section].annotation
        missing += _unset_keys(model, overlay.get(section), f"{section}.")
    assert missing == []


def test_the_sd15_profile_trains_sd15_not_the_shapes_world(params_path):
    sd15, shapes = load_params(params_path, profile="sd15"), load_params(params_path)
    assert sd15.prepare.resolution == 512 and sd15.prepare.source is None
    assert not sd15.uses_shapes_world and shapes.uses_shapes_world
    assert (sd15.sampling.steps, sd15.sampling.guidance) == (50, 7.5)
    assert sd15.train.mixed_precision is None  # the launcher decides
    assert sd15.adapter.width == 768 and sd15.adapter.token_mixer is None


def test_gates_that_an_identity_adapter_would_pass_are_refused(params_copy):
    gates = {"min_alignment_gain": 0.0, "min_retrieval_gain": 0.0}
    _edit(params_copy, lambda d: d["evaluate"]["gates"].update(gates))
    with pytest.raises(ParamsError, match=r"identity \(untrained\) adapter would pass"):
        load_params(params_copy)


def test_a_temperature_on_a_distance_that_ignores_it_fails_when_params_load(params_copy):
    _edit(params_copy, lambda data: data["loss"]["alignment"].update(temperature=2.0))
    with pytest.raises(ParamsError, match="temperature applies to softmax_kl only; mse ignores"):
        load_params(params_copy)
    params = load_params(params_copy, profile="sd15")
    assert params.loss.alignment.distance == "softmax_kl"
    assert params.loss.alignment.softmax_temperature == 1.0
