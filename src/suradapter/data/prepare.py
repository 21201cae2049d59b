"""The prepare stage: SURD folder -> Parquet manifest, normalised images, split and quarantine.

Output folder layout:
  manifest.parquet         one row per kept sample (schema: `MANIFEST_SCHEMA`)
  images/<id>_<res>.png    images normalised to the params resolution, content-addressed
  quarantine.jsonl         rejected rows: line, reason, detail, raw text
  summary.json             counts (rows read, kept, reused, quarantined by reason, per split)

The split is a pure function of the sample id, so adding rows never moves an existing row;
rows marked held out (shapes world) never go to `train`.

Reproducible: the output is a function of the source bytes and the params alone (no mtimes,
no paths of this machine, rows in metadata order, deterministic Parquet and PNG bytes), so a
touched or moved source prepares to the same bytes and DVC reruns nothing downstream.

Incremental and crash-safe: images are immutable and named by content hash and resolution,
each written through a temp file and a rename, so a previous manifest never points at a
changed or half-written image. The report files are staged and renamed into place with the
manifest last; images no manifest refers to are pruned only after that. A source image whose
size, mtime and texts match the previous run is neither re-read nor re-decoded: that memo is
`<output_dir>.reuse-memo.json`, beside the output and never part of it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from suradapter.atomic import atomic_write_bytes
from suradapter.config import PrepareParams
from suradapter.data.surd import (
    KnownImage,
    Quarantined,
    SurdSample,
    ValidationLimits,
    content_hash,
    decode_rgb,
    metadata_path,
    read_surd,
)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
STAGING_PREFIX = ".staging-"
REJECTED_QUARANTINE_SUFFIX = ".rejected-quarantine.jsonl"
MEMO_SUFFIX = ".reuse-memo.json"
MEMO_VERSION = 1
# Bump when normalise_image changes its pixels: images of an older recipe are then rewritten.
IMAGE_RECIPE = 2  # 2: EXIF orientation, alpha on white, 16-bit greys scaled, no metadata
SPLITS = ("train", "val", "test")
MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("text", pa.string()),
        ("prompt", pa.string()),
        ("image_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
        ("heldout", pa.string()),
        ("source_line", pa.int64()),
        ("source_file", pa.string()),
        ("source_size", pa.int64()),
        ("attributes", pa.string()),
    ]
)


class PrepareError(RuntimeError):
    """The stage refused to publish its output (too many bad rows)."""


@dataclass
class PrepareSummary:
    rows_read: int = 0
    kept: int = 0
    reused: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)

    @property
    def bad_fraction(self) -> float:
        return sum(self.quarantined.values()) / self.rows_read if self.rows_read else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "reused": self.reused,
            "quarantined": dict(self.quarantined.most_common()),
            "bad_fraction": round(self.bad_fraction, 6),
            "splits": {name: self.splits.get(name, 0) for name in SPLITS},
        }

    def record(self, resolution: int) -> dict[str, Any]:
        """Return what `summary.json` holds: `as_dict` less what depends on earlier runs."""
        counts = {key: value for key, value in self.as_dict().items() if key != "reused"}
        return {**counts, "resolution": resolution, "image_recipe": IMAGE_RECIPE}


def assign_split(sample_id: str, heldout: str, val_fraction: float, test_fraction: float) -> str:
    """Return the split of a sample from its id alone; held-out rows go to val or test only."""
    position = int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / float(1 << 48)
    if heldout != "none":
        return "val" if position < 0.5 else "test"
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def normalise_image(image_bytes: bytes, resolution: int, name: str = "image") -> Image.Image:
    """Return an RGB image of side `resolution`: upright and flattened (`decode_rgb`),
    centre-cropped to square, then resized. Raises ValueError on unreadable bytes.

    An RGB image already at that size is returned pixel for pixel.
    """
    image = decode_rgb(image_bytes, name)
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def image_relpath(sample_id: str, resolution: int) -> str:
    """Return the manifest's `image_path` of a sample at `resolution`."""
    return f"{IMAGES_DIR}/{sample_id}_{resolution}.png"


def prepared_resolution(manifest: Path) -> int | None:
    """The resolution the prepared dataset beside `manifest` was normalised to (None: unknown)."""
    summary = Path(manifest).parent / SUMMARY_FILE
    return json.loads(summary.read_text()).get("resolution") if summary.is_file() else None


def resolve_source(params: PrepareParams, source: Path | None = None) -> Path:
    """The SURD folder to ingest: `source`, else `prepare.source`. Raises PrepareError if
    neither is set (real profiles leave it to the user)."""
    chosen = source or params.source
    if chosen is None:
        raise PrepareError(
            "prepare.source is not set: point it at your SURD folder (metadata.jsonl beside "
            "the images) in configs/<profile>.yaml, or pass `sur prepare --source DIR`"
        )
    return Path(chosen)


