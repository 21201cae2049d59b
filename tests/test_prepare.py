"""`sur prepare`: broken and hostile rows are quarantined with reasons, good rows all survive,
splits are stable as data grows, re-runs reuse work, the output depends on the source bytes
alone, and failures never damage the previous output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

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
    32: "image_outside_source",
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


def _png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 4))
        + chunk(b"IEND", b"")
    )
    return path


def _noise(path: Path, size=(64, 64), **save) -> Path:
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, (*size[::-1], 3), np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _odd_mode_images(src: Path) -> dict[str, str]:
    """file_name -> text of good images in modes other than RGB (all must be kept)."""
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(src / "cmyk.jpg")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue left half
    rgba.save(src / "rgba.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(src / "palette.png", transparency=0)
    Image.fromarray(np.full((32, 32), 0x8000, np.uint16)).save(src / "grey16.png")
    Image.new("LA", (32, 32), (0, 0)).save(src / "la.png")
    sideways = Image.new("RGB", (48, 32), (255, 0, 0))
    sideways.paste((0, 0, 255), (24, 0, 48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    sideways.save(src / "rotated.jpg", exif=exif)
    names = ["cmyk.jpg", "rgba.png", "palette.png", "grey16.png", "la.png", "rotated.jpg"]
    return {name: f"odd mode {name}" for name in names}


@dataclass
class Hostile:
    source: Path
    expected: dict[int, tuple[str, str]]  # line -> (reason, text the detail must name)
    good: dict[str, str]  # text -> file_name of every row that must be kept


@pytest.fixture
def hostile(tmp_path) -> Hostile:
    """A SURD folder holding every kind of hostile row, between good rows of odd image modes."""
    src, outside = tmp_path / "surd", tmp_path / "outside"
    outside.mkdir()
    _image(outside / "secret.png")
    lines = _good_rows(src, 0, 10)
    good = {f"narrative {i}": f"img{i}.png" for i in range(10)}
    for name, text in _odd_mode_images(src).items():
        lines.append(_row(name, text))
        good[text] = name
    _image(src / "sub" / "inner.png", colour=(9, 9, 9))
    (src / "alias.png").symlink_to(src / "img0.png")  # symlinks inside the folder are fine
    (src / "alias_dir").symlink_to(src / "sub", target_is_directory=True)
    for name in ("alias.png", "alias_dir/inner.png"):
        lines.append(_row(name, f"through {name}"))
        good[f"through {name}"] = name
    _png_header(src / "bomb.png", 14000, 14000)  # over PIL's own limit
    _png_header(src / "wide.png", 5000, 5000)  # over max_image_pixels, under PIL's
    (src / "escape.png").symlink_to(outside / "secret.png")
    (src / "linked").symlink_to(outside, target_is_directory=True)
    _truncate(_noise(src / "cut.png"))
    _truncate(_noise(src / "cut.jpg", format="JPEG"))
    (src / "ghost.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    hostile_rows = [
        (_row("bomb.png", "bomb"), "image_too_large", "bomb.png"),
        (_row("wide.png", "wide"), "image_too_large", "'wide.png' declares 5000x5000"),
        (_row("escape.png", "escape"), "image_outside_source", "'escape.png' is a symlink"),
        (_row("linked/secret.png", "dir"), "image_outside_source", "'linked/secret.png'"),
        (_row(str(outside / "secret.png"), "absolute"), "image_outside_source", "secret.png"),
        (_row("../outside/secret.png", "dotdot"), "image_outside_source", "../outside"),
        (_row("cut.png", "cut png"), "image_truncated", "'cut.png'"),
        (_row("cut.jpg", "cut jpeg"), "image_truncated", "'cut.jpg'"),
        (_row("ghost.png", "eps"), "image_undecodable", "'ghost.png'"),
        (_row("img*", "glob"), "image_missing", "'img*'"),
        (_row("img\0.png", "nul"), "image_missing", "img"),
        (_row("img1.png", "lone \ud800 surrogate"), "invalid_utf8", "\\ud800"),
        ("[" * 100_000, "invalid_json", "recursion"),
    ]
    expected = {}
    for row, reason, fragment in hostile_rows:
        lines.append(row)
        expected[len(lines)] = (reason, fragment)
    metadata = ("\n".join(lines) + "\n").encode()
    bad_utf8 = b'{"file_name": "img2.png", "text": "caf\xe9 au lait", "prompt": "kw"}\n'
    expected[len(lines) + 1] = ("invalid_utf8", "not UTF-8 at byte 38")
    _surd(src, [])
    (src / "metadata.jsonl").write_bytes(metadata + bad_utf8)
    return Hostile(src, expected, good)


def _quarantine_records(out: Path) -> dict[int, dict]:
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    return {record["line"]: record for record in map(json.loads, lines)}


def test_every_hostile_row_is_quarantined_with_a_reason_naming_its_input(hostile, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(PARAMS.model_copy(update={"max_bad_fraction": 0.5}), hostile.source, out)
    records = _quarantine_records(out)
    for line, (reason, fragment) in hostile.expected.items():
        record = records.get(line, {})
        assert record.get("reason") == reason, (line, record)
        assert fragment.lower() in record["detail"].lower(), (line, record)
    assert set(records) == set(hostile.expected)
    kept = {row["text"]: row["source_file"] for row in _manifest(out)}
    assert kept == hostile.good
    assert "\ufffd" not in (out / "quarantine.jsonl").read_text()
    assert "\\xe9" in records[max(records)]["raw"]  # the bad byte, shown, not replaced


def test_an_oversized_header_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    src = _surd(tmp_path / "surd", [_row("big.png", "big")])
    _image(src / "big.png", size=(64, 64))

    def no_decoding(self):
        raise AssertionError("decoded an image over max_image_pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    params = PARAMS.model_copy(update={"max_image_pixels": 64 * 64 - 1, "max_bad_fraction": 1.0})
    prepare_dataset(params, src, tmp_path / "prepared")
    (record,) = _quarantine_records(tmp_path / "prepared").values()
    assert record["reason"] == "image_too_large"
    assert "'big.png' declares 64x64 = 4096 px > 4095" in record["detail"]


def test_truncated_images_are_refused_even_where_pil_was_told_to_load_them(tmp_path, monkeypatch):
    src = _surd(tmp_path / "surd", [*_good_rows(tmp_path / "surd", 0, 4), _row("cut.jpg", "cut")])
    _truncate(_noise(src / "cut.jpg", format="JPEG"))  # JPEG: verify() does not see the cut
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do
    prepare_dataset(PARAMS.model_copy(update={"max_bad_fraction": 1.0}), src, tmp_path / "out")
    assert _quarantine(tmp_path / "out") == {5: "image_truncated"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as it was


def test_images_in_any_mode_are_kept_as_upright_rgb_on_white(tmp_path):
    src = tmp_path / "surd"
    src.mkdir()
    odd = _odd_mode_images(src)
    _surd(src, [_row(name, text) for name, text in odd.items()])
    out = tmp_path / "prepared"
    assert prepare_dataset(PARAMS, src, out).kept == len(odd)
    rows = {row["source_file"]: row for row in _manifest(out)}
    pixels = {}
    for name, row in rows.items():
        with Image.open(out / row["image_path"]) as image:
            assert (image.mode, image.size) == ("RGB", (32, 32)), name
            pixels[name] = image.convert("RGB")
    assert pixels["cmyk.jpg"].getpixel((16, 16))[0] > 240
    assert pixels["rgba.png"].getpixel((24, 16)) == (255, 255, 255)  # transparent: white
    assert pixels["rgba.png"].getpixel((4, 16)) == (0, 0, 255)
    assert pixels["palette.png"].getpixel((16, 16)) == (255, 255, 255)
    assert pixels["grey16.png"].getpixel((16, 16)) == (128, 128, 128)  # scaled, not clipped
    assert pixels["la.png"].getpixel((16, 16)) == (255, 255, 255)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (32, 48)
    top, bottom = pixels["rotated.jpg"].getpixel((16, 2)), pixels["rotated.jpg"].getpixel((16, 29))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # upright: red over blue


def test_reused_rows_still_meet_the_current_limits(tmp_path):
    src = tmp_path / "surd"
    _surd(src, [*_good_rows(src, 0, 4), _row("big.png", "big")])
    _image(src / "big.png", size=(64, 64))
    out = tmp_path / "prepared"
    assert prepare_dataset(PARAMS, src, out).kept == 5
    stricter = PARAMS.model_copy(update={"min_image_size": 48, "max_bad_fraction": 1.0})
    assert prepare_dataset(stricter, src, out).kept == 1  # the memo skips decoding, not checks
    assert set(_quarantine(out).values()) == {"image_too_small"}


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of the bytes (or the link target) of everything under `folder`."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        found[name + " (mtime)"] = str(path.lstat().st_mtime_ns)
    return found


def _output(folder: Path) -> dict[str, str]:
    return {k: v for k, v in _tree(folder).items() if not k.endswith(" (mtime)")}


def test_sur_prepare_cli_survives_a_hostile_folder_and_leaves_it_untouched(
    hostile, tmp_path, repo_root
):
    params = tmp_path / "params.yaml"
    text = (repo_root / "params.yaml").read_text()
    params.write_text(text.replace("max_bad_fraction: 0.2", "max_bad_fraction: 0.5"))
    before = _tree(hostile.source)
    out = tmp_path / "cli-prepared"
    sur = str(Path(sys.executable).parent / "sur")
    command = [sur, "--params", str(params), "prepare", "--source", str(hostile.source)]
    result = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    got = {line: record["reason"] for line, record in _quarantine_records(out).items()}
    assert got == {line: reason for line, (reason, _) in hostile.expected.items()}
    assert {row["text"]: row["source_file"] for row in _manifest(out)} == hostile.good
    assert _tree(hostile.source) == before


def test_touched_or_moved_sources_prepare_to_the_same_bytes(tmp_path):
    src = tmp_path / "surd"
    _surd(src, [*_good_rows(src, 0, 12), "{broken", _row("missing.png", "gone")])
    out = tmp_path / "prepared"
    params = PARAMS.model_copy(update={"max_bad_fraction": 0.5})
    prepare_dataset(params, src, out)
    first = _output(out)
    assert prepare_module.memo_path(out).is_file() and not any("memo" in k for k in first)
    for path in src.rglob("*"):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    touched = prepare_dataset(params, src, out)
    assert touched.reused == touched.kept == 12
    assert _output(out) == first  # manifest.parquet included, byte for byte
    moved, elsewhere = tmp_path / "deeper" / "copy of surd", tmp_path / "other" / "prepared"
    shutil.copytree(src, moved)
    prepare_dataset(params, moved, elsewhere)
    assert _output(elsewhere) == first
    assert pq.read_schema(out / "manifest.parquet").names.count("source_mtime_ns") == 0
