"""Promotion gates: each compares one evaluation figure with a threshold from params."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from suradapter.config import GateParams


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
    return Gate(name, value is not None and value >= threshold, value, threshold, ">=")


def at_most(name: str, value: float | None, threshold: float) -> Gate:
    return Gate(name, value is not None and value <= threshold, value, threshold, "<=")


def decide_gates(metrics: dict, params: GateParams) -> list[Gate]:
    """The gates that apply to `metrics` (semantic ones only where the oracle ran).

    The alignment gains apply in every profile; an identity adapter gains exactly 0 on both,
    and `GateParams` keeps at least one of their thresholds above 0, so it never passes.
    """
    gates = []
    if metrics.get("gap_closure_measured"):
        gates.append(at_least("gap_closure", metrics["gap_closure"], params.min_gap_closure))
        keyword = metrics["keyword_accuracy"]
        drop = keyword["base"] - keyword["adapter"]
        gates.append(at_most("keyword_accuracy_drop", drop, params.max_keyword_drop))
    denoise = metrics["denoise"]["keyword"]
    gates.append(
        at_most("denoise_loss_increase", denoise["relative_increase"], params.max_denoise_increase)
    )
    alignment = metrics["alignment"]
    gain = alignment["cosine"]["adapter"] - alignment["cosine"]["base"]
    gates.append(at_least("alignment_gain", gain, params.min_alignment_gain))
    gain = alignment["retrieval_top1"]["adapter"] - alignment["retrieval_top1"]["base"]
    gates.append(at_least("retrieval_gain", gain, params.min_retrieval_gain))
    production = metrics.get("production_margin")
    if production is not None:
        gates.append(
            at_least("margin_over_production", production, params.min_margin_over_production)
        )
    return gates