def prepare_dataset(
    params: PrepareParams,
    source: Path | None = None,
    out_dir: Path | None = None,
    limit: int | None = None,
) -> PrepareSummary:
    """Run the stage (on the first `limit` rows only, when given: smoke runs); return its
    summary. Raises PrepareError when too many rows are bad.

    On any error the previous manifest and the images it names stay as they were.
    """
    source = resolve_source(params, source)
    out_dir = Path(out_dir or params.output_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        summary, rows, memo = _build(params, source, out_dir, staging, limit)
        if summary.bad_fraction > params.max_bad_fraction:
            rejected = out_dir.with_name(out_dir.name + REJECTED_QUARANTINE_SUFFIX)
            shutil.copyfile(staging / QUARANTINE_FILE, rejected)
            raise PrepareError(_refusal(summary, params.max_bad_fraction, rejected))
        for name in (QUARANTINE_FILE, SUMMARY_FILE, MANIFEST_FILE):  # manifest last: the commit
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_memo(out_dir, memo)
    _prune_images(out_dir, {row["image_path"] for row in rows})
    return summary


def memo_path(out_dir: Path) -> Path:
    """Return the reuse memo of `out_dir`: beside it, so it never enters the output's hash."""
    return out_dir.with_name(out_dir.name + MEMO_SUFFIX)


def _build(
    params: PrepareParams, source: Path, out_dir: Path, staging: Path, limit: int | None
) -> tuple[PrepareSummary, list[dict[str, Any]], dict[str, KnownImage]]:
    limits = ValidationLimits(
        params.max_prompt_chars, params.min_image_size, params.max_image_pixels
    )
    known = _read_memo(out_dir)
    existing = _reusable_images(out_dir)
    summary = PrepareSummary()
    rows: list[dict[str, Any]] = []
    memo: dict[str, KnownImage] = {}
    quarantine_file = staging / QUARANTINE_FILE  # backslashreplace: undecodable file names
    with quarantine_file.open("w", encoding="utf-8", errors="backslashreplace") as quarantine:
        items = itertools.islice(read_surd(source, limits, known=known), limit)
        total = min(count_rows(source), limit or sys.maxsize)
        for item in tqdm(items, desc="prepare", unit="row", total=total):
            summary.rows_read += 1
            if isinstance(item, Quarantined):
                summary.quarantined[item.reason] += 1
                quarantine.write(json.dumps(item.as_record(), ensure_ascii=False) + "\n")
                continue
            row = _manifest_row(item, params)
            if row["image_path"] in existing:
                summary.reused += 1
            else:
                _write_image(item, out_dir, row["image_path"], params.resolution)
                existing.add(row["image_path"])
            summary.kept += 1
            summary.splits[row["split"]] += 1
            rows.append(row)
            memo[item.image_path] = item.known()
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, staging / MANIFEST_FILE, compression="snappy")  # no times in Parquet
    record = summary.record(params.resolution)
    (staging / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return summary, rows, memo


def _write_image(sample: SurdSample, out_dir: Path, relpath: str, resolution: int) -> None:
    """Normalise the sample's image into `out_dir/relpath`. Raises PrepareError when the source
    no longer has the content validated (changed meanwhile, or edited keeping size and mtime)."""
    image_bytes = Path(sample.image_path).read_bytes()
    if content_hash(sample.text, sample.prompt, image_bytes) != sample.sample_id:
        memo_path(out_dir).unlink(missing_ok=True)  # the next run re-reads every image
        raise PrepareError(
            f"SURD image '{sample.file_name}' (line {sample.line}) changed while prepare ran, "
            "or was edited keeping its size and mtime: run `sur prepare` again"
        )
    buffer = io.BytesIO()
    normalise_image(image_bytes, resolution, sample.file_name).save(buffer, format="PNG")
    atomic_write_bytes(out_dir / relpath, buffer.getvalue(), durable=False)


def _manifest_row(sample: SurdSample, params: PrepareParams) -> dict[str, Any]:
    heldout = str(sample.attributes.get("heldout", "none"))
    return {
        "sample_id": sample.sample_id,
        "text": sample.text,
        "prompt": sample.prompt,
        "image_path": image_relpath(sample.sample_id, params.resolution),
        "width": sample.width,
        "height": sample.height,
        "split": assign_split(sample.sample_id, heldout, params.val_fraction, params.test_fraction),
        "heldout": heldout,
        "source_line": sample.line,
        "source_file": sample.file_name,
        "source_size": sample.file_size,
        "attributes": json.dumps(sample.attributes, sort_keys=True, ensure_ascii=False),
    }


def _reusable_images(out_dir: Path) -> set[str]:
    """The `image_path`s already in `out_dir` that the current image recipe made."""
    summary = out_dir / SUMMARY_FILE
    if not summary.is_file() or json.loads(summary.read_text()).get("image_recipe") != IMAGE_RECIPE:
        return set()
    return {f"{IMAGES_DIR}/{name}" for name in os.listdir(out_dir / IMAGES_DIR)}


def _read_memo(out_dir: Path) -> dict[str, KnownImage]:
    """Return real image path -> what the last run saw, or {} (no memo, or another version)."""
    try:
        memo = json.loads(memo_path(out_dir).read_text())
        if memo.get("version") != MEMO_VERSION:
            return {}
        return {path: KnownImage(*values) for path, values in memo["images"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # absent or damaged
        return {}


def _write_memo(out_dir: Path, memo: dict[str, KnownImage]) -> None:
    images = {path: astuple(known) for path, known in memo.items()}
    data = json.dumps({"version": MEMO_VERSION, "images": images})  # ASCII: any path fits
    atomic_write_bytes(memo_path(out_dir), data.encode(), durable=False)


def _prune_images(out_dir: Path, keep: set[str]) -> None:
    for name in os.listdir(out_dir / IMAGES_DIR):
        if f"{IMAGES_DIR}/{name}" not in keep:
            (out_dir / IMAGES_DIR / name).unlink(missing_ok=True)


def count_rows(source: Path) -> int:
    """The rows (non-blank metadata lines) of a SURD folder."""
    with metadata_path(source).open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _refusal(summary: PrepareSummary, threshold: float, rejected: Path) -> str:
    worst = ", ".join(f"{reason} ({count})" for reason, count in summary.quarantined.most_common(3))
    return (
        f"{sum(summary.quarantined.values())} of {summary.rows_read} rows are bad "
        f"({summary.bad_fraction:.1%} > max_bad_fraction {threshold:.0%}); worst reasons: "
        f"{worst}. The previous output was left as it was; the rejected rows are in {rejected}."
    )
