"""The real-model path: exact SD1.5/SD2.1/LLaMA-13B architectures, zoo folders that load like
downloads, the sd15 profile's checks, every stage through the sd15 profile on the SD1.5
architecture family scaled down, the doctor, and stages that run where they are told."""

from __future__ import annotations

import contextlib
import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from suradapter.config import EmbedParams, load_params
from suradapter.model.architectures import build_architecture
from suradapter.model.specs import architecture_spec

MINI_SIDE = 64  # native size of sd15-mini: UNet sample 8 x VAE downsampling 8


def _meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of an architecture, built on the meta device (no memory, no init)."""
    spec = architecture_spec(name)
    with torch.device("meta"):
        if spec["kind"] == "teacher":
            config = {k: v for k, v in spec["model"].items() if k != "class"}
            return {"model": LlamaModel(LlamaConfig(**config)).num_parameters()}
        return {
            "unet": UNet2DConditionModel(**spec["unet"]).num_parameters(),
            "vae": AutoencoderKL(**spec["vae"]).num_parameters(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).num_parameters(),
        }


def test_the_zoo_declares_the_real_architectures():
    """The published parameter counts of SD1.5, SD2.1 and LLaMA-13B, to the parameter."""
    assert _meta_counts("sd15") == {
        "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480
    }  # fmt: skip
    assert _meta_counts("sd21") == {
        "unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840
    }  # fmt: skip
    # LLaMA-13B is 13,015,864,320 with its 32,000 x 5,120 LM head; the teacher has no head.
    assert _meta_counts("llama-13b")["model"] + 32_000 * 5_120 == 13_015_864_320
    sd15, sd21 = architecture_spec("sd15"), architecture_spec("sd21")
    assert sd15["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd15["unet"]["cross_attention_dim"] == sd15["text_encoder"]["hidden_size"] == 768
    assert sd15["text_encoder"]["num_hidden_layers"] == 12
    assert sd15["tokenizer"]["model_max_length"] == 77
    assert sd21["scheduler"]["prediction_type"] == "v_prediction"
    assert sd21["unet"]["cross_attention_dim"] == 1024 and sd21["tokenizer"]["pad_token"] == "!"


@pytest.fixture(scope="module")
def vocabulary(repo_root) -> Path:
    return repo_root / "models/shapes-base/tokenizer"  # the real CLIP BPE, shipped


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, vocabulary) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    for name in ("sd15-mini", "llama-tiny"):
        build_architecture(name, root / name, vocabulary)
    return {name: root / name for name in ("sd15-mini", "llama-tiny")}


def test_a_zoo_folder_loads_like_a_download_and_is_seeded(zoo, tmp_path, vocabulary):
    from suradapter.model.zoo import load_base_pipeline, native_resolution

    pipeline = load_base_pipeline(str(zoo["sd15-mini"]))
    assert native_resolution(pipeline) == MINI_SIDE
    assert type(pipeline.scheduler).__name__ == "PNDMScheduler"
    ids = pipeline.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's own ids
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    record = json.loads((zoo["sd15-mini"] / "zoo.json").read_text())
    assert record["architecture"] == "sd15-mini" and "random" in record["weights"]
    weights = "unet/diffusion_pytorch_model.safetensors"
    build_architecture("sd15-mini", tmp_path / "again", vocabulary)
    build_architecture("sd15-mini", tmp_path / "other", vocabulary, seed=1)
    same = (zoo["sd15-mini"] / weights).read_bytes()
    assert (tmp_path / "again" / weights).read_bytes() == same
    assert (tmp_path / "other" / weights).read_bytes() != same


def test_the_llama_teacher_loads_offline_without_a_pad_token(zoo):
    from suradapter.teacher.model import extract_features, load_teacher

    tokenizer = AutoTokenizer.from_pretrained(zoo["llama-tiny"])
    assert tokenizer.pad_token is None  # as LLaMA's tokenizers come
    ids = tokenizer("a woman in a white dress").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    teacher = load_teacher(EmbedParams(model=str(zoo["llama-tiny"]), max_length=32))
    assert type(teacher.model).__name__ == "LlamaModel" and teacher.fingerprint["layer"] == 1
    texts = ["a woman in a white dress with angel wings", "a cat", "two red coins in the snow"]
    batched = extract_features(teacher, texts)
    singles = torch.cat([extract_features(teacher, [text]) for text in texts])
    assert batched.shape == (3, 32)
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)  # padding never counts


def test_a_layer_the_teacher_lacks_names_both(zoo):
    from suradapter.teacher.model import teacher_fingerprint

    with pytest.raises(ValueError, match=r"embed\.layer is 39, .* has 2 layers"):
        teacher_fingerprint(EmbedParams(model=str(zoo["llama-tiny"]), layer=39))


def test_training_finds_the_teacher_cache_without_the_teacher(zoo, tmp_path):
    """`sur train` opens the namespace `sur embed` recorded: no model built, no weights read."""
    from suradapter.teacher.cache import text_key
    from suradapter.teacher.embed import open_cache, run_embed

    teacher = tmp_path / "teacher"
    shutil.copytree(zoo["llama-tiny"], teacher)
    params = EmbedParams(model=str(teacher), cache_dir=str(tmp_path / "cache"), max_length=32)
    with pytest.raises(FileNotFoundError, match="run `sur embed`"):
        open_cache(params)
    texts = ["a cat", "a dog on a sofa"]
    run_embed(params, texts=texts)
    (teacher / "model.safetensors").unlink()  # a reader that loaded or hashed it would fail
    cache = open_cache(params)
    assert cache.get([text_key(t) for t in texts]).shape == (2, 32)


def test_stages_run_on_the_device_they_are_told(zoo, tiny_params, tmp_path, monkeypatch):
    from suradapter.devices import process_device
    from suradapter.evaluate.run import load_models
    from suradapter.model.adapter import SURAdapter
    from suradapter.model.zoo import load_base_from_params
    from suradapter.teacher.model import load_teacher

    assert process_device() == torch.device("cpu")  # no GPU here: the CPU stays the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU we cannot have here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device() == torch.device("cuda", 1)  # each launcher process its own GPU
    assert process_device("cpu") == torch.device("cpu")
    monkeypatch.undo()

    meta = torch.device("meta")
    teacher = load_teacher(EmbedParams(model=str(zoo["llama-tiny"])), meta)
    assert {p.device for p in teacher.model.parameters()} == {meta}
    pipeline = load_base_from_params(tiny_params.base_model)
    SURAdapter.for_pipeline(tiny_params.adapter, pipeline).save_pretrained(tmp_path / "adapter")
    base, models = load_models(tiny_params, tmp_path / "adapter", None, meta)
    placed = [base.unet, base.vae, base.text_encoder, models["adapter"].adapter]
    assert all({p.device for p in module.parameters()} == {meta} for module in placed)


@pytest.fixture(scope="module")
def surd(tmp_path_factory, tiny_params) -> Path:
    """A SURD folder of 48 rendered scenes at the mini model's native 64 px."""
    from suradapter.data.shapes import generate_shapes_dataset

    shapes = tiny_params.shapes.model_copy(
        update={"image_size": MINI_SIDE, "object_size": (16, 24), "min_gap": 4}
    )
    return generate_shapes_dataset(shapes, tmp_path_factory.mktemp("surd") / "surd", 48)


