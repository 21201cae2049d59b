"""The prepare stage: SURD folder -> Parquet manifest, normalised images, split and quarantine.

Output folder layout:
  manifest.parquet         one row per kept sample (schema: `MANIFEST_SCHEMA`)
  images/<id>_<res>.png    images normalised to the params resolution, content-addressed
  quarantine.jsonl         rejected rows: line, reason, detail, raw text
  summary.json             counts (rows read, kept, reused, quarantined by reason, per split)

The split is a pure function of the sample id, so adding rows never moves an existing row;
rows marked held out (shapes world) never go to `train`.

Incremental and crash-safe: images are immutable and named by content hash and resolution,
each written through a temp file and a rename, so a previous manifest never points at a
changed or half-written image. The report files are staged and renamed into place with the
manifest last; images no manifest refers to are pruned only after that. A source image whose
size, mtime and texts match the previous run is neither re-read nor re-decoded.
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
from dataclasses import dataclass, field
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
    metadata_path,
    read_surd,
)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
STAGING_PREFIX = ".staging-"
REJECTED_QUARANTINE_SUFFIX = ".rejected-quarantine.jsonl"
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
        ("source_mtime_ns", pa.int64()),
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


def normalise_image(image_bytes: bytes, resolution: int) -> Image.Image:
    """Return an RGB image of side `resolution`: centre-cropped to square, then resized.

    An image already at that size is returned pixel for pixel.
    """
    with Image.open(io.BytesIO(image_bytes)) as source:
        image = source.convert("RGB")
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
        summary, rows = _build(params, source, out_dir, staging, limit)
        if summary.bad_fraction > params.max_bad_fraction:
            rejected = out_dir.with_name(out_dir.name + REJECTED_QUARANTINE_SUFFIX)
            shutil.copyfile(staging / QUARANTINE_FILE, rejected)
            raise PrepareError(_refusal(summary, params.max_bad_fraction, rejected))
        for name in (QUARANTINE_FILE, SUMMARY_FILE, MANIFEST_FILE):  # manifest last: the commit
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune_images(out_dir, {row["image_path"] for row in rows})
    return summary


def _build(
    params: PrepareParams, source: Path, out_dir: Path, staging: Path, limit: int | None
) -> tuple[PrepareSummary, list[dict[str, Any]]]:
    limits = ValidationLimits(params.max_prompt_chars, params.min_image_size)
    known = _previous_sources(out_dir, source)
    existing = {f"{IMAGES_DIR}/{name}" for name in os.listdir(out_dir / IMAGES_DIR)}
    summary = PrepareSummary()
    rows: list[dict[str, Any]] = []
    with (staging / QUARANTINE_FILE).open("w", encoding="utf-8") as quarantine:
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
                _write_image(item, out_dir / row["image_path"], params.resolution)
            summary.kept += 1
            summary.splits[row["split"]] += 1
            rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), staging / MANIFEST_FILE)
    record = {**summary.as_dict(), "source": str(source), "resolution": params.resolution}
    (staging / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return summary, rows


def _write_image(sample: SurdSample, path: Path, resolution: int) -> None:
    buffer = io.BytesIO()
    normalise_image(Path(sample.image_path).read_bytes(), resolution).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue(), durable=False)


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
        "source_mtime_ns": sample.file_mtime_ns,
        "attributes": json.dumps(sample.attributes, sort_keys=True, ensure_ascii=False),
    }


def _previous_sources(out_dir: Path, source: Path) -> dict[str, KnownImage]:
    """Return file_name -> what the previous run (of the same source) saw, or {}."""
    manifest, summary = out_dir / MANIFEST_FILE, out_dir / SUMMARY_FILE
    if not (manifest.is_file() and summary.is_file()):
        return {}
    if json.loads(summary.read_text()).get("source") != str(source):
        return {}
    columns = ["source_file", "source_size", "source_mtime_ns", "text", "prompt", "sample_id"]
    table = pq.read_table(manifest, columns=[*columns, "width", "height"]).to_pydict()
    return {
        values[0]: KnownImage(*values[1:])
        for values in zip(*(table[name] for name in [*columns, "width", "height"]), strict=True)
    }


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
