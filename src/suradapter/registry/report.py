"""The registry's verdict on an evaluation report (`report.json`, written by `sur evaluate`;
its contract is `suradapter.evaluate.report.EvalReport`).

The registry does not take `passed: true` on trust. It re-derives the gates from the report's
`metrics` with the profile's `evaluate.gates` (`suradapter.evaluate.gates.decide_gates`, the
code `sur evaluate` runs). A report *contradicts itself*, and is refused outright, when its
gates are not the ones its metrics call for, a gate's value is not the one its metrics give,
a gate's `passed` does not follow from its own value and threshold, or `passed` is not "every
gate passed". A consistent report *passes* when every re-derived gate passes under the
profile's thresholds and `adapter_sha256` is the sha256 of the adapter weights in question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from suradapter.config import GateParams
from suradapter.evaluate.gates import Gate, MissingFigure, decide_gates, holds
from suradapter.evaluate.report import ReportError, load_report_file, report_problems
from suradapter.registry.errors import RegistryError


@dataclass(frozen=True)
class ReportVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it does not pass; empty if it does
    contradictions: list[str] = field(default_factory=list)  # where it contradicts itself


def load_report(path: Path) -> dict:
    """Read and check a report.json. Raises RegistryError naming the file and the problem."""
    try:
        return load_report_file(path)
    except ReportError as err:
        raise RegistryError(str(err)) from None


def _same(recorded: float | None, derived: float | None) -> bool:
    if recorded is None or derived is None:
        return recorded is derived
    return math.isclose(recorded, derived, rel_tol=1e-9, abs_tol=1e-12)


def contradictions(report: dict, derived: list[Gate]) -> list[str]:
    """Where a contract-following `report` contradicts its own metrics and values."""
    found = []
    recorded = {gate["name"]: gate for gate in report["gates"]}
    wanted = [gate.name for gate in derived]
    if sorted(recorded) != sorted(wanted) or len(recorded) != len(report["gates"]):
        listed = [gate["name"] for gate in report["gates"]]
        found.append(f"it lists gates {listed}, but its metrics call for {wanted}")
    for gate in derived:
        mine = recorded.get(gate.name)
        if mine is None:
            continue
        if not _same(mine.get("value"), gate.value):
            found.append(
                f"gate {gate.name} records value {mine.get('value')}, its metrics give {gate.value}"
            )
        rule = mine.get("rule") or gate.rule
        if rule != gate.rule:
            found.append(f"gate {gate.name} records rule {rule!r}; the gate is {gate.rule!r}")
        threshold = mine.get("threshold")
        follows = threshold is not None and holds(gate.rule, mine.get("value"), threshold)
        if mine["passed"] != follows:
            found.append(
                f"gate {gate.name} says passed={str(mine['passed']).lower()}, but "
                f"{mine.get('value')} {gate.rule} {threshold} is {str(follows).lower()}"
            )
    every = bool(report["gates"]) and all(gate["passed"] for gate in report["gates"])
    if report["passed"] and not every:
        found.append("it says passed=true, but not every gate it lists passed")
    elif not report["passed"] and every:
        found.append("it says passed=false, but every gate it lists passed")
    return found


def judge_report(report: dict, adapter_sha256: str, gates: GateParams) -> ReportVerdict:
    """Whether `report` passes, under the gate thresholds `gates`, for the adapter whose
    weights hash to `adapter_sha256`. The gates are re-derived from the report's metrics."""
    reasons = [f"report is malformed: {problem}" for problem in report_problems(report)]
    if reasons:
        return ReportVerdict(False, reasons)
    try:
        derived = decide_gates(report["metrics"], gates)
    except MissingFigure as err:
        reason = f"report is malformed: {err}, so its gates cannot be re-derived"
        return ReportVerdict(False, [reason])
    found = contradictions(report, derived)
    reasons = [f"report contradicts itself: {item}" for item in found]
    recorded = {gate["name"]: gate for gate in report["gates"]}
    for gate in derived:
        if gate.passed:
            continue
        was = (recorded.get(gate.name) or {}).get("threshold")
        note = f"; the report used {was}" if was is not None and was != gate.threshold else ""
        shown = "n/a" if gate.value is None else f"{gate.value:.4g}"
        reasons.append(
            f"gate {gate.name} failed (value {shown}, needs {gate.rule} {gate.threshold:g}{note})"
        )
    if report["adapter_sha256"] != adapter_sha256:
        reasons.append(
            f"report is for adapter sha256 {report['adapter_sha256'][:12] or '(empty)'}..., "
            f"not for this adapter ({adapter_sha256[:12]}...): re-run `sur evaluate`"
        )
    return ReportVerdict(not reasons, reasons, found)