@pytest.fixture(scope="module")
def sd15_project(tmp_path_factory, repo_root, zoo, surd) -> Path:
    """The repo's params and profiles, with configs/sd15.yaml pointed at the scaled-down
    SD1.5-family model, the LLaMA test teacher and the SURD folder; sizes set to fit them."""
    root = tmp_path_factory.mktemp("sd15-project")
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    shutil.copytree(repo_root / "configs", root / "configs")
    overlay_path = root / "configs/sd15.yaml"
    overlay = yaml.safe_load(overlay_path.read_text())
    overlay["base_model"]["id"] = str(zoo["sd15-mini"])
    overlay["embed"]["model"] = str(zoo["llama-tiny"])
    overlay["adapter"].update(width=32, teacher_dim=32, num_heads=4, ff_dim=64)
    overlay["prepare"].update(
        source=str(surd), resolution=MINI_SIDE, min_image_size=32,
        val_fraction=0.1, test_fraction=0.3,
    )  # fmt: skip
    overlay["train"].update(max_steps=2, batch_size=4, grid_prompts=1, loader_workers=0)
    overlay["encode"]["loader_workers"] = 0  # worker processes are tested with the shapes world
    overlay["sampling"].update(steps=2)
    overlay["export"]["external_data_mb"] = 1  # the mini text path (6 MB) goes external too
    overlay["evaluate"].update(alignment_rows=16, denoise_batches=1)
    overlay_path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return root


