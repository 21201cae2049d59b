"""The evaluation report contract (`report.json`, written by `sur evaluate`) and its verdict.

    {"passed": bool, "adapter_sha256": str,
     "gates": [{"name": str, "passed": bool, "value": float | null, "threshold": float | null,
                "rule": ">=" | "<="}],
     "metrics": {...}}

The registry does not take `passed: true` on trust. It re-derives the gates from the report's
`metrics` with the profile's `evaluate.gates` (`suradapter.evaluate.gates.decide_gates`, the
code `sur evaluate` runs). A report *contradicts itself*, and is refused outright, when its
gates are not the ones its metrics call for, a gate's value is not the one its metrics give,
a gate's `passed` does not follow from its own value and threshold, or `passed` is not "every
gate passed". A consistent report *passes* when every re-derived gate passes under the
profile's thresholds and `adapter_sha256` is the sha256 of the adapter weights in question.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suradapter.config import GateParams
from suradapter.evaluate.gates import RULES, Gate, MissingFigure, decide_gates, holds
from suradapter.registry.errors import RegistryError


@dataclass(frozen=True)
class ReportVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it does not pass; empty if it does
    contradictions: list[str] = field(default_factory=list)  # where it contradicts itself


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def contract_problems(report: Any) -> list[str]:
    """Where `report` departs from the report.json contract (empty when it follows it)."""
    if not isinstance(report, dict):
        return [f"top level must be an object, got {type(report).__name__}"]
    problems = []
    expected = {"passed": bool, "adapter_sha256": str, "gates": list, "metrics": dict}
    for key, kind in expected.items():
        if key not in report:
            problems.append(f"key '{key}' missing")
        elif not isinstance(report[key], kind):
            problems.append(f"key '{key}' must be {kind.__name__}, got {report[key]!r:.60}")
    for index, gate in enumerate(report.get("gates") or []):
        where = f"gates[{index}]"
        if not isinstance(gate, dict):
            problems.append(f"{where} must be an object")
            continue
        if not isinstance(gate.get("name"), str):
            problems.append(f"{where}.name must be a string")
        if not isinstance(gate.get("passed"), bool):
            problems.append(f"{where}.passed must be true or false")
        for key in ("value", "threshold"):
            if gate.get(key) is not None and not _is_number(gate[key]):
                problems.append(f"{where}.{key} must be a number or null")
        if gate.get("rule") is not None and gate["rule"] not in RULES:
            problems.append(f"{where}.rule must be one of {', '.join(RULES)}")
    return problems


def load_report(path: Path) -> dict:
    """Read and check a report.json. Raises RegistryError naming the file and the problem."""
    if not path.is_file():
        raise RegistryError(f"no evaluation report at {path}: run `sur evaluate` first")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path}: not valid JSON ({err})") from None
    problems = contract_problems(report)
    if problems:
        raise RegistryError(f"{path} does not follow the report contract: {'; '.join(problems)}")
    return report


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
    reasons = [f"report is malformed: {problem}" for problem in contract_problems(report)]
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
