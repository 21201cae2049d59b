"""The prepare stage: SURD folder -> Parquet manifest, normalised images, split and quarantine.

Output folder layout:
  manifest.parquet   one row per kept sample (schema: `MANIFEST_SCHEMA`)
  images/<id>.png    images normalised to the params resolution
  quarantine.jsonl   rejected rows: line, reason, detail, raw text
  summary.json       counts (rows read, kept, reused, quarantined by reason, per split)

The split is a pure function of the sample id, so adding rows never moves an existing row.
Rows marked held out (shapes world) never go to `train`. Re-running reuses every image whose
id was already prepared at the same resolution. The folder is replaced atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from suradapter.atomic import link_or_copy, recover_dir, replace_dir, staging_dir
from suradapter.config import PrepareParams
from suradapter.data.surd import (
    Quarantined,
    SurdSample,
    ValidationLimits,
    metadata_path,
    read_surd,
)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
SUMMARY_FILE = "summary.json"
REJECTED_QUARANTINE_SUFFIX = ".rejected-quarantine.jsonl"
IMAGES_DIR = "images"
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


def prepare_dataset(
    params: PrepareParams, source: Path | None = None, out_dir: Path | None = None
) -> PrepareSummary:
    """Run the stage; return its summary. Raises PrepareError when too many rows are bad.

    On error the previous output stays as it was.
    """
    source = Path(source or params.source)
    out_dir = Path(out_dir or params.output_dir)
    recover_dir(out_dir)
    previous = _previous_samples(out_dir, params.resolution)
    staging = staging_dir(out_dir)
    try:
        summary = _build(params, source, out_dir, staging, previous)
        if summary.bad_fraction > params.max_bad_fraction:
            rejected = out_dir.with_name(out_dir.name + REJECTED_QUARANTINE_SUFFIX)
            shutil.copyfile(staging / QUARANTINE_FILE, rejected)
            raise PrepareError(_refusal(summary, params.max_bad_fraction, rejected))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)
    return summary


def _build(
    params: PrepareParams,
    source: Path,
    out_dir: Path,
    staging: Path,
    previous: dict[str, tuple[int, int]],
) -> PrepareSummary:
    limits = ValidationLimits(params.max_prompt_chars, params.min_image_size)
    (staging / IMAGES_DIR).mkdir()
    summary = PrepareSummary()
    rows: list[dict[str, Any]] = []
    with (staging / QUARANTINE_FILE).open("w", encoding="utf-8") as quarantine:
        items = read_surd(source, limits, known=previous)
        for item in tqdm(items, desc="prepare", unit="row", total=_count_lines(source)):
            summary.rows_read += 1
            if isinstance(item, Quarantined):
                summary.quarantined[item.reason] += 1
                quarantine.write(json.dumps(item.as_record(), ensure_ascii=False) + "\n")
                continue
            reused = _store_image(item, out_dir, staging, params.resolution, previous)
            summary.reused += reused
            row = _manifest_row(item, params)
            summary.kept += 1
            summary.splits[row["split"]] += 1
            rows.append(row)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, staging / MANIFEST_FILE)
    summary_record = {**summary.as_dict(), "source": str(source), "resolution": params.resolution}
    (staging / SUMMARY_FILE).write_text(json.dumps(summary_record, indent=2) + "\n")
    return summary


def _store_image(
    sample: SurdSample,
    out_dir: Path,
    staging: Path,
    resolution: int,
    previous: dict[str, tuple[int, int]],
) -> bool:
    """Write the normalised image into staging; return True when a previous one was reused."""
    name = f"{IMAGES_DIR}/{sample.sample_id}.png"
    old = out_dir / name
    if sample.sample_id in previous and old.is_file():
        link_or_copy(old, staging / name)
        return True
    normalise_image(sample.image_bytes, resolution).save(staging / name, format="PNG")
    return False


def _manifest_row(sample: SurdSample, params: PrepareParams) -> dict[str, Any]:
    heldout = str(sample.attributes.get("heldout", "none"))
    return {
        "sample_id": sample.sample_id,
        "text": sample.text,
        "prompt": sample.prompt,
        "image_path": f"{IMAGES_DIR}/{sample.sample_id}.png",
        "width": sample.width,
        "height": sample.height,
        "split": assign_split(
            sample.sample_id, heldout, params.val_fraction, params.test_fraction
        ),
        "heldout": heldout,
        "source_line": sample.line,
        "attributes": json.dumps(sample.attributes, sort_keys=True, ensure_ascii=False),
    }


def _previous_samples(out_dir: Path, resolution: int) -> dict[str, tuple[int, int]]:
    """Return id -> original (width, height) of a complete previous run at `resolution`."""
    manifest, summary = out_dir / MANIFEST_FILE, out_dir / SUMMARY_FILE
    if not (manifest.is_file() and summary.is_file()):
        return {}
    if json.loads(summary.read_text()).get("resolution") != resolution:
        return {}
    table = pq.read_table(manifest, columns=["sample_id", "width", "height"]).to_pydict()
    return {
        sample_id: (width, height)
        for sample_id, width, height in zip(
            table["sample_id"], table["width"], table["height"], strict=True
        )
    }


def _count_lines(source: Path) -> int:
    with metadata_path(source).open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _refusal(summary: PrepareSummary, threshold: float, rejected: Path) -> str:
    worst = ", ".join(f"{reason} ({count})" for reason, count in summary.quarantined.most_common(3))
    return (
        f"{sum(summary.quarantined.values())} of {summary.rows_read} rows are bad "
        f"({summary.bad_fraction:.1%} > max_bad_fraction {threshold:.0%}); worst reasons: {worst}. "
        f"The previous output was left as it was; the rejected rows are in {rejected}."
    )