@dataclass
class Ran:
    returncode: int
    stdout: str


def _sur(project: Path, *args: str, profile: str = "sd15") -> Ran:
    """`sur --params <project>/params.yaml --profile P ARGS`, run from `project` by the real
    CLI in this process (no interpreter start-up per stage)."""
    import mlflow
    from typer.testing import CliRunner

    from suradapter.cli import app

    env = {"COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{project}/ml.db"}
    command = ["--params", str(project / "params.yaml"), "--profile", profile, *args]
    with contextlib.chdir(project):
        result = CliRunner().invoke(app, command, env=env)
    mlflow.set_tracking_uri(None)  # the stage set it for this process
    crash = result.exception and not isinstance(result.exception, SystemExit)
    trace = "".join(traceback.format_exception(result.exception)) if crash else ""
    return Ran(result.exit_code, result.output + trace)


def test_every_stage_runs_through_the_sd15_profile(sd15_project):
    """prepare -> embed -> encode -> train -> export -> evaluate on the SD1.5 family."""
    for stage in ("prepare", "embed", "encode", "train", "export"):
        done = _sur(sd15_project, stage)
        assert done.returncode == 0, f"{stage}\n{done.stdout}"
    summary = json.loads((sd15_project / "data/prepared/summary.json").read_text())
    assert summary["resolution"] == MINI_SIDE and summary["kept"] == 48
    export = json.loads((sd15_project / "outputs/export/export.json").read_text())
    assert (
        export["external_data"] and (sd15_project / "outputs/export/text_path.onnx.data").is_file()
    )
    assert export["parity_max_abs_diff"] <= export["parity_tolerance"] == 1e-4
    assert export["max_length"] == "77"
    evaluated = _sur(sd15_project, "evaluate", "--no-production", "--no-gate-exit")
    assert evaluated.returncode == 0, evaluated.stdout
    report = json.loads((sd15_project / "outputs/eval/report.json").read_text())
    gates = {gate["name"] for gate in report["gates"]}
    assert gates == {"denoise_loss_increase", "alignment_gain", "retrieval_gain"}
    assert report["metrics"]["semantic"] is None  # no oracle outside the shapes world


@pytest.mark.parametrize("eta", [0.1, 0.0])
def test_an_untrained_or_identity_adapter_fails_the_sd15_gates(sd15_project, tmp_path, eta):
    from suradapter.evaluate.run import evaluate_adapter
    from suradapter.model.adapter import SURAdapter

    params = load_params(sd15_project / "params.yaml", profile="sd15")
    params = params.model_copy(
        update={
            "prepare": params.prepare.model_copy(update={"output_dir": str(tmp_path / "p")}),
            "embed": params.embed.model_copy(
                update={"manifest": str(tmp_path / "p/manifest.parquet")}
            ),
        }
    )
    from suradapter.data.prepare import prepare_dataset

    prepare_dataset(params.prepare)
    adapter_params = params.adapter.model_copy(update={"adapter_weight": eta})
    SURAdapter.from_params(adapter_params).save_pretrained(tmp_path / "untrained")
    result = evaluate_adapter(params, tmp_path / "untrained")
    failed = {gate.name for gate in result.failed_gates}
    assert not result.passed and {"alignment_gain", "retrieval_gain"} <= failed
    if eta == 0.0:  # the identity: no gain at all
        assert [g.value for g in result.gates if g.name.endswith("_gain")] == [0.0, 0.0]


def test_the_doctor_runs_every_stage_and_projects_the_full_run(sd15_project, tmp_path):
    figures = tmp_path / "doctor.json"
    done = _sur(sd15_project, "doctor", "--rows", "12", "--batch-size", "2", "--json", str(figures))
    assert done.returncode == 0, done.stdout
    report = json.loads(figures.read_text())
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert list(stages) == ["prepare", "embed", "encode", "train", "export", "evaluate"]
    train = stages["train"]
    assert train["units"] == 2 and train["full_units"] == 2  # the profile's max_steps
    assert train["unit_scale"] == 2.0  # the dry run's batch 2, the profile's batch 4
    assert train["figures"]["samples_per_second"] == pytest.approx(2 / train["seconds_per_unit"])
    assert stages["prepare"]["units"] == 12 and stages["prepare"]["full_units"] == 48
    for stage in stages.values():
        assert stage["device"] == "cpu" and stage["peak_memory_bytes"] > 0
        work = stage["seconds_per_unit"] * stage["unit_scale"] * stage["full_units"]
        assert stage["projected_seconds"] == pytest.approx(stage["fixed_seconds"] + work)
    assert report["projected_seconds"] == pytest.approx(
        sum(stage["projected_seconds"] for stage in stages.values())
    )
    assert report["gate_verdict"]["passed"] is False
    assert "full run, projected" in done.stdout and "doctor: ok" in done.stdout
    assert not (sd15_project / "outputs/adapter.doctor").exists()


