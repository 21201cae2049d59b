"""Config mistakes a profile can make, found before any data is read or GPU time is spent.

Each check reads params and, at most, the base model's and the teacher's config files (never
their weights). `sur prepare` and `sur doctor` run them; the stages repeat the checks that
depend on what is actually on disk (the prepared resolution, the cached teacher width).
"""

from __future__ import annotations

from pathlib import Path

from suradapter.config import Params
from suradapter.data.prepare import PrepareError, resolve_source
from suradapter.model.specs import check_resolution, declared_native_resolution


class ConfigMistake(ValueError):
    """Params that would waste a run: the message names the keys and the fix."""


def surd_source(params: Params, override: Path | None = None) -> Path:
    """The SURD folder this profile ingests. Raises ConfigMistake when it is unset, or when it
    is the shapes world while the profile prepares images at another size."""
    try:
        source = resolve_source(params.prepare, override)
    except PrepareError as err:
        raise ConfigMistake(str(err)) from None
    if (
        source == Path(params.shapes.output_dir)
        and params.prepare.resolution != params.shapes.image_size
    ):
        raise ConfigMistake(
            f"prepare.source '{source}' is the shapes world ({params.shapes.image_size} px "
            f"renders), but profile '{params.profile}' prepares {params.prepare.resolution} px "
            f"images for base_model.id '{params.base_model.id}': set prepare.source to your "
            "SURD folder"
        )
    return source


def check_base_resolution(params: Params) -> None:
    """Raises ConfigMistake when prepare.resolution is not the base model's native size
    (read from its configs; unchecked when they are not on this machine)."""
    native = declared_native_resolution(params.base_model)
    try:
        check_resolution(params.prepare.resolution, native, params.base_model.id)
    except ValueError as err:
        raise ConfigMistake(str(err)) from None


def check_teacher(params: Params) -> None:
    """Raises ConfigMistake when the teacher lacks `embed.layer` or its width is not
    `adapter.teacher_dim`."""
    from suradapter.teacher.model import (
        TeacherNotFoundError,
        checked_teacher_dim,
        hooked_layer_index,
        teacher_config,
    )

    embed = params.embed
    try:
        config = teacher_config(embed)
        hooked_layer_index(embed, config.num_hidden_layers)
        checked_teacher_dim(params.adapter.teacher_dim, config.hidden_size, embed.model)
    except (ValueError, TeacherNotFoundError) as err:
        raise ConfigMistake(str(err)) from None


def profile_mistakes(params: Params, source: Path | None = None) -> list[str]:
    """Every mistake the checks above find (an empty list when there is none)."""
    checks = (
        lambda: surd_source(params, source),
        lambda: check_base_resolution(params),
        lambda: check_teacher(params),
    )
    found = []
    for check in checks:
        try:
            check()
        except ConfigMistake as err:
            found.append(str(err))
    return found
