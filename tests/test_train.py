"""Adapter training: only the adapter learns, losses fall, SIGKILL + resume reproduces an
uninterrupted run exactly, two processes train together, and MLflow gets what people read."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from suradapter.config import load_params
from suradapter.tracking import EXPERIMENT_KIND_TAG

BIN = Path(sys.executable).parent


def _params(path: Path, **train):
    params = load_params(path, profile="tiny")
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def _sur(params_path: Path, *args: str, **popen) -> subprocess.Popen:
    command = [str(BIN / "sur"), "--params", str(params_path), "--profile", "tiny", *args]
    return subprocess.Popen(command, cwd=params_path.parent, **popen)


def test_only_the_adapter_gets_gradients(tiny_project):
    from suradapter.data.pairs import AdapterTrainingData
    from suradapter.model.adapter import SURAdapter
    from suradapter.model.zoo import load_base_from_params
    from suradapter.teacher.embed import open_cache
    from suradapter.train.adapter import frozen_parts, step_loss

    params = _params(tiny_project)
    pipeline = load_base_from_params(params.base_model)
    frozen = frozen_parts(pipeline, torch.device("cpu"), torch.float32)
    data = AdapterTrainingData(
        Path(params.embed.manifest), pipeline.tokenizer, open_cache(params.embed)
    )
    adapter_params = params.adapter.model_copy(update={"teacher_dim": data.teacher.shape[1]})
    adapter = SURAdapter.for_pipeline(adapter_params, pipeline)
    rows, dropped = torch.arange(8), torch.tensor([False] * 6 + [True] * 2)
    terms = step_loss(
        params,
        adapter,
        frozen,
        data.batch(rows, dropped),
        dropped,
        torch.Generator().manual_seed(0),
        None,
    )
    terms.total.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    for module in (frozen.text_encoder, frozen.unet, frozen.vae):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(torch.isfinite(v) for v in (terms.denoise, terms.llm_distill, terms.alignment))
    kept = params.loss.preservation.weight
    assert kept > 0 and float(terms.preservation) > 0  # keyword prompts run through it too
    parts = terms.denoise + terms.llm_distill + terms.alignment + kept * terms.preservation
    torch.testing.assert_close(terms.total, parts)


def test_training_lowers_the_losses(tiny_project):
    from suradapter.train.adapter import train_adapter

    root = tiny_project.parent
    params = _params(
        tiny_project,
        output_dir=str(root / "lowers"),
        checkpoint_dir=str(root / "lowers-ckpt"),
        max_steps=40,
        learning_rate=3e-3,
    )
    result = train_adapter(params)
    first, last = result.log[:3], result.log[-3:]
    for term in ("alignment", "llm_distill"):
        before = sum(r[term] for r in first) / 3
        after = sum(r[term] for r in last) / 3
        assert after < before, (term, before, after)
    assert (root / "lowers" / "config.json").is_file()


def test_with_ema_the_saved_adapter_holds_the_ema_weights(tiny_project):
    """train.ema_decay on: what is saved (so evaluated and exported) is the EMA shadow of the
    last checkpoint, not the raw weights the optimiser left."""
    from suradapter.model.adapter import SURAdapter
    from suradapter.train.adapter import train_adapter
    from suradapter.train.ema import EMA_FILE

    root = tiny_project.parent
    params = _params(
        tiny_project,
        output_dir=str(root / "ema"),
        checkpoint_dir=str(root / "ema-ckpt"),
        max_steps=10,
        ema_decay=0.9,
    )
    saved = SURAdapter.from_pretrained(train_adapter(params).output_dir)
    checkpoint = root / "ema-ckpt" / "checkpoint-10"
    shadows = load_file(str(checkpoint / EMA_FILE))
    raw = load_file(str(checkpoint / "model.safetensors"))
    weights = dict(saved.named_parameters())
    assert len(shadows) == len(weights) > 0
    moved = []
    for index, (name, weight) in enumerate(weights.items()):
        torch.testing.assert_close(weight.detach(), shadows[str(index)], rtol=0, atol=0)
        if not torch.equal(shadows[str(index)], raw[name]):
            moved.append(name)
    assert moved, "the EMA shadow equals the raw weights: the EMA did nothing"


def test_the_token_mixer_is_standardised_on_training_token_embeddings_before_step_0(
    tiny_project,
):
    from suradapter.data.pairs import AdapterTrainingData
    from suradapter.model.adapter import SURAdapter
    from suradapter.model.zoo import load_base_from_params
    from suradapter.train.adapter import fit_mixer_statistics, train_adapter

    root = tiny_project.parent
    params = _params(
        tiny_project, output_dir=str(root / "mixed"), checkpoint_dir=str(root / "mixed-ckpt")
    )
    assert params.adapter.token_mixer is not None
    trained = SURAdapter.from_pretrained(train_adapter(params).output_dir)
    pipeline = load_base_from_params(params.base_model)
    data = AdapterTrainingData(Path(params.embed.manifest), pipeline.tokenizer, None)
    fresh = SURAdapter.for_pipeline(params.adapter, pipeline)
    rows = min(len(data), params.adapter.token_mixer.fit_rows)
    assert fit_mixer_statistics(fresh, pipeline.text_encoder, data, params) == 2 * rows
    assert not torch.equal(fresh.mixer.input_scale, torch.ones_like(fresh.mixer.input_scale))
    generator = torch.Generator().manual_seed(params.train.seed)
    chosen = torch.randperm(len(data), generator=generator)[:rows]
    ids = torch.cat([data.narrative_ids[chosen], data.keyword_ids[chosen]])
    table = pipeline.text_encoder.get_input_embeddings().weight.double()
    torch.testing.assert_close(fresh.mixer.input_mean, table[ids].mean(0).float())
    torch.testing.assert_close(trained.mixer.input_mean, fresh.mixer.input_mean)
    torch.testing.assert_close(trained.mixer.input_scale, fresh.mixer.input_scale)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_project, tmp_path):
    """With the frozen cache, a loader worker and EMA on: the saved (EMA) weights are equal."""
    config = yaml.safe_load(tiny_project.read_text())
    runs = {}
    for name in ("straight", "killed"):
        config["train"].update(
            output_dir=str(tmp_path / name),
            checkpoint_dir=str(tmp_path / f"{name}-ckpt"),
            max_steps=200,
            checkpoint_every=20,
            log_every=10,
            cache="auto",  # frozen outputs from the cache,
            loader_workers=1,  # batches from a DataLoader worker,
            ema_decay=0.9,  # and an EMA that must resume too
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copytree(tiny_project.parent / "configs", tmp_path / "configs", dirs_exist_ok=True)
        runs[name] = path
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _sur(runs["straight"], "train", **quiet).wait(timeout=600) == 0
    victim = _sur(runs["killed"], "train", **quiet)
    marker = tmp_path / "killed-ckpt" / "checkpoint-20" / "done"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed").exists(), "the kill must land before the end"
    assert _sur(runs["killed"], "train", **quiet).wait(timeout=600) == 0
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_one_adapter_in_the_launchers_precision(tiny_project, tmp_path):
    """`accelerate launch --mixed_precision bf16`: params leave it to the launcher (null)."""
    config = yaml.safe_load(tiny_project.read_text())
    config["train"].update(
        output_dir=str(tmp_path / "ddp"),
        checkpoint_dir=str(tmp_path / "ddp-ckpt"),
        max_steps=6,
        tracking_uri=f"sqlite:///{tmp_path / 'ddp-mlflow.db'}",
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(tiny_project.parent / "configs", tmp_path / "configs")
    # `--cpu` with several processes needs MPI; the multi-process launcher plus
    # ACCELERATE_USE_CPU runs torch.distributed over gloo instead.
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(BIN / "sur"),
        "--params",
        str(path),
        "--profile",
        "tiny",
        "train",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert load_params(path, profile="tiny").train.mixed_precision is None
    assert "train: 2 process(es)" in result.stdout and "mixed precision bf16" in result.stdout
    claim = json.loads((tmp_path / "ddp-ckpt" / "run_fingerprint.json").read_text())
    assert claim["settings"]["mixed_precision"] == "bf16"
    weights = _weights(tmp_path / "ddp")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert "train: weights identical on 2 processes" in result.stdout  # ranks did not drift
    # Only rank 0 writes what is read later: one adapter, one loss per logged step, one run.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "ddp-ckpt" / "loss_log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    with sqlite3.connect(tmp_path / "ddp-mlflow.db") as db:  # the store MLflow wrote
        runs = db.execute("SELECT run_uuid FROM runs").fetchall()
    assert len(runs) == 1, runs


def test_mlflow_run_has_params_metrics_plots_and_lineage(tiny_project):
    from mlflow.tracking import MlflowClient

    from suradapter.tracking import tracking_uri
    from suradapter.train.track import train_with_tracking

    root = tiny_project.parent
    params = _params(
        tiny_project,
        output_dir=str(root / "tracked"),
        checkpoint_dir=str(root / "tracked-ckpt"),
        max_steps=6,
    )
    train_with_tracking(params, ["a trio of fire-truck coloured coins", "one lonely plate"])
    client = MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(params.train.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # training view
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    assert run.data.params["train.max_steps"] == "6"
    assert run.data.params["adapter.mode"] == "fixed"
    assert len(client.get_metric_history(run.info.run_id, "loss_alignment")) == 3
    assert run.data.tags["git_commit"] and run.data.tags["teacher"] == "minilm"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/loss_curves.png", "plots/base_vs_adapter.png"}
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/config.json" in adapter_files


def test_an_experiment_made_before_the_kind_tag_gets_it_and_keeps_its_id(tmp_path):
    from mlflow.tracking import MlflowClient

    from suradapter.tracking import ensure_experiment

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment("sur-adapter", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(client, "sur-adapter") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    new = ensure_experiment(client, "sur-adapter-2")
    assert new != old
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_checkpoints_of_another_run_are_dropped_not_resumed(tmp_path):
    from suradapter.train.checkpoints import claim_checkpoints, latest_checkpoint

    folder = tmp_path / "ckpt"
    assert claim_checkpoints(folder, "run-a", {"lr": 1}) is False
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "done").write_text("5")
    assert claim_checkpoints(folder, "run-a", {"lr": 1}) is False
    assert latest_checkpoint(folder)[0] == 5
    assert claim_checkpoints(folder, "run-b", {"lr": 2}) is True
    assert latest_checkpoint(folder) == (0, None)


def test_the_run_fingerprint_follows_math_params_not_bookkeeping(tiny_project):
    from suradapter.train.adapter import run_settings
    from suradapter.train.checkpoints import run_fingerprint

    params = load_params(tiny_project, profile="tiny")
    base = run_fingerprint(run_settings(params, 1, "no"))
    logging_only = params.model_copy(
        update={"train": params.train.model_copy(update={"log_every": 7})}
    )
    assert run_fingerprint(run_settings(logging_only, 1, "no")) == base
    other_lr = params.model_copy(
        update={"train": params.train.model_copy(update={"learning_rate": 0.5})}
    )
    assert run_fingerprint(run_settings(other_lr, 1, "no")) != base
    assert run_fingerprint(run_settings(params, 2, "no")) != base
    assert run_fingerprint(run_settings(params, 1, "bf16")) != base


def _learning_rates(schedule, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def test_both_trainers_warm_up_linearly_then_decay_to_their_floor():
    from suradapter.config import BootstrapParams, Params, TrainParams
    from suradapter.train import adapter, bootstrap

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)

    train = TrainParams(warmup_steps=4, max_steps=12, lr_scheduler="cosine")
    opt = optimizer()
    rates = _learning_rates(adapter.lr_schedule(Params(train=train), opt), opt, 13)
    assert rates[:5] == [0.0, 0.5, 1.0, 1.5, 2.0]  # linear warm-up to the peak
    assert all(a > b for a, b in itertools.pairwise(rates[4:13]))  # cosine decay
    assert abs(rates[8] - 2.0 * (0.1 + 0.9 * 0.5)) < 1e-9  # half way: mean of peak and floor
    assert abs(rates[12] - 2.0 * adapter.COSINE_FLOOR) < 1e-9

    opt = optimizer()
    constant = TrainParams(warmup_steps=4, max_steps=12, lr_scheduler="constant")
    rates = _learning_rates(adapter.lr_schedule(Params(train=constant), opt), opt, 12)
    assert rates[:4] == [0.0, 0.5, 1.0, 1.5] and set(rates[4:]) == {2.0}

    opt = optimizer()
    base = BootstrapParams(warmup_steps=2, steps=10, min_lr_ratio=0.25)
    rates = _learning_rates(bootstrap.lr_schedule(base, opt), opt, 11)
    assert rates[:3] == [0.0, 1.0, 2.0] and abs(rates[10] - 0.5) < 1e-9
