"""The MLflow model registry of SUR-adapter versions: register, promote, roll back, fetch.

A version of `params.registry.model_name` is a pyfunc model whose files are laid out as
`suradapter.provenance` describes (adapter, ONNX export, eval report, SHA256SUMS under
artifacts/); its `sha256sums` tag records the manifest every reader checks the files
against (`manifest`). Aliases: `candidate` (its report passed the gates), `production`
(served), `previous` (what `rollback` returns to). Promotion over a version in production
needs a head-to-head win (`challenge`).
"""

from suradapter.registry.challenge import Challenge, ProductionNotImproved
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
    "Challenge",
    "FetchedVersion",
    "ProductionNotImproved",
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
