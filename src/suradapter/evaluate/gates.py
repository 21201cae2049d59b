"""Promotion gates: each compares one evaluation figure with a threshold from params.

`decide_gates` is the one definition of which gates apply to a report's metrics and how each
is computed: `sur evaluate` writes its result, and the registry re-derives it from the
report's metrics before it trusts a report (`suradapter.registry.report`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass

from suradapter.config import GateParams

RULES: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


class MissingFigure(ValueError):
    """The metrics lack a figure a gate needs; the message names its path."""


def holds(rule: str, value: float | None, threshold: float) -> bool:
    """Whether `value rule threshold` holds (a value that was not measured never passes)."""
    return value is not None and RULES[rule](value, threshold)


@dataclass(frozen=True)
class Gate:
    """One gate's verdict; `value` is None when the figure could not be measured."""

    name: str
    passed: bool
    value: float | None
    threshold: float
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4f}"
        verdict = "passed" if self.passed else "FAILED"
        return f"{self.name}: {verdict} ({shown} {self.rule} {self.threshold:g})"


def at_least(name: str, value: float | None, threshold: float) -> Gate:
    return Gate(name, holds(">=", value, threshold), value, threshold, ">=")


def at_most(name: str, value: float | None, threshold: float) -> Gate:
    return Gate(name, holds("<=", value, threshold), value, threshold, "<=")


def figure(metrics: dict, *path: str) -> float | None:
    """`metrics[path[0]][path[1]]...`, a number or None. Raises MissingFigure naming the path."""
    value: object = metrics
    for depth, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            raise MissingFigure(f"metrics.{'.'.join(path[: depth + 1])} is missing")
        value = value[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise MissingFigure(f"metrics.{'.'.join(path)} is not a number: {value!r:.40}")
    return value


def _difference(metrics: dict, *path: str, minus: str, plus: str) -> float | None:
    high, low = figure(metrics, *path, plus), figure(metrics, *path, minus)
    return None if high is None or low is None else high - low


def decide_gates(metrics: dict, params: GateParams) -> list[Gate]:
    """The gates that apply to `metrics` (semantic ones only where the oracle ran).

    The alignment gains apply in every profile; an identity adapter gains exactly 0 on both,
    and `GateParams` keeps at least one of their thresholds above 0, so it never passes.
    Raises MissingFigure when `metrics` lack a figure a gate needs.
    """
    gates = []
    if metrics.get("gap_closure_measured"):
        gates.append(
            at_least("gap_closure", figure(metrics, "gap_closure"), params.min_gap_closure)
        )
        drop = _difference(metrics, "keyword_accuracy", minus="adapter", plus="base")
        gates.append(at_most("keyword_accuracy_drop", drop, params.max_keyword_drop))
    increase = figure(metrics, "denoise", "keyword", "relative_increase")
    gates.append(at_most("denoise_loss_increase", increase, params.max_denoise_increase))
    gain = _difference(metrics, "alignment", "cosine", minus="base", plus="adapter")
    gates.append(at_least("alignment_gain", gain, params.min_alignment_gain))
    gain = _difference(metrics, "alignment", "retrieval_top1", minus="base", plus="adapter")
    gates.append(at_least("retrieval_gain", gain, params.min_retrieval_gain))
    production = metrics.get("production_margin")
    if production is not None:
        margin = figure(metrics, "production_margin")
        gates.append(at_least("margin_over_production", margin, params.min_margin_over_production))
    return gates


def gated_report(metrics: dict, params: GateParams, adapter_sha256: str, **context: object) -> dict:
    """The report `sur evaluate` writes: `metrics`, the gates decided on them and the verdict,
    for the adapter weights with `adapter_sha256`; `context` adds descriptive fields."""
    gates = decide_gates(metrics, params)
    return {
        "passed": all(gate.passed for gate in gates),
        "adapter_sha256": adapter_sha256,
        **context,
        "gates": [gate.as_dict() for gate in gates],
        "metrics": metrics,
    }
