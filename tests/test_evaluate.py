"""`sur evaluate`: the metrics' math, the gates, the CLI end to end on the tiny profile, and
the comparison with `@production` (in `sur evaluate`, and in promotion's head-to-head) on a
real MLflow server with S3 artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import servers
import torch
import yaml
from conftest import build_tiny_project

from suradapter.config import GateParams, load_params
from suradapter.evaluate.alignment import alignment_scores
from suradapter.evaluate.gates import decide_gates
from suradapter.evaluate.oracle import OracleScore
from suradapter.evaluate.semantic import closure_by_figure, gap_closure

BIN = Path(sys.executable).parent


def score(count: float, colour: float, shape: float, all_three: float = 0.0) -> OracleScore:
    return OracleScore(count, colour, shape, all=all_three, n=10)


def test_gap_closure_averages_only_attributes_with_a_real_gap():
    base_keyword, base_narrative = score(0.9, 1.0, 0.50, 0.5), score(0.4, 0.2, 0.45, 0.1)
    adapter = score(0.8, 0.4, 0.9, 0.3)
    closures = closure_by_figure(base_keyword, base_narrative, adapter, min_gap_points=10)
    assert closures["count"] == pytest.approx(0.4 / 0.5)
    assert closures["colour"] == pytest.approx(0.2 / 0.8)
    assert closures["shape"] is None  # a 5-point gap: nothing to close
    assert closures["all"] == pytest.approx(0.2 / 0.4)  # all three right at once
    closure, used = gap_closure(closures)
    assert used == ["count", "colour"]
    assert closure == pytest.approx((0.4 / 0.5 + 0.2 / 0.8) / 2)
    worse, _ = gap_closure(closure_by_figure(base_keyword, base_narrative, score(0.3, 0.1, 0), 10))
    assert worse < 0
    same = closure_by_figure(base_keyword, base_keyword, adapter, 10)
    assert gap_closure(same) == (None, []) and same["all"] is None


def test_alignment_scores_rank_the_own_keyword_first():
    keywords = torch.nn.functional.normalize(torch.randn(5, 12), dim=1)
    own = torch.tensor([0, 1, 2, 3, 4, 0])
    exact = alignment_scores(keywords[own], keywords, own)
    assert exact == pytest.approx({"cosine": 1.0, "retrieval_top1": 1.0})
    shifted = alignment_scores(keywords[(own + 1) % 5], keywords, own)
    assert shifted["retrieval_top1"] == 0.0
    assert shifted["cosine"] < 1.0


def _metrics(closure, base_kw, adapter_kw, denoise_increase, retrieval, margin=None) -> dict:
    """Evaluation metrics as `evaluate_adapter` writes them; the base retrieves 0.2 at a
    cosine of 0.6, and the adapter's cosine rises with its retrieval."""
    metrics = {
        "gap_closure_measured": True,
        "gap_closure": closure,
        "keyword_accuracy": {"base": base_kw, "adapter": adapter_kw},
        "denoise": {"keyword": {"relative_increase": denoise_increase}},
        "alignment": {
            "cosine": {"base": 0.6, "adapter": 0.6 + (retrieval - 0.2) / 2},
            "retrieval_top1": {"base": 0.2, "adapter": retrieval},
        },
    }
    if margin is not None:
        metrics["production_margin"] = margin
    return metrics


