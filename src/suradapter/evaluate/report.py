"""The evaluation's outputs: report.json, report.md and plots, written as one folder.

`EvalReport` is the report.json contract: `write_report` checks a report against it before
writing, and its readers (`read_report`, the registry's `load_report`) check what they read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.evaluate.gates import RULES
from suradapter.evaluate.oracle import ATTRIBUTES
from suradapter.provenance import EVAL_REPORT_FILE, EVAL_REPORT_MD

ATTRIBUTE_PLOT = "attributes.png"
GRID_IMAGE = "grid.png"


class GateRecord(BaseModel):
    """One gate as report.json records it (`evaluate.gates.Gate`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str
    passed: bool
    value: float | None = None
    threshold: float | None = None
    rule: str | None = None

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, rule: str | None) -> str | None:
        if rule is not None and rule not in RULES:
            raise ValueError(f"must be one of {', '.join(RULES)}")
        return rule


class EvalReport(BaseModel):
    """The keys of report.json every reader relies on (others, such as `base_model`, may
    follow). Strict: `true` is not a number and `1` is not a verdict."""

    model_config = ConfigDict(strict=True, extra="allow")

    passed: bool
    adapter_sha256: str
    gates: list[GateRecord]
    metrics: dict[str, Any]


def report_problems(report: Any) -> list[str]:
    """Where `report` departs from the report.json contract, as `key: what` (empty: none)."""
    if not isinstance(report, dict):
        return [f"top level must be an object, got {type(report).__name__}"]
    try:
        EvalReport.model_validate(report)
    except ValidationError as err:
        return [
            f"{'.'.join(str(part) for part in error['loc']) or 'report'}: {error['msg']}"
            for error in err.errors()
        ]
    return []


def attribute_figure(semantic: dict[str, dict[str, dict[str, float]]]) -> Figure:
    """Grouped bars per attribute (models side by side), one panel per prompt set."""
    figure = Figure(figsize=(4.5 * len(semantic), 3.4))
    axes = figure.subplots(1, len(semantic), squeeze=False)[0]
    for axis, (set_name, models) in zip(axes, semantic.items(), strict=True):
        width = 0.8 / len(models)
        for index, (model, scores) in enumerate(models.items()):
            xs = [i + (index - (len(models) - 1) / 2) * width for i in range(len(ATTRIBUTES))]
            axis.bar(xs, [scores[a] for a in ATTRIBUTES], width, label=model)
        axis.set_xticks(range(len(ATTRIBUTES)), ATTRIBUTES)
        axis.set_ylim(0, 1)
        axis.set_title(set_name.replace("_", " "), fontsize=9)
    axes[0].set_ylabel("oracle accuracy")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def markdown(report: dict) -> str:
    """A short human summary: verdict, gates, headline figures."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# Evaluation: {verdict}", "", f"adapter sha256 `{report['adapter_sha256']}`", ""]
    lines += ["| gate | verdict | value | threshold |", "|---|---|---|---|"]
    for gate in report["gates"]:
        value = "n/a" if gate["value"] is None else f"{gate['value']:.4f}"
        mark = "pass" if gate["passed"] else "**fail**"
        lines.append(f"| {gate['name']} | {mark} | {value} | {gate['rule']} {gate['threshold']} |")
    metrics = report["metrics"]
    lines.append("")
    labels = {
        "narrative_accuracy": "narrative accuracy, held-out combinations",
        "template_accuracy": "narrative accuracy, held-out templates",
        "keyword_accuracy": "keyword accuracy",
    }
    for name, label in labels.items():
        if metrics.get(name):
            pairs = ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items())
            lines.append(f"- {label} (mean over attributes): {pairs}")
    if metrics.get("gap_closure") is not None:
        lines.append(
            f"- gap closure {metrics['gap_closure']:.3f} over {metrics['gap_closure_attributes']}"
            f"; narrative gain {metrics['narrative_gain_points']:+.1f} points"
        )
    if metrics.get("gap_closure_by_figure"):
        shown = {
            k: "n/a" if v is None else f"{v:.3f}"
            for k, v in metrics["gap_closure_by_figure"].items()
        }
        per = ", ".join(f"{k} {v}" for k, v in shown.items() if k != "all")
        lines.append(f"- gap closure per attribute: {per}; all three right at once {shown['all']}")
    alignment = metrics["alignment"]
    for metric in ("cosine", "retrieval_top1"):
        pairs = ", ".join(f"{k} {v:.3f}" for k, v in alignment[metric].items())
        lines.append(f"- alignment {metric}: {pairs}")
    denoise = metrics["denoise"]["keyword"]
    lines.append(
        f"- held-out denoising loss (keyword prompts): base {denoise['base']:.4f}, "
        f"adapter {denoise['adapter']:.4f} ({denoise['relative_increase']:+.2%})"
    )
    clip = metrics.get("clip_score")
    scores = ", ".join(f"{k} {v:.2f}" for k, v in clip.items()) + "; " if clip else ""
    lines.append(f"- CLIP score: {scores}{metrics['clip_score_note']}")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict, grid: Image.Image | None) -> Path:
    """Write report.json, report.md, the attribute plot and the grid into `folder` at once.

    Raises ValueError when `report` breaks the report.json contract (nothing is written)."""
    problems = report_problems(report)
    if problems:
        raise ValueError(f"the evaluation report breaks its contract: {'; '.join(problems)}")
    recover_dir(folder)
    staging = staging_dir(folder)
    (staging / EVAL_REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (staging / EVAL_REPORT_MD).write_text(markdown(report))
    semantic = report["metrics"].get("semantic")
    if semantic:
        attribute_figure(semantic).savefig(staging / ATTRIBUTE_PLOT, dpi=100)
    if grid is not None:
        grid.save(staging / GRID_IMAGE)
    replace_dir(staging, folder)
    return folder / EVAL_REPORT_FILE


class ReportError(ValueError):
    """A report.json that is missing, not JSON, or breaks the contract; names the file."""


def load_report_file(path: Path) -> dict:
    """Read and check a report.json. Raises ReportError naming the file and the problem."""
    if not path.is_file():
        raise ReportError(f"no evaluation report at {path}: run `sur evaluate` first")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    problems = report_problems(report)
    if problems:
        raise ReportError(f"{path} does not follow the report contract: {'; '.join(problems)}")
    return report


def read_report(folder: Path) -> dict:
    """The checked report.json of an eval folder (`load_report_file`)."""
    return load_report_file(Path(folder) / EVAL_REPORT_FILE)


def headline_metrics(report: dict) -> dict[str, float]:
    """The report's scalar figures, flattened for MLflow (None values left out)."""
    metrics = report["metrics"]
    flat = {f"gate_{g['name']}": g["value"] for g in report["gates"]}
    for name in ("narrative_accuracy", "keyword_accuracy"):
        for model, value in (metrics.get(name) or {}).items():
            flat[f"{name}_{model}"] = value
    for metric, values in metrics["alignment"].items():
        if isinstance(values, dict):
            flat |= {f"alignment_{metric}_{model}": v for model, v in values.items()}
    for field, values in metrics["denoise"].items():
        flat |= {f"denoise_{field}_{name}": v for name, v in values.items()}
    flat |= {f"clip_score_{model}": v for model, v in (metrics.get("clip_score") or {}).items()}
    flat["gap_closure"] = metrics.get("gap_closure")
    flat["passed"] = float(report["passed"])
    return {k: float(v) for k, v in flat.items() if v is not None}
