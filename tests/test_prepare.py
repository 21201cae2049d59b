"""`sur prepare`: broken rows are quarantined with reasons, good rows all survive, splits are
stable as data grows, re-runs reuse work, and failures never damage the previous output."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from suradapter.atomic import recover_dir
from suradapter.config import PrepareParams
from suradapter.data import prepare as prepare_module
from suradapter.data.prepare import PrepareError, assign_split, normalise_image, prepare_dataset

PARAMS = PrepareParams(resolution=32, min_image_size=16, max_prompt_chars=200)


def _image(path: Path, size=(32, 32), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _row(file_name: str, text: str, prompt: str = "kw, flat icon") -> str:
    return json.dumps({"file_name": file_name, "text": text, "prompt": prompt})


def _surd(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _good_rows(folder: Path, start: int, stop: int) -> list[str]:
    rows = []
    for i in range(start, stop):
        _image(folder / f"img{i}.png", colour=(i % 256, 100, 50))
        rows.append(_row(f"img{i}.png", f"narrative {i}"))
    return rows


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _quarantine(out: Path) -> dict[int, str]:
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    return {record["line"]: record["reason"] for record in map(json.loads, lines)}


@pytest.fixture
def messy_source(tmp_path) -> Path:
    src = tmp_path / "surd"
    good = _good_rows(src, 0, 20)
    _image(src / "noext.png")
    _image(src / "twin.png")
    _image(src / "twin.jpg")
    _image(src / "tiny.png", size=(8, 8))
    (src / "notimage.png").write_text("this is not a png")
    _image(src / "big.png", size=(64, 64), colour=(1, 2, 3))
    (src / "cut.png").write_bytes((src / "big.png").read_bytes()[:60])
    (src / "big.png").unlink()
    bad = [
        "{not json",  # 21
        json.dumps({"file_name": "img1.png", "prompt": "kw"}),  # 22 missing text
        _row("img2.png", "   "),  # 23 empty text
        _row("img3.png", "x" * 201),  # 24 too long
        _row("missing.png", "gone"),  # 25
        _row("notimage.png", "bad bytes"),  # 26
        _row("cut.png", "truncated"),  # 27
        _row("tiny.png", "small"),  # 28
        good[4],  # 29 duplicate of line 5
        _row("twin", "which one"),  # 30 ambiguous
        _row("noext", "extensionless but fine"),  # 31 good
        _row("../outside.png", "escape"),  # 32
    ]
    return _surd(src, good + bad)


EXPECTED_REASONS = {
    21: "invalid_json",
    22: "missing_field",
    23: "missing_field",
    24: "prompt_too_long",
    25: "image_missing",
    26: "image_undecodable",
    28: "image_too_small",
    29: "duplicate",
    30: "image_ambiguous",
    32: "image_missing",
}


def test_broken_rows_are_quarantined_and_every_good_row_is_kept(messy_source, tmp_path):
    out = tmp_path / "prepared"
    params = PARAMS.model_copy(update={"max_bad_fraction": 0.5})
    summary = prepare_dataset(params, messy_source, out)
    quarantined = _quarantine(out)
    for line, reason in EXPECTED_REASONS.items():
        assert quarantined.get(line) == reason, (line, quarantined.get(line))
    assert quarantined[27] in {"image_truncated", "image_undecodable"}
    rows = _manifest(out)
    assert sorted(r["source_line"] for r in rows) == [*range(1, 21), 31]
    assert summary.kept == 21 and summary.rows_read == 32
    for row in rows:
        with Image.open(out / row["image_path"]) as image:
            assert image.size == (32, 32)
    assert json.loads((out / "summary.json").read_text())["quarantined"]["missing_field"] == 2


def test_too_many_bad_rows_fails_naming_reasons_and_keeps_previous_output(messy_source, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(PARAMS.model_copy(update={"max_bad_fraction": 0.5}), messy_source, out)
    before = _manifest(out)
    with pytest.raises(PrepareError, match=r"worst reasons: missing_field \(2\)") as err:
        prepare_dataset(PARAMS.model_copy(update={"max_bad_fraction": 0.1}), messy_source, out)
    assert "rejected-quarantine" in str(err.value)
    assert _manifest(out) == before
    assert not list(tmp_path.glob("prepared.staging-*"))


def test_split_is_stable_as_data_grows_and_reruns_reuse_images(tmp_path):
    src = tmp_path / "surd"
    out = tmp_path / "prepared"
    rows = _good_rows(src, 0, 60)
    _surd(src, rows)
    prepare_dataset(PARAMS, src, out)
    first = {r["sample_id"]: r["split"] for r in _manifest(out)}
    _surd(src, rows + _good_rows(src, 60, 90))
    summary = prepare_dataset(PARAMS, src, out)
    second = {r["sample_id"]: r["split"] for r in _manifest(out)}
    assert {k: second[k] for k in first} == first
    assert summary.reused == 60 and summary.kept == 90
    assert set(second.values()) <= {"train", "val", "test"}


def test_heldout_rows_never_train():
    ids = [f"{i:032x}" for i in range(400)]
    splits = {assign_split(i, "combination", 0.1, 0.1) for i in ids}
    assert splits == {"val", "test"}
    normal = [assign_split(i, "none", 0.1, 0.1) for i in ids]
    assert 0.7 < normal.count("train") / len(ids) < 0.9


def test_crash_mid_stage_leaves_previous_output_intact(tmp_path, monkeypatch):
    src = tmp_path / "surd"
    out = tmp_path / "prepared"
    rows = _good_rows(src, 0, 10)
    _surd(src, rows)
    prepare_dataset(PARAMS, src, out)
    before = _manifest(out)
    _surd(src, rows + _good_rows(src, 10, 20))
    calls = {"n": 0}
    real = prepare_module.normalise_image

    def crash_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "normalise_image", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PARAMS, src, out)
    assert _manifest(out) == before
    monkeypatch.undo()
    assert prepare_dataset(PARAMS, src, out).kept == 20


def test_recover_restores_a_backup_left_between_renames(tmp_path):
    target, backup = tmp_path / "prepared", tmp_path / "prepared.previous"
    backup.mkdir()
    (backup / "manifest.parquet").write_text("old")
    (tmp_path / "prepared.staging-123").mkdir()
    recover_dir(target)
    assert (target / "manifest.parquet").read_text() == "old"
    assert not backup.exists() and not (tmp_path / "prepared.staging-123").exists()


def test_normalise_keeps_exact_size_pixels_and_crops_others(tmp_path):
    exact = _image(tmp_path / "a.png", size=(32, 32), colour=(10, 20, 30)).read_bytes()
    assert normalise_image(exact, 32).getpixel((5, 5)) == (10, 20, 30)
    wide = tmp_path / "wide.png"
    image = Image.new("RGB", (96, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, 48))  # left strip is cropped away
    image.save(wide)
    out = normalise_image(wide.read_bytes(), 32)
    assert out.size == (32, 32) and out.getpixel((0, 16))[2] > 200


def test_missing_source_is_a_clear_error(tmp_path):
    from suradapter.data.surd import SurdError

    with pytest.raises(SurdError, match="not a folder"):
        prepare_dataset(PARAMS, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurdError, match=r"no metadata\.jsonl"):
        prepare_dataset(PARAMS, tmp_path / "empty", tmp_path / "out")


def test_sur_prepare_cli_quarantines_and_summarises(messy_source, tmp_path, repo_root):
    import os
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    text = (
        (repo_root / "params.yaml")
        .read_text()
        .replace("max_bad_fraction: 0.2", "max_bad_fraction: 0.5")
        .replace("max_prompt_chars: 1000", "max_prompt_chars: 200")
    )
    params.write_text(text)
    out = tmp_path / "cli-prepared"
    sur = str(Path(sys.executable).parent / "sur")
    env = {**os.environ, "COLUMNS": "200"}
    command = [
        sur,
        "--params",
        str(params),
        "prepare",
        "--source",
        str(messy_source),
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quarantined: missing_field" in result.stdout and "rows_read" in result.stdout
    got = _quarantine(out)
    assert {line: got.get(line) for line in EXPECTED_REASONS} == EXPECTED_REASONS
    assert len(_manifest(out)) == 21
    strict = text.replace("max_bad_fraction: 0.5", "max_bad_fraction: 0.1")
    params.write_text(strict)
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 1 and "worst reasons" in failed.stdout
