"""`sur promote` and `sur rollback`: move `@production` (and `@previous`) between versions.

Guarantee, as far as the MLflow API allows (it has no multi-alias transaction): every check
runs before any alias moves, and `@production` changes in exactly one call, made last. So
`@production` is never unset and only ever names either the version it named before or a
version that passed every check. `@previous` is set first; if the production call then fails,
`@previous` is put back as it was. A concurrent promotion is detected afterwards (the alias
is read back) but not prevented.

The checks: the version's gate verdict, re-derived from its report with this profile's gates;
its SHA256SUMS and report against the registry's record (`manifest`); and, when another
version is in production, a head-to-head on this project's held-out data that it must win by
`evaluate.gates.min_margin_over_production` (`challenge`). So promotion can only improve
production. `rollback` returns to `@previous`, a version that served before: it runs the
first checks but no head-to-head.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from suradapter.config import Params
from suradapter.provenance import (
    ADAPTER_WEIGHTS_PATH,
    ARTIFACTS_DIR,
    CHECKSUMS_FILE,
    EVAL_REPORT_PATH,
    parse_checksums,
    sha256_file,
)
from suradapter.registry.challenge import Challenge, ProductionNotImproved, challenge_production
from suradapter.registry.errors import RegistryError
from suradapter.registry.manifest import MANIFEST_TAG
from suradapter.registry.report import judge_report, load_report
from suradapter.registry.store import (
    CANDIDATE,
    PREVIOUS,
    PRODUCTION,
    aliases_of,
    connect,
    download_version_file,
    get_version,
    version_for_ref,
)


@dataclass
class Promotion:
    """Where `@production` and `@previous` point after a promotion or rollback."""

    model_name: str
    production: str
    previous: str | None
    changed: bool  # False when the version already was in production
    challenge: Challenge | None = None  # the head-to-head with the old production, if any


def _verdict_problem(tags: dict[str, str]) -> list[str]:
    if tags.get("gate_verdict") == "passed":
        return []
    failures = tags.get("gate_failures", "")
    return [
        f"its gate_verdict is {tags.get('gate_verdict', 'missing')!r}"
        + (f" ({failures})" if failures else "")
    ]


def promotion_problems(params: Params, name: str, version: ModelVersion) -> list[str]:
    """Why `version` may not serve: its verdict tag, its report judged with this profile's
    gates, and its SHA256SUMS and report against the registry's record ([] if none)."""
    tags = version.tags or {}
    problems = _verdict_problem(tags)
    recorded = parse_checksums(tags.get(MANIFEST_TAG) or "")
    if not recorded:
        return [
            *problems,
            f"it has no '{MANIFEST_TAG}' tag (registered by an older `sur register`), so its "
            "files cannot be checked against the registry: register it again",
        ]
    number = str(version.version)
    with tempfile.TemporaryDirectory(prefix="sur-promote-") as scratch:
        try:
            sums = download_version_file(
                name, number, f"{ARTIFACTS_DIR}/{CHECKSUMS_FILE}", Path(scratch)
            )
            report_path = download_version_file(
                name, number, f"{ARTIFACTS_DIR}/{EVAL_REPORT_PATH}", Path(scratch)
            )
        except Exception as err:
            return [*problems, f"its eval report or SHA256SUMS cannot be read ({err})"]
        if parse_checksums(sums.read_text()) != recorded:
            problems.append(f"its {CHECKSUMS_FILE} differs from the registry's record")
        if recorded.get(EVAL_REPORT_PATH) != sha256_file(report_path):
            problems.append(f"its {EVAL_REPORT_PATH} differs from the registry's record")
        adapter_sha256 = recorded.get(ADAPTER_WEIGHTS_PATH, "")
        if tags.get("adapter_sha256") != adapter_sha256:
            problems.append("its adapter_sha256 tag differs from the weights in its manifest")
        try:
            report = load_report(report_path)
        except RegistryError as err:
            return [*problems, str(err)]
    problems += judge_report(report, adapter_sha256, params.evaluate.gates).reasons
    return list(dict.fromkeys(problems))


