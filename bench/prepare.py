"""Benchmark `sur prepare` on the shapes world: full-run throughput and incremental cost.

Renders N samples and prepares them from scratch (timed). Then adds 1% more rows the way data
grows: new image files beside the untouched old ones, and the new rows appended to
metadata.jsonl; and prepares again into the same output (timed).

    .venv/bin/python bench/prepare.py [--samples 10000]

Prints `RESULT prepare_rows_per_s <n>` and `RESULT incremental_fraction <f>`
(incremental run time / full run time, median of --repeats pairs; target <= 0.10).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from suradapter.config import load_params
from suradapter.data.prepare import prepare_dataset
from suradapter.data.shapes import generate_shapes_dataset


def _add_rows(params, source: Path, scratch: Path, total: int) -> None:
    """Append rows [len(source), total) to `source` without touching its existing files."""
    generate_shapes_dataset(params.shapes, scratch, total)
    old_lines = (source / "metadata.jsonl").read_text().splitlines(keepends=True)
    new_lines = (scratch / "metadata.jsonl").read_text().splitlines(keepends=True)
    assert new_lines[: len(old_lines)] == old_lines, "shapes samples must be prefix-stable"
    for line in new_lines[len(old_lines) :]:
        name = json.loads(line)["file_name"]
        shutil.copy2(scratch / name, source / name)
    with (source / "metadata.jsonl").open("a") as metadata:
        metadata.writelines(new_lines[len(old_lines) :])


def measure(params, samples: int) -> tuple[float, float, int, int]:
    """One full run and one incremental run in a fresh folder; return their times and counts."""
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        source, out = Path(tmp) / "surd", Path(tmp) / "prepared"
        generate_shapes_dataset(params.shapes, source, samples)
        start = time.perf_counter()
        full = prepare_dataset(params.prepare, source, out)
        full_s = time.perf_counter() - start
        _add_rows(params, source, Path(tmp) / "grown", samples + max(1, samples // 100))
        start = time.perf_counter()
        incremental = prepare_dataset(params.prepare, source, out)
        incremental_s = time.perf_counter() - start
    assert incremental.reused == full.kept, "incremental run must reuse every prepared image"
    return full_s, incremental_s, full.rows_read, incremental.rows_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="Median over this many pairs.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    runs = [measure(params, args.samples) for _ in range(args.repeats)]
    for full_s, incremental_s, rows, grown_rows in runs:
        print(f"full {rows} rows: {full_s:.2f} s; incremental {grown_rows}: {incremental_s:.2f} s")
    full_s = statistics.median(run[0] for run in runs)
    ratios = [run[1] / run[0] for run in runs]
    print(f"RESULT prepare_rows_per_s {runs[0][2] / full_s:.0f}")
    print(f"RESULT incremental_fraction {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