def test_gates_follow_the_thresholds_in_params():
    gates = GateParams(min_gap_closure=0.6, max_keyword_drop=0.02, max_denoise_increase=0.05)
    good = decide_gates(_metrics(0.7, 0.9, 0.89, 0.01, 0.5), gates)
    assert [g.name for g in good] == [
        "gap_closure", "keyword_accuracy_drop", "denoise_loss_increase", "alignment_gain",
        "retrieval_gain",
    ]  # fmt: skip
    assert all(g.passed for g in good)
    gains = {g.name: g.value for g in good if g.name.endswith("_gain")}
    assert gains == pytest.approx({"alignment_gain": 0.15, "retrieval_gain": 0.3})
    bad = {g.name: g for g in decide_gates(_metrics(0.5, 0.9, 0.85, 0.01, 0.5, -0.1), gates)}
    assert not bad["gap_closure"].passed and bad["gap_closure"].value == 0.5
    assert not bad["keyword_accuracy_drop"].passed
    assert bad["keyword_accuracy_drop"].value == pytest.approx(0.05)
    assert not bad["margin_over_production"].passed
    assert "FAILED" in bad["gap_closure"].describe()
    unmeasured = {g.name: g for g in decide_gates(_metrics(None, 0.9, 0.9, 0.0, 0.5), gates)}
    assert not unmeasured["gap_closure"].passed  # no qualifying attribute never passes


@pytest.mark.parametrize("profile", ["shapes", "tiny", "sd15"])
def test_an_identity_adapter_fails_the_gates_of_every_profile(params_path, profile):
    """eta = 0 (or an untrained adapter): the same embeddings as the base, so no gain at all;
    outside the shapes world no oracle figure exists either."""
    gates = load_params(params_path, profile=profile).evaluate.gates
    for oracle in (True, False):
        identity = _metrics(0.0, 0.9, 0.9, 0.0, 0.2) | {"gap_closure_measured": oracle}
        verdict = {g.name: g.passed for g in decide_gates(identity, gates)}
        assert not all(verdict.values()), verdict
        assert verdict["denoise_loss_increase"] and not verdict["retrieval_gain"]


@pytest.fixture(scope="module")
def eval_project(tmp_path_factory, repo_root) -> Path:
    """Tiny profile: the prepared shapes samples, embedded, and a 6-step adapter."""
    from suradapter.train.adapter import train_adapter

    root = tmp_path_factory.mktemp("eval-project")
    evaluate = {
        "adapter_dir": str(root / "adapter"),
        "output_dir": str(root / "eval"),
        "grid_prompts": 2,
    }
    path = build_tiny_project(root, repo_root, {"max_steps": 6}, evaluate=evaluate)
    train_adapter(load_params(path, profile="tiny"))
    return path