def check_promotable(params: Params, name: str, version: ModelVersion) -> None:
    """Raise RegistryError listing every reason `version` may not go to production."""
    problems = promotion_problems(params, name, version)
    if problems:
        raise RegistryError(
            f"version {version.version} of {name} cannot be promoted: {'; '.join(problems)}"
        )


def move_production(
    client: MlflowClient, name: str, target: str, new_previous: str | None, old_previous: str | None
) -> None:
    """Set `@previous` to `new_previous` (if any), then `@production` to `target` in one call.

    Raises RegistryError (with `@previous` restored) if the production call fails.
    """
    moves_previous = new_previous is not None and new_previous != old_previous
    if moves_previous:
        try:
            client.set_registered_model_alias(name, PREVIOUS, new_previous)
        except Exception as err:
            message = f"could not set @previous of {name} ({err}); nothing moved"
            raise RegistryError(message) from err
    try:
        client.set_registered_model_alias(name, PRODUCTION, target)
    except Exception as err:
        if moves_previous:
            _restore_previous(client, name, old_previous)
        kept = f"version {new_previous}" if new_previous else "unset"
        raise RegistryError(
            f"could not move @production of {name} to version {target} ({err}); "
            f"@production was left as it was ({kept})"
        ) from err
    now = aliases_of(client, name).get(PRODUCTION)
    if now != target:
        raise RegistryError(
            f"@production of {name} names version {now}, not {target}: another promotion ran "
            "at the same time; check `sur registry status`"
        )


def _restore_previous(client: MlflowClient, name: str, old_previous: str | None) -> None:
    try:
        if old_previous is None:
            client.delete_registered_model_alias(name, PREVIOUS)
        else:
            client.set_registered_model_alias(name, PREVIOUS, old_previous)
    except Exception:
        pass  # best effort: production, the alias that matters, did not move


def promote(params: Params, version: str | None = None, from_alias: str | None = None) -> Promotion:
    """Move `@production` to `version` (or to what `from_alias`, default `candidate`, names).

    The old production becomes `@previous`. Raises RegistryError for a missing version or
    alias or a version without a passing report, and ProductionNotImproved when it does not
    beat the version in production; nothing moves then.
    """
    if version is not None and from_alias is not None:
        raise RegistryError("give a version or an alias to promote from, not both")
    client = connect(params)
    name = params.registry.model_name
    ref = version if version is not None else "@" + (from_alias or CANDIDATE).removeprefix("@")
    target = version_for_ref(client, name, str(ref))
    aliases = aliases_of(client, name)
    check_promotable(params, name, target)
    number, current = str(target.version), aliases.get(PRODUCTION)
    if current == number:
        return Promotion(name, current, aliases.get(PREVIOUS), changed=False)
    challenge = None
    if current is not None:
        challenge = challenge_production(params, client, target, get_version(client, name, current))
        if not challenge.passed:
            raise ProductionNotImproved(
                f"version {number} of {name} cannot be promoted: {challenge.describe()}; "
                f"@production stays at version {current}"
            )
        now = aliases_of(client, name).get(PRODUCTION)
        if now != current:
            raise RegistryError(
                f"@production of {name} moved from version {current} to {now} while version "
                f"{number} was compared with it; nothing moved: promote again"
            )
    move_production(client, name, number, current, aliases.get(PREVIOUS))
    return Promotion(name, number, current or aliases.get(PREVIOUS), True, challenge)


def rollback(params: Params) -> Promotion:
    """Swap `@production` and `@previous`. Raises RegistryError when there is no `@previous`
    or it fails its checks (no head-to-head: it served before)."""
    client = connect(params)
    name = params.registry.model_name
    aliases = aliases_of(client, name)
    previous, current = aliases.get(PREVIOUS), aliases.get(PRODUCTION)
    if previous is None:
        raise RegistryError(f"{name} has no @previous version to roll back to")
    if previous == current:
        raise RegistryError(f"nothing to roll back: @previous and @production are both {current}")
    target = get_version(client, name, previous)
    check_promotable(params, name, target)
    move_production(client, name, previous, current, previous)
    return Promotion(name, previous, current or previous, changed=True)