def test_the_doctor_names_every_config_mistake_before_running(repo_root, tmp_path):
    """The repo's sd15 profile as shipped: no SURD source yet, the teacher not on this machine."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    shutil.copytree(repo_root / "configs", project / "configs")
    done = _sur(project, "doctor")
    assert done.returncode == 1
    assert "prepare.source is not set" in done.stdout
    assert "embed.model 'huggyllama/llama-13b' could not be loaded" in done.stdout


def test_a_resolution_or_source_that_does_not_fit_the_base_model_is_refused(sd15_project):
    from suradapter.checks import ConfigMistake, check_base_resolution, surd_source

    params = load_params(sd15_project / "params.yaml", profile="sd15")
    check_base_resolution(params)
    wrong = params.model_copy(
        update={"prepare": params.prepare.model_copy(update={"resolution": 512})}
    )
    with pytest.raises(ConfigMistake, match=r"512 px .* built for 64 px"):
        check_base_resolution(wrong)
    shapes_world = Path(wrong.shapes.output_dir)
    with pytest.raises(ConfigMistake, match="is the shapes world"):
        surd_source(wrong, shapes_world)
    done = _sur(sd15_project, "prepare", "--source", str(shapes_world))
    assert done.returncode == 2 and "is the shapes world" in done.stdout


def test_sur_zoo_lists_the_architectures_and_builds_one(tmp_path, repo_root, monkeypatch):
    from typer.testing import CliRunner

    from suradapter.cli import app

    monkeypatch.chdir(repo_root)  # the shipped base's tokenizer is the default vocabulary
    runner = CliRunner()
    listed = runner.invoke(app, ["zoo", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    assert all(name in listed.stdout for name in ("sd15", "sd21", "llama-13b", "sd15-mini"))
    built = runner.invoke(app, ["zoo", "build", "llama-tiny", str(tmp_path / "teacher")])
    assert built.exit_code == 0, built.stdout
    assert json.loads((tmp_path / "teacher/zoo.json").read_text())["kind"] == "teacher"
    unknown = runner.invoke(app, ["zoo", "build", "sdxl", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "not a known architecture" in unknown.stdout
    no_layers = runner.invoke(
        app, ["zoo", "build", "sd15-mini", str(tmp_path / "y"), "--layers", "1"]
    )
    assert no_layers.exit_code == 2 and "--layers applies to teachers" in no_layers.stdout


def test_the_doctor_starts_from_an_empty_scratch_folder(tmp_path):
    """Features or images left by an earlier dry run would fake its timings."""
    from suradapter.doctor import DoctorError, fresh_workdir

    scratch = tmp_path / "scratch"
    fresh_workdir(scratch)
    (scratch / "teacher_cache").mkdir()
    fresh_workdir(scratch)  # its own folder: emptied
    assert [p.name for p in scratch.iterdir()] == [".sur-doctor"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("not the doctor's")
    with pytest.raises(DoctorError, match="not empty"):
        fresh_workdir(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").is_file()


def test_a_teacher_dim_that_is_not_the_teachers_width_names_both(sd15_project):
    from suradapter.checks import ConfigMistake, check_teacher
    from suradapter.teacher.model import checked_teacher_dim

    assert checked_teacher_dim(None, 32, "t") == checked_teacher_dim(32, 32, "t") == 32
    params = load_params(sd15_project / "params.yaml", profile="sd15")
    check_teacher(params)
    wrong = params.model_copy(
        update={"adapter": params.adapter.model_copy(update={"teacher_dim": 5120})}
    )
    with pytest.raises(ConfigMistake, match=r"teacher_dim is 5120, .* gives 32-d features"):
        check_teacher(wrong)
