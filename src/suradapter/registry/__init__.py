"""The MLflow model registry of SUR-adapter versions: register, promote, roll back, fetch.

A version of `params.registry.model_name` is a pyfunc model whose files are laid out as
`layout` describes (adapter, ONNX export, eval report, SHA256SUMS under artifacts/).
Aliases: `candidate` (its report passed the gates), `production` (served), `previous`
(what `rollback` returns to).
"""

from suradapter.registry.errors import RegistryError
from suradapter.registry.fetch import FetchedVersion, fetch_version
from suradapter.registry.promote import Promotion, promote, rollback
from suradapter.registry.pyfunc_model import AdaptedTextPathModel
from suradapter.registry.register import RegisteredVersion, register_version
from suradapter.registry.report import ReportVerdict, judge_report, load_report
from suradapter.registry.store import (
    CANDIDATE,
    PREVIOUS,
    PRODUCTION,
    registry_status,
    resolve,
)

__all__ = [
    "CANDIDATE",
    "PREVIOUS",
    "PRODUCTION",
    "AdaptedTextPathModel",
    "FetchedVersion",
    "Promotion",
    "RegisteredVersion",
    "RegistryError",
    "ReportVerdict",
    "fetch_version",
    "judge_report",
    "load_report",
    "promote",
    "register_version",
    "registry_status",
    "resolve",
    "rollback",
]
