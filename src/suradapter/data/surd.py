"""Read and validate a SURD folder: `metadata.jsonl` rows `{file_name, text, prompt}` beside images.

Every row either becomes a `SurdSample` or a `Quarantined` record with its line number and
reason; nothing is dropped silently, and one bad row never affects the rows around it.
`file_name` may lack its extension, as in the released SURD: it resolves when exactly one
image matches.

Hostile input is a row reason, never an exception: metadata is decoded as strict UTF-8, an image
(or a folder above it) that is a symlink resolving outside the SURD folder is refused, an image
header declaring more than `max_image_pixels` is refused before any pixel is decoded, and a
truncated file is refused even where another module set PIL's `LOAD_TRUNCATED_IMAGES`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

METADATA_FILE = "metadata.jsonl"
REQUIRED_FIELDS = ("file_name", "text", "prompt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Decoders PIL may pick (by content, not name): no EPS/PDF (Ghostscript) or exotic plugins.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG also opens MPO
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
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

    def known(self) -> KnownImage:
        """Return what the reuse memo keeps of this sample (keyed by `image_path`)."""
        return KnownImage(
            self.file_size, self.file_mtime_ns, self.text, self.prompt, self.sample_id,
            self.width, self.height,
        )  # fmt: skip


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
    """What a previous run learned about one source image (to skip re-reading it).

    Keyed by the image's real path in the reuse memo, which lives outside the prepared output.
    """

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
    max_image_pixels: int


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
    an image's real path to what a previous run saw; when the file's size and mtime and the
    row's texts still match, the image is neither read nor decoded again.
    """
    known = known or {}
    root = os.path.realpath(source)
    seen: dict[str, int] = {}
    with metadata_path(source).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                detail = f"{METADATA_FILE} line is not UTF-8 at byte {err.start}: {err.reason}"
                text = raw.decode(errors="backslashreplace")
                yield _quarantine(number, "invalid_utf8", detail, text)
                continue
            result = _validate_line(source, root, number, line, limits, known)
            if isinstance(result, SurdSample):
                first = seen.setdefault(result.sample_id, number)
                if first != number:
                    result = _quarantine(number, "duplicate", f"same content as line {first}", line)
            yield result


class _Rejected(ValueError):
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
        seen = known.get(image_path)
        if seen and (seen.file_size, seen.file_mtime_ns, seen.text, seen.prompt) == (
            stat.st_size,
            stat.st_mtime_ns,
            row["text"],
            row["prompt"],
        ):
            sample_id, width, height = seen.sample_id, seen.width, seen.height
        else:
            image_bytes = _read_bytes(image_path, row["file_name"])
            sample_id = content_hash(row["text"], row["prompt"], image_bytes)
            if seen and seen.sample_id == sample_id:  # touched, same content
                width, height = seen.width, seen.height
            else:
                decoded = decode_rgb(image_bytes, row["file_name"], limits.max_image_pixels)
                width, height = decoded.size
        _check_size(row["file_name"], width, height, limits)
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
    except (ValueError, RecursionError) as err:  # also too deep, or an over-long integer
        raise _Rejected("invalid_json", str(err) or type(err).__name__) from None
    if not isinstance(row, dict):
        raise _Rejected("invalid_json", "row is not a JSON object")
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        escape = err.object[err.start : err.end].encode("unicode_escape").decode()
        detail = f"a JSON escape encodes a lone surrogate ({escape}), which is not UTF-8 text"
        raise _Rejected("invalid_utf8", detail) from None
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
    """Return (real path, stat) of the image for `file_name`, adding a missing extension when
    exactly one image fits.

    `root` is `realpath(source)` when the caller has it. Raises _Rejected (image_missing,
    image_ambiguous, or image_outside_source for `../`, absolute names, and symlinks of the
    file or a folder above it that resolve outside `source`) naming the file.
    """
    root = root or os.path.realpath(source)
    candidate = os.path.normpath(os.path.join(root, file_name))
    if not _inside(candidate, root):
        detail = f"image '{file_name}' points outside the SURD folder"
        raise _Rejected("image_outside_source", detail)
    path = candidate if _is_file(candidate) else _with_extension(candidate, file_name)
    real = os.path.realpath(path)
    if not _inside(real, root):
        detail = f"image '{file_name}' is a symlink (or under one) leading out of the SURD folder"
        raise _Rejected("image_outside_source", detail)
    try:
        return real, os.stat(real)
    except (OSError, ValueError) as err:
        raise _Rejected("image_missing", f"image '{file_name}': {err.strerror or err}") from None


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath((path, root)) == root


