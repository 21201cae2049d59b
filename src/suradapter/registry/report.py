"""The evaluation report contract (`report.json`, written by `sur evaluate`) and its verdict.

    {"passed": bool, "adapter_sha256": str,
     "gates": [{"name": str, "passed": bool, "value": float | null, "threshold": float | null}],
     "metrics": {...}}

A report *passes* only when `passed` is true, it lists at least one gate, every gate passed,
and `adapter_sha256` is the sha256 of the adapter weights being registered or promoted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suradapter.registry.errors import RegistryError


@dataclass(frozen=True)
class ReportVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it does not pass; empty if it does


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


def judge_report(report: dict, adapter_sha256: str) -> ReportVerdict:
    """Whether `report` passes for the adapter whose weights hash to `adapter_sha256`."""
    reasons = [f"report is malformed: {problem}" for problem in contract_problems(report)]
    if reasons:
        return ReportVerdict(False, reasons)
    if report["passed"] is not True:
        reasons.append("report says passed=false")
    if not report["gates"]:
        reasons.append("report lists no gates")
    for gate in report["gates"]:
        if gate["passed"] is not True:
            reasons.append(
                f"gate {gate['name']} failed (value {gate.get('value')}, "
                f"threshold {gate.get('threshold')})"
            )
    if report["adapter_sha256"] != adapter_sha256:
        reasons.append(
            f"report is for adapter sha256 {report['adapter_sha256'][:12] or '(empty)'}..., "
            f"not for this adapter ({adapter_sha256[:12]}...): re-run `sur evaluate`"
        )
    return ReportVerdict(not reasons, reasons)