def _evaluate(params_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "sur"), "--params", str(params_path), "--profile", "tiny", "evaluate"]
    return subprocess.run(
        [*command, "--no-production", *args],
        cwd=params_path.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_failing_gate_exits_non_zero_and_names_it(eval_project):
    done = _evaluate(eval_project)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gap_closure: FAILED" in done.stdout
    report = json.loads((eval_project.parent / "eval/report.json").read_text())
    assert report["passed"] is False
    gate = next(g for g in report["gates"] if g["name"] == "gap_closure")
    assert set(gate) >= {"name", "passed", "value", "threshold"} and gate["threshold"] == 0.6
    metrics = report["metrics"]
    for name in ("narrative_accuracy", "template_accuracy", "keyword_accuracy"):
        assert set(metrics[name]) == {"base", "adapter"}
    assert set(metrics["semantic"]) == {
        "keyword", "narrative_heldout_combinations", "narrative_heldout_templates"
    }  # fmt: skip
    closures = metrics["gap_closure_by_figure"]
    assert set(closures) == {"count", "colour", "shape", "all"}
    keyword, narrative = (
        metrics["semantic"][s] for s in ("keyword", "narrative_heldout_combinations")
    )
    for name, closure in closures.items():  # the share of each figure's gap the adapter closed
        gap = keyword["base"][name] - narrative["base"][name]
        gain = narrative["adapter"][name] - narrative["base"][name]
        assert closure == (pytest.approx(gain / gap) if gap * 100 >= 10 else None), name
    assert "all three right at once" in (eval_project.parent / "eval/report.md").read_text()
    assert metrics["clip_score_note"].startswith("skipped")
    files = {p.name for p in (eval_project.parent / "eval").iterdir()}
    assert {"report.md", "attributes.png", "grid.png"} <= files
    assert set(metrics["alignment"]["retrieval_top1"]) == {"base", "adapter"}


def test_passing_report_plots_and_mlflow_run(eval_project, tiny_clip):
    """A non-shapes source (as in the real profile): alignment and denoising gates only."""
    raw = yaml.safe_load(eval_project.read_text())
    raw["shapes"]["output_dir"] = str(eval_project.parent / "not-the-source")
    raw["evaluate"].update(clip_model=str(tiny_clip), clip_prompts=2)
    raw["evaluate"]["gates"].update(
        min_gap_closure=-100.0,
        max_keyword_drop=1.0,
        max_denoise_increase=100.0,
        min_alignment_gain=0.01,  # a 6-step adapter moves the cosine a little
        min_retrieval_gain=0.0,
    )
    eval_project.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = _evaluate(eval_project)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = eval_project.parent / "eval"
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is True and all(g["passed"] for g in report["gates"])
    gates = {g["name"] for g in report["gates"]}
    assert gates == {"denoise_loss_increase", "alignment_gain", "retrieval_gain"}
    assert report["metrics"]["semantic"] is None
    assert set(report["metrics"]["clip_score"]) == {"base", "adapter"}
    assert "PASSED" in (folder / "report.md").read_text()
    mlflow.set_tracking_uri(raw["train"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["sur-adapter"], output_format="list")
    latest = max(runs, key=lambda run: run.info.start_time)
    assert latest.data.tags["gate_verdict"] == "passed"
    assert latest.data.metrics["passed"] == 1.0
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(latest.info.run_id, "eval")}
    assert {"eval/report.json", "eval/report.md"} <= names


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_pipeline) -> Path:
    """A tiny random CLIP model with a processor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, max_position_embeddings=32, vocab_size=49408),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(
        image_processor=image_processor, tokenizer=tiny_pipeline.tokenizer
    ).save_pretrained(folder)
    return folder


def test_clip_score_is_bounded_deterministic_and_per_model(tiny_clip, tiny_pipeline, tiny_params):
    from suradapter.evaluate.clip_score import clip_scores, load_clip
    from suradapter.model.adapter import SURAdapter
    from suradapter.model.text_path import AdaptedTextPath

    sampling = tiny_params.sampling
    adapter = SURAdapter.for_pipeline(tiny_params.adapter, tiny_pipeline).eval()
    with torch.no_grad():
        adapter.fc.weight.normal_(0, 1.0)  # a non-trivial adapter: its images differ
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, adapter)
    prompts = ["a trio of fire-truck coloured coins", "two lemon-coloured floor tiles"]
    models = {"base": None, "adapter": path.pipeline_embeds}
    clip = load_clip(tiny_clip)
    first = clip_scores(clip, tiny_pipeline, prompts, models, sampling)
    assert set(first) == {"base", "adapter"}
    assert all(0.0 <= value <= 100.0 for value in first.values())
    assert clip_scores(clip, tiny_pipeline, prompts, models, sampling) == first
    assert first["base"] != first["adapter"]
    with pytest.raises(FileNotFoundError, match=r"evaluate\.clip_model"):
        load_clip(tiny_clip / "missing")


# ------------------------------------------- against @production, on a real registry server

PERMISSIVE_GATES = {  # a few-step adapter passes these, so the margin alone decides below
    "min_gap_closure": -100.0,
    "max_keyword_drop": 1.0,
    "max_denoise_increase": 100.0,
    "min_alignment_gain": 0.001,
    "min_retrieval_gain": 0.0,
    "min_margin_over_production": 0.0,
}


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory):
    """An MLflow server (SQLite) whose artifacts live on a local S3 server."""
    root = tmp_path_factory.mktemp("eval-registry")
    with (
        pytest.MonkeyPatch.context() as patch,
        servers.registry_servers(root, patch.setenv) as (url, _),
    ):
        yield url


def registry_params(eval_project: Path, url: str, name: str, shapes_world: bool) -> Path:
    """The eval project's params with tracking on `url`, model `name`, permissive gates and an
    output folder of their own; `shapes_world` False scores alignment and denoising only (in
    the tiny profile the oracle finds no keyword-narrative gap, so gap closure never passes)."""
    root, label = eval_project.parent, f"{name}-{'shapes' if shapes_world else 'alignment'}"
    raw = yaml.safe_load(eval_project.read_text())
    source = raw["prepare"]["source"]
    raw["shapes"]["output_dir"] = source if shapes_world else str(root / "not-the-source")
    raw["train"]["tracking_uri"] = url
    raw["registry"]["model_name"] = name
    raw["evaluate"].update(output_dir=str(root / f"eval-{label}"), clip_model=None)
    raw["evaluate"]["gates"].update(PERMISSIVE_GATES)
    path = root / f"params-{label}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def evaluated_and_registered(params, adapter_dir: Path, folder: Path):
    """Evaluate `adapter_dir` as the DVC stage does (against the base only), export it, and
    register the three folders; returns (RegisteredVersion, report)."""
    from suradapter.evaluate.report import write_report
    from suradapter.evaluate.run import evaluate_adapter, load_adapter
    from suradapter.export.onnx_export import export_text_path
    from suradapter.model.text_path import AdaptedTextPath
    from suradapter.model.zoo import load_base_from_params
    from suradapter.registry import register_version

    result = evaluate_adapter(params, adapter_dir, grid=False)
    write_report(folder / "eval", result.report, None)
    pipeline = load_base_from_params(params.base_model)
    path = AdaptedTextPath.from_pipeline(pipeline, load_adapter(adapter_dir))
    export_text_path(path, params.export, folder / "export", adapter_dir, params.base_model.id)
    registered = register_version(params, adapter_dir, folder / "export", folder / "eval")
    assert registered.passed, registered.reasons
    return registered, result.report


def test_sur_evaluate_compares_with_the_production_version(
    eval_project, registry_url, tmp_path, repo_root, monkeypatch
):
    """`sur evaluate` (default --production) with a version in @production: here the same
    adapter, so the production model must get the adapter's own figures, in the shapes world
    (oracle) as outside it."""
    from suradapter.registry import promote

    monkeypatch.chdir(repo_root)  # lineage of the registered version: this repo's dvc.lock
    name = "sur-eval-production"
    path = registry_params(eval_project, registry_url, name, shapes_world=False)
    params = load_params(path, profile="tiny")
    adapter = Path(params.evaluate.adapter_dir)
    version = evaluated_and_registered(params, adapter, tmp_path)[0].version
    promote(params, version)

    for shapes_world in (False, True):
        path = registry_params(eval_project, registry_url, name, shapes_world=shapes_world)
        command = [str(BIN / "sur"), "--params", str(path), "--profile", "tiny", "evaluate"]
        done = subprocess.run(
            [*command, "--no-gate-exit"],  # shapes world: gap closure is not measurable here
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "margin_over_production: passed (0.0000 >= 0)" in done.stdout, done.stdout
    params = load_params(path, profile="tiny")
    report = json.loads((Path(params.evaluate.output_dir) / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["production_version"] == version
    for accuracy in ("narrative_accuracy", "keyword_accuracy"):
        assert metrics[accuracy]["production"] == metrics[accuracy]["adapter"]
    for figure in ("cosine", "retrieval_top1"):
        assert metrics["alignment"][figure]["production"] == metrics["alignment"][figure]["adapter"]
    margin = next(g for g in report["gates"] if g["name"] == "margin_over_production")
    assert margin["value"] == 0.0 and margin["passed"]
    assert metrics["production_margin_basis"].startswith("narrative accuracy")


def test_promotion_over_production_needs_a_real_head_to_head_win(
    eval_project, registry_url, tmp_path, repo_root, monkeypatch
):
    """A 6-step adapter (worse) and a 24-step one (better), both passing the gates on their
    own: the better one replaces the worse in production; the worse never replaces the
    better, and production stays. Outside the shapes world the margin is the smaller of the
    alignment cosine and retrieval top-1 leads."""
    from mlflow.tracking import MlflowClient

    from suradapter.registry import ProductionNotImproved, promote, registry_status
    from suradapter.train.adapter import train_adapter

    monkeypatch.chdir(repo_root)
    name = "sur-eval-margin"
    path = registry_params(eval_project, registry_url, name, shapes_world=False)
    params = load_params(path, profile="tiny")
    root = eval_project.parent
    train = params.train.model_copy(
        update={
            "max_steps": 24,
            "checkpoint_every": 100,
            "output_dir": str(root / "adapter-better"),
            "checkpoint_dir": str(root / "ckpt-better"),
        }
    )
    train_adapter(params.model_copy(update={"train": train}))
    worse, worse_report = evaluated_and_registered(
        params, Path(params.evaluate.adapter_dir), tmp_path / "worse"
    )
    better, better_report = evaluated_and_registered(
        params, Path(train.output_dir), tmp_path / "better"
    )
    figures = {
        label: {
            f: report["metrics"]["alignment"][f]["adapter"] for f in ("cosine", "retrieval_top1")
        }
        for label, report in (("worse", worse_report), ("better", better_report))
    }
    cosine = {label: values["cosine"] for label, values in figures.items()}
    assert cosine["better"] > cosine["worse"] + 0.02, figures  # a real difference
    assert figures["better"]["retrieval_top1"] >= figures["worse"]["retrieval_top1"], figures

    assert promote(params, worse.version).challenge is None  # nothing in production yet
    promoted = promote(params, better.version)
    challenge = promoted.challenge
    assert promoted.production == better.version and challenge.passed
    assert challenge.note == "evaluated head to head on this project's held-out data"
    assert challenge.margin is not None and challenge.margin >= 0.0
    head_to_head = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=challenge.run_id, artifact_path="challenge/report.json"
            )
        ).read_text()
    )
    alignment = head_to_head["metrics"]["alignment"]
    # the same held-out rows and seed as each version's own report: the same figures
    assert alignment["cosine"]["adapter"] == cosine["better"]
    assert alignment["cosine"]["production"] == cosine["worse"]
    assert head_to_head["metrics"]["production_margin"] == challenge.margin

    with pytest.raises(ProductionNotImproved) as err:
        promote(params, worse.version)
    message = str(err.value)
    assert message.startswith(f"version {worse.version} of {name} cannot be promoted: ")
    assert f"does not beat production version {better.version}: margin -" in message
    assert message.endswith(f"@production stays at version {better.version}")
    assert registry_status(params)["production"] == better.version
    tags = MlflowClient(registry_url).get_model_version(name, worse.version).tags
    assert tags["challenge.verdict"] == "failed"
    assert tags["challenge.production_version"] == better.version
    lead = min(figures["worse"][f] - figures["better"][f] for f in ("cosine", "retrieval_top1"))
    assert float(tags["challenge.margin"]) == pytest.approx(lead) and lead < 0


def test_the_report_writer_refuses_a_report_that_breaks_the_contract(tmp_path):
    from test_registry import make_report

    from suradapter.evaluate.report import ReportError, read_report, write_report

    good = make_report("a" * 64)
    good["metrics"] |= {"clip_score": None, "clip_score_note": " (skipped)"}
    broken = good | {"gates": [{"name": "gap_closure", "passed": "yes"}]}
    with pytest.raises(ValueError, match=r"breaks its contract: gates\.0\.passed"):
        write_report(tmp_path / "eval", broken, None)
    assert not (tmp_path / "eval").exists()  # nothing half-written
    write_report(tmp_path / "eval", good, None)
    assert read_report(tmp_path / "eval") == good
    (tmp_path / "eval" / "report.json").write_text(json.dumps(good | {"passed": "true"}))
    with pytest.raises(ReportError, match=r"report.json does not follow the report contract"):
        read_report(tmp_path / "eval")
