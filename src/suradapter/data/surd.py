"""Read and validate a SURD folder: `metadata.jsonl` rows `{file_name, text, prompt}` beside images.

Every row either becomes a `SurdSample` or a `Quarantined` record with its line number and
reason; nothing is dropped silently, and one bad row never affects the rows around it.
`file_name` may lack its extension, as in the released SURD: it resolves when exactly one
image matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from PIL import Image, UnidentifiedImageError

METADATA_FILE = "metadata.jsonl"
REQUIRED_FIELDS = ("file_name", "text", "prompt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RAW_LINE_LIMIT = 2000


class SurdError(ValueError):
    """The SURD source itself is unusable (no folder, no metadata file)."""


@dataclass(frozen=True)
class SurdSample:
    """A validated row: texts, the resolved image, and its content hash (the sample id)."""

    line: int
    sample_id: str
    text: str
    prompt: str
    image_path: str
    file_name: str
    file_size: int
    file_mtime_ns: int
    width: int
    height: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Quarantined:
    """A rejected row: where it was, why, and what it said."""

    line: int
    reason: str
    detail: str
    raw: str

    def as_record(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "detail": self.detail, "raw": self.raw}


@dataclass(frozen=True)
class KnownImage:
    """What a previous run learned about one source image (to skip re-reading it)."""

    file_size: int
    file_mtime_ns: int
    text: str
    prompt: str
    sample_id: str
    width: int
    height: int


@dataclass(frozen=True)
class ValidationLimits:
    max_prompt_chars: int
    min_image_size: int


def content_hash(text: str, prompt: str, image_bytes: bytes) -> str:
    """Return the sample id: sha256 over both prompts and the image bytes (32 hex chars)."""
    digest = hashlib.sha256()
    for part in (text.encode(), prompt.encode(), image_bytes):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:32]


def metadata_path(source: Path) -> Path:
    """Return `source/metadata.jsonl`. Raises SurdError naming what is missing."""
    if not source.is_dir():
        raise SurdError(f"SURD source {source} is not a folder")
    path = source / METADATA_FILE
    if not path.is_file():
        raise SurdError(f"SURD source {source} has no {METADATA_FILE}")
    return path


def read_surd(
    source: Path, limits: ValidationLimits, known: Mapping[str, KnownImage] | None = None
) -> Iterator[SurdSample | Quarantined]:
    """Yield one `SurdSample` or `Quarantined` per non-blank metadata line, in file order.

    Exact duplicates (same content hash as an earlier good row) are quarantined. `known` maps
    a row's `file_name` to what a previous run saw; when the file's size and mtime and the
    row's texts still match, the image is neither read nor decoded again.
    """
    known = known or {}
    root = os.path.realpath(source)
    seen: dict[str, int] = {}
    with metadata_path(source).open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            result = _validate_line(source, root, number, line, limits, known)
            if isinstance(result, SurdSample):
                first = seen.setdefault(result.sample_id, number)
                if first != number:
                    result = _quarantine(number, "duplicate", f"same content as line {first}", line)
            yield result


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _quarantine(line: int, reason: str, detail: str, raw: str) -> Quarantined:
    return Quarantined(line, reason, detail, raw.rstrip("\n")[:RAW_LINE_LIMIT])


def _validate_line(
    source: Path,
    root: str,
    number: int,
    line: str,
    limits: ValidationLimits,
    known: Mapping[str, KnownImage],
) -> SurdSample | Quarantined:
    try:
        row = _parse_row(line, limits)
        image_path, stat = resolve_image(source, row["file_name"], root)
        seen = known.get(row["file_name"])
        if seen and (seen.file_size, seen.file_mtime_ns, seen.text, seen.prompt) == (
            stat.st_size,
            stat.st_mtime_ns,
            row["text"],
            row["prompt"],
        ):
            sample_id, width, height = seen.sample_id, seen.width, seen.height
        else:
            sample_id = content_hash(row["text"], row["prompt"], _read_bytes(image_path))
            if seen and seen.sample_id == sample_id:  # touched, same content
                width, height = seen.width, seen.height
            else:
                width, height = _decoded_size(image_path, limits.min_image_size)
    except _Rejected as rejected:
        return _quarantine(number, rejected.reason, rejected.detail, line)
    return SurdSample(
        line=number,
        sample_id=sample_id,
        text=row["text"],
        prompt=row["prompt"],
        image_path=image_path,
        file_name=row["file_name"],
        file_size=stat.st_size,
        file_mtime_ns=stat.st_mtime_ns,
        width=width,
        height=height,
        attributes={k: v for k, v in row.items() if k not in REQUIRED_FIELDS},
    )


def _parse_row(line: str, limits: ValidationLimits) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _Rejected("invalid_json", str(err)) from None
    if not isinstance(row, dict):
        raise _Rejected("invalid_json", "row is not a JSON object")
    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise _Rejected("missing_field", f"'{name}' is missing or empty")
        row[name] = value.strip()
    for name in ("text", "prompt"):
        if len(row[name]) > limits.max_prompt_chars:
            detail = f"'{name}' has {len(row[name])} chars > {limits.max_prompt_chars}"
            raise _Rejected("prompt_too_long", detail)
    return row


def resolve_image(
    source: Path, file_name: str, root: str | None = None
) -> tuple[str, os.stat_result]:
    """Return (path, stat) of the image for `file_name`, adding a missing extension when
    exactly one image fits.

    `root` is `realpath(source)` when the caller has it. Raises _Rejected (image_missing or
    image_ambiguous) naming the file.
    """
    root = root or os.path.realpath(source)
    candidate = os.path.normpath(os.path.join(root, file_name))
    if not candidate.startswith(root + os.sep):
        raise _Rejected("image_missing", f"image '{file_name}' points outside {source}")
    try:
        stat = os.stat(candidate)
        if S_ISREG(stat.st_mode):
            return candidate, stat
    except OSError:
        pass
    if not os.path.splitext(candidate)[1]:
        matches = sorted(
            path
            for path in Path(candidate).parent.glob(Path(candidate).name + ".*")
            if path.suffix.lower() in IMAGE_SUFFIXES
        )
        if len(matches) == 1:
            return str(matches[0]), matches[0].stat()
        if matches:
            names = ", ".join(path.name for path in matches)
            raise _Rejected("image_ambiguous", f"image '{file_name}' matches {names}")
    raise _Rejected("image_missing", f"image '{file_name}' not found under {source}")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _decoded_size(path: str, min_size: int) -> tuple[int, int]:
    """Return (width, height) after a full decode. Raises _Rejected when it fails or is small."""
    name = os.path.basename(path)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except UnidentifiedImageError:
        raise _Rejected("image_undecodable", f"'{name}' is not a readable image") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "image_truncated" if "truncated" in str(err).lower() else "image_undecodable"
        raise _Rejected(reason, f"'{name}': {err}") from None
    if min(width, height) < min_size:
        raise _Rejected("image_too_small", f"'{name}' is {width}x{height} < {min_size}px")
    return width, height
