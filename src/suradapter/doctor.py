"""`sur doctor`: a dry run of the real job, to find mistakes before GPU hours are spent.

It checks the profile (SURD source, resolution against the base model, teacher layer and
width, gates), then runs every stage's own code on a small slice (a few SURD rows, 1-2
optimiser steps) on whatever device is present, against the configured base model and
teacher, in a scratch folder: prepare -> embed -> train -> export -> evaluate. Per stage it
reports device, dtype, seconds per row or step, peak memory (CUDA max allocated on a GPU, RSS
on the CPU) and a projection of the full run for the configured data size and `max_steps`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from suradapter.checks import profile_mistakes, surd_source
from suradapter.config import Params
from suradapter.devices import process_device
from suradapter.model.architectures import zoo_record

SLICE_TEST_FRACTION = 0.5  # the slice needs both train rows and held-out rows
RSS_SAMPLE_S = 0.02
WORKDIR_MARKER = ".sur-doctor"


class DoctorError(RuntimeError):
    """The profile or one of its stages would fail a real run; the message says which."""


@dataclass
class StageFigures:
    """What one stage cost on the slice, and what the full run would cost at that rate."""

    stage: str
    device: str
    dtype: str
    units: int  # rows or steps done on the slice
    unit: str
    seconds_per_unit: float
    fixed_seconds: float  # loading models, exporting: paid once per run
    peak_memory_bytes: int
    memory_kind: str  # "cuda max allocated" or "rss"
    full_units: int  # rows or steps of the full run
    note: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # stage-specific numbers
    unit_scale: float = 1.0  # a full-run unit costs this many slice units (a larger batch)

    @property
    def projected_seconds(self) -> float:
        return self.fixed_seconds + self.seconds_per_unit * self.unit_scale * self.full_units


@dataclass
class DoctorReport:
    profile: str
    base_model: str
    teacher: str
    source_rows: int
    max_steps: int
    stages: list[StageFigures] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gate_verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def projected_seconds(self) -> float:
        return sum(stage.projected_seconds for stage in self.stages)

    def as_dict(self) -> dict[str, Any]:
        stages = [asdict(s) | {"projected_seconds": s.projected_seconds} for s in self.stages]
        return asdict(self) | {"stages": stages, "projected_seconds": self.projected_seconds}


class _PeakMemory:
    """Peak memory of a block: CUDA max allocated on a GPU, else the process RSS (sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self.kind = "cuda max allocated" if device.type == "cuda" else "rss"

    @contextmanager
    def measure(self) -> Iterator[_PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        process, stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while not stop.wait(RSS_SAMPLE_S):
                self.peak = max(self.peak, process.memory_info().rss)

        self.peak = process.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            stop.set()
            sampler.join()
            self.peak = max(self.peak, process.memory_info().rss)


def slice_params(params: Params, workdir: Path, source: Path, steps: int, batch: int | None):
    """The profile pointed at `workdir` for a dry run: same models, dtypes and losses; a
    slice's splits, `steps` optimiser steps, no MLflow and no shapes-world image sets."""
    prepared, cache = workdir / "prepared", workdir / "teacher_cache"
    encode = params.encode.model_copy(update={"cache_dir": str(workdir / "frozen_cache")})
    manifest = str(prepared / "manifest.parquet")
    train = params.train.model_copy(
        update={
            "output_dir": str(workdir / "adapter"),
            "checkpoint_dir": str(workdir / "checkpoints"),
            "max_steps": steps,
            "warmup_steps": min(params.train.warmup_steps, steps),
            "checkpoint_every": steps,
            "log_every": 1,
            "batch_size": batch or params.train.batch_size,
        }
    )
    evaluate = params.evaluate.model_copy(
        update={
            "adapter_dir": train.output_dir,
            "output_dir": str(workdir / "eval"),
            "denoise_batches": 1,
            "clip_prompts": min(params.evaluate.clip_prompts, 2),
            "images_per_combination": 1,
        }
    )
    export = params.export.model_copy(
        update={"adapter_dir": train.output_dir, "output_dir": str(workdir / "export")}
    )
    prepare = params.prepare.model_copy(
        update={
            "source": str(source),
            "output_dir": str(prepared),
            "val_fraction": 0.0,
            "test_fraction": SLICE_TEST_FRACTION,
            "max_bad_fraction": 1.0,  # the doctor reports the quarantine instead
        }
    )
    embed = params.embed.model_copy(update={"manifest": manifest, "cache_dir": str(cache)})
    return params.model_copy(
        update={
            "prepare": prepare,
            "embed": embed,
            "encode": encode,
            "train": train,
            "export": export,
            "evaluate": evaluate,
        }
    )


def run_doctor(
    params: Params,
    workdir: Path,
    rows: int = 16,
    steps: int = 2,
    batch_size: int | None = None,
    source: Path | None = None,
    on_stage: Callable[[StageFigures], None] | None = None,
) -> DoctorReport:
    """Check `params`, then run every stage on a slice in `workdir`; return the figures.

    Raises DoctorError naming every config mistake found, or the stage that failed and why.
    """
    mistakes = profile_mistakes(params, source)
    if mistakes:
        raise DoctorError("the profile would fail:\n  - " + "\n  - ".join(mistakes))
    from suradapter.data.prepare import count_rows

    surd = surd_source(params, source)
    full_rows = count_rows(surd)
    fresh_workdir(Path(workdir))
    dry = slice_params(params, Path(workdir), surd, steps, batch_size)
    report = DoctorReport(
        params.profile, params.base_model.id, params.embed.model, full_rows, params.train.max_steps
    )
    report.warnings += _warnings(params)
    device = process_device()

    def record(figures: StageFigures) -> None:
        report.stages.append(figures)
        if on_stage:
            on_stage(figures)

    record(_prepare(dry, rows, full_rows))
    record(_embed(dry, full_rows, device))
    if dry.train.cache == "auto":
        record(_encode(dry, full_rows, device))
    record(_train(dry, params, device))
    record(_export(dry, device))
    evaluation, verdict = _evaluate(params, dry, device)
    record(evaluation)
    report.gate_verdict = verdict
    if verdict["passed"]:
        report.warnings.append(
            f"the gates passed an adapter trained for {steps} step(s) on {rows} rows: "
            "evaluate.gates would not refuse an untrained adapter"
        )
    return report


def fresh_workdir(folder: Path) -> None:
    """Empty the doctor's scratch folder (cached features would fake the timings). Raises
    DoctorError for a non-empty folder that an earlier doctor run did not make."""
    marker = folder / WORKDIR_MARKER
    if folder.is_dir() and any(folder.iterdir()):
        if not marker.is_file():
            raise DoctorError(f"--workdir {folder} is not empty and not a doctor's scratch folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("scratch folder of `sur doctor`: emptied by each run\n")


def _warnings(params: Params) -> list[str]:
    found = []
    if not torch.cuda.is_available():
        found.append("no CUDA GPU is visible: every figure and projection is for this CPU")
    elif params.train.mixed_precision in (None, "no"):
        found.append(
            "train runs in float32 unless the launcher sets mixed precision: "
            "`accelerate launch --mixed_precision bf16 sur train`"
        )
    for role, path in (
        ("base_model.id", params.base_model.id),
        ("embed.model", params.embed.model),
    ):
        record = zoo_record(path) if Path(path).is_dir() else None
        if record:
            found.append(
                f"{role} '{path}' is `sur zoo build {record['architecture']}`: random weights"
            )
    return found


def _timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float, _PeakMemory]:
    memory = _PeakMemory(device)
    with memory.measure():
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
    return result, seconds, memory


def _stage_error(stage: str, err: Exception) -> DoctorError:
    return DoctorError(f"stage {stage} failed on the slice: {type(err).__name__}: {err}")


def _prepare(dry: Params, rows: int, full_rows: int) -> StageFigures:
    from suradapter.data.prepare import PrepareError, prepare_dataset

    try:
        summary, seconds, memory = _timed(
            torch.device("cpu"), lambda: prepare_dataset(dry.prepare, limit=rows)
        )
    except (PrepareError, ValueError, OSError) as err:
        raise _stage_error("prepare", err) from None
    splits = summary.splits
    if not splits.get("train") or not splits.get("test"):
        raise DoctorError(
            f"the slice of {summary.rows_read} rows has {splits.get('train', 0)} train and "
            f"{splits.get('test', 0)} held-out rows after quarantine "
            f"({dict(summary.quarantined) or 'none'}): pass more --rows"
        )
    quarantined = sum(summary.quarantined.values())
    return StageFigures(
        "prepare", "cpu", "-", summary.rows_read, "row", seconds / summary.rows_read, 0.0,
        memory.peak, memory.kind, full_rows,
        f"{dry.prepare.resolution} px; {quarantined} of {summary.rows_read} rows quarantined",
    )  # fmt: skip


def _embed(dry: Params, full_rows: int, device: torch.device) -> StageFigures:
    from suradapter.teacher.embed import run_embed
    from suradapter.teacher.model import TeacherNotFoundError

    try:
        summary, _, memory = _timed(device, lambda: run_embed(dry.embed, device=device))
    except (TeacherNotFoundError, ValueError, OSError) as err:
        raise _stage_error("embed", err) from None
    per_row = (summary.seconds - summary.load_seconds) / max(1, summary.computed)
    return StageFigures(
        "embed", summary.device, dry.embed.dtype, summary.computed, "prompt", per_row,
        summary.load_seconds, memory.peak, memory.kind, full_rows,
        f"{dry.embed.model}, layer {dry.embed.layer}; one process (n processes share it)",
    )  # fmt: skip


def _encode(dry: Params, full_rows: int, device: torch.device) -> StageFigures:
    from suradapter.frozen.encode import run_encode

    try:
        summary, seconds, memory = _timed(device, lambda: run_encode(dry, device=device))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise _stage_error("encode", err) from None
    # per training row: its latent plus its two prompts' states (distinct texts only)
    per_row = summary.seconds / max(1, summary.images)
    share = summary.estimated_bytes / max(1, summary.images)
    return StageFigures(
        "encode", summary.device, summary.dtype, summary.images, "row", per_row,
        seconds - summary.seconds, memory.peak, memory.kind, full_rows,
        f"VAE latents + text states; ~{share * full_rows / 1e9:.1f} GB cache for all rows",
    )  # fmt: skip


def _train(dry: Params, params: Params, device: torch.device) -> StageFigures:
    from suradapter.train.adapter import train_adapter

    try:
        result, seconds, memory = _timed(device, lambda: train_adapter(dry))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise _stage_error("train", err) from None
    times = [record["seconds"] for record in result.log]
    # The first step pays warm-up (allocations, kernel selection); later ones are the rate.
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    batch_scale = params.train.batch_size / dry.train.batch_size
    note = (
        f"batch {dry.train.batch_size} x {dry.train.gradient_accumulation_steps} accumulation; "
        f"mixed precision {result.mixed_precision}"
    )
    if batch_scale != 1:
        note += f"; projected at batch {params.train.batch_size} (linear: an upper bound)"
    samples = dry.train.batch_size * dry.train.gradient_accumulation_steps
    figures = StageFigures(
        "train", result.device, f"frozen {result.frozen_dtype}, adapter float32",
        len(times), "step", per_step, seconds - result.seconds, memory.peak, memory.kind,
        params.train.max_steps, note,
        {"samples_per_second": samples / per_step, "mixed_precision": result.mixed_precision},
        batch_scale,
    )  # fmt: skip
    return figures


def _export(dry: Params, device: torch.device) -> StageFigures:
    from suradapter.export.onnx_export import ExportParityError, export_adapter

    adapter_dir, out_dir = Path(dry.export.adapter_dir), Path(dry.export.output_dir)
    try:
        result, seconds, memory = _timed(
            device, lambda: export_adapter(dry, adapter_dir, out_dir, device=device)
        )
    except (ExportParityError, ValueError, OSError) as err:
        raise _stage_error("export", err) from None
    report = result.report
    note = (
        f"parity {report['parity_max_abs_diff']:.2e} <= {report['parity_tolerance']:g} "
        f"({report['parity_torch_device']} vs ORT {report['parity_provider']}); "
        f"external data: {'yes' if report['external_data'] else 'no'}"
    )
    keep = ("parity_max_abs_diff", "parity_tolerance", "parity_provider", "external_data")
    return StageFigures(
        "export", report["parity_torch_device"], report["dtype"], 1, "export", seconds, 0.0,
        memory.peak, memory.kind, 1, note, {key: report[key] for key in keep},
    )  # fmt: skip


def _evaluate(
    params: Params, dry: Params, device: torch.device
) -> tuple[StageFigures, dict[str, Any]]:
    from suradapter.evaluate.run import evaluate_adapter

    try:
        result, seconds, memory = _timed(device, lambda: evaluate_adapter(dry, device=device))
    except (ValueError, FileNotFoundError, OSError) as err:
        raise _stage_error("evaluate", err) from None
    metrics, load = result.report["metrics"], result.load_seconds
    rows = metrics["alignment"]["n"] + dry.train.batch_size  # alignment rows + 1 denoise batch
    full = (
        params.evaluate.alignment_rows + params.evaluate.denoise_batches * params.train.batch_size
    )
    verdict = {
        "passed": result.passed,
        "gates": {gate.name: gate.describe() for gate in result.gates},
    }
    failed = ", ".join(gate.name for gate in result.failed_gates) or "none"
    return StageFigures(
        "evaluate", str(device), dry.base_model.dtype, rows, "row", (seconds - load) / rows,
        load, memory.peak, memory.kind, full,
        f"rows = alignment + denoise; gates failed: {failed}",
    ), verdict  # fmt: skip


def duration(seconds: float) -> str:
    """Seconds as a short human duration: 42 s, 7.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def stage_row(stage: StageFigures) -> list[str]:
    """One stage as the cells of the doctor's table."""
    done = f"{stage.units} {stage.unit}{'s' if stage.units != 1 else ''}"
    memory = f"{stage.peak_memory_bytes / 2**30:.2f} GiB {stage.memory_kind}"
    per_unit = f"{stage.seconds_per_unit:.3f} s"
    return [stage.stage, stage.device, stage.dtype, done, per_unit, memory,
            duration(stage.projected_seconds)]  # fmt: skip


def report_table(report: DoctorReport) -> Table:
    """The doctor's figures as a rich table, one row per stage."""
    table = Table(title=f"sur doctor: profile '{report.profile}'")
    for column in ("stage", "device", "dtype", "done", "per unit", "peak memory", "full run"):
        table.add_column(column, overflow="fold")
    for stage in report.stages:
        table.add_row(*stage_row(stage))
    return table


def print_report(report: DoctorReport, console: Console) -> None:
    """The table, each stage's note, the projection, the gates and the warnings."""
    console.print(report_table(report))
    for stage in report.stages:
        console.print(f"  {stage.stage}: {stage.note}", highlight=False)
    console.print(
        f"full run, projected: {duration(report.projected_seconds)} on one process for "
        f"{report.source_rows:,} SURD rows and {report.max_steps:,} steps",
        highlight=False,
    )
    for gate in report.gate_verdict["gates"].values():
        console.print(f"  gate on the dry-run adapter: {gate}", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def write_report(report: DoctorReport, path: Path) -> None:
    """Write the report as JSON (for scripts such as bench/gpu_check.sh)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