def _is_file(path: str) -> bool:
    try:
        return S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, name too long, NUL byte
        return False


def _with_extension(candidate: str, file_name: str) -> str:
    """The one image `candidate.<ext>`; raises _Rejected (image_missing or image_ambiguous)."""
    if not os.path.splitext(candidate)[1]:
        try:
            found = glob.glob(glob.escape(candidate) + ".*")
        except ValueError:  # a NUL byte in the name
            found = []
        matches = sorted(
            path
            for path in found
            if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES and _is_file(path)
        )
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(os.path.basename(path) for path in matches)
            raise _Rejected("image_ambiguous", f"image '{file_name}' matches {names}")
    raise _Rejected("image_missing", f"image '{file_name}' not found in the SURD folder")


def _read_bytes(path: str, file_name: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise _Rejected("image_missing", f"image '{file_name}': {err.strerror}") from None


def decode_rgb(image_bytes: bytes, file_name: str, max_pixels: int | None = None) -> Image.Image:
    """Return the fully decoded image as RGB, upright (EXIF orientation applied), alpha
    composited on white, 16-bit greys scaled to 8 bits, and no metadata.

    Raises _Rejected (a ValueError): image_too_large when the header declares more than
    `max_pixels` (checked before decoding; PIL's own bomb limit applies too), image_truncated,
    or image_undecodable, each naming `file_name`.
    """
    try:
        with _strict_pil(), Image.open(io.BytesIO(image_bytes), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise _Rejected("image_too_large", _too_large(file_name, width, height, max_pixels))
            image.verify()
        with _strict_pil(), Image.open(io.BytesIO(image_bytes), formats=IMAGE_FORMATS) as image:
            image.load()
            return _as_rgb(ImageOps.exif_transpose(image))
    except _Rejected:
        raise
    except Image.DecompressionBombError as err:
        raise _Rejected("image_too_large", f"'{file_name}': {err}") from None
    except UnidentifiedImageError:
        detail = f"'{file_name}' is not a readable image ({', '.join(IMAGE_FORMATS)})"
        raise _Rejected("image_undecodable", detail) from None
    except Exception as err:  # a hostile file may trip any decoder's error
        message = str(err) or type(err).__name__
        reason = "image_truncated" if "truncated" in message.lower() else "image_undecodable"
        raise _Rejected(reason, f"'{file_name}': {message}") from None


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = image.convert("RGB")
    rgb.info = {}
    return rgb


@contextmanager
def _strict_pil() -> Iterator[None]:
    """Refuse truncated files even if another module set `ImageFile.LOAD_TRUNCATED_IMAGES`."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _too_large(file_name: str, width: int, height: int, max_pixels: int) -> str:
    return f"'{file_name}' declares {width}x{height} = {width * height} px > {max_pixels}"


def _check_size(file_name: str, width: int, height: int, limits: ValidationLimits) -> None:
    """Raise _Rejected when the image is larger than max_image_pixels or smaller than
    min_image_size (also for images a previous run decoded, under other limits)."""
    if width * height > limits.max_image_pixels:
        raise _Rejected(
            "image_too_large", _too_large(file_name, width, height, limits.max_image_pixels)
        )
    if min(width, height) < limits.min_image_size:
        detail = f"'{file_name}' is {width}x{height} < {limits.min_image_size}px"
        raise _Rejected("image_too_small", detail)
