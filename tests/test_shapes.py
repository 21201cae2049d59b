"""Shapes world: renderer, oracle, prompts, held-out choice and the SURD writer."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from suradapter.config import ShapesParams, load_params
from suradapter.data import shapes
from suradapter.data.lexicon import SHAPE_OBJECTS, SHAPE_PLURALS, TEMPLATES
from suradapter.data.shapes import (
    BACKGROUND,
    PALETTE,
    all_combinations,
    generate_shapes_dataset,
    held_out_combinations,
    held_out_templates,
    keyword_prompt,
    narrative_prompt,
    place_objects,
    read_scene,
    render_scene,
)

KEYWORD_RE = re.compile(
    r"^(\d+) ([a-z]+) ([a-z]+), white background, flat icon, centered, high quality$"
)


@pytest.fixture(scope="module")
def params(params_path: Path) -> ShapesParams:
    return load_params(params_path, profile="shapes").shapes


def _rows(folder: Path) -> list[dict]:
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------------- renderer


def test_oracle_reads_fresh_renders(params):
    combos = all_combinations(params)
    renders = 20 * len(combos)
    wrong = []
    for i in range(renders):
        combo = combos[i % len(combos)]
        image = render_scene(*combo, random.Random(f"test-oracle-accuracy:{i}"), params)
        got = read_scene(image)
        if got != combo:
            wrong.append((combo, got))
    accuracy = 1 - len(wrong) / renders
    assert accuracy >= 0.99, f"oracle accuracy {accuracy:.4f} on {renders} renders: {wrong[:5]}"


def test_render_uses_only_palette_colours_and_separate_objects(params):
    palette = {BACKGROUND, *PALETTE.values()}
    for i, (count, colour, shape) in enumerate(all_combinations(params) * 3):
        image = render_scene(count, colour, shape, random.Random(f"test-palette:{i}"), params)
        assert image.mode == "RGB"
        assert image.size == (params.image_size, params.image_size)
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}
        assert colours <= palette
        assert colours == {BACKGROUND, PALETTE[colour]}
        assert read_scene(image)[0] == count, "objects touch: components merged"


def test_objects_stay_inside_their_gapped_boxes(params):
    size = params.image_size
    for i in range(300):
        count = params.counts[i % len(params.counts)]
        boxes = place_objects(count, random.Random(f"test-gap:{i}"), params)
        image = render_scene(
            count, "red", params.shapes[i % 3], random.Random(f"test-gap:{i}"), params
        )
        inside = np.zeros((size, size), dtype=bool)
        for x0, y0, side in boxes:
            assert params.object_size[0] <= side <= params.object_size[1]
            assert 0 <= x0 <= size - side and 0 <= y0 <= size - side
            inside[y0 : y0 + side, x0 : x0 + side] = True
        drawn = (np.asarray(image) != BACKGROUND).any(axis=2)
        assert not (drawn & ~inside).any(), "object pixels outside its box"
        for a, (ax, ay, asz) in enumerate(boxes):
            for bx, by, bsz in boxes[a + 1 :]:
                gap_x = max(bx - (ax + asz), ax - (bx + bsz))
                gap_y = max(by - (ay + asz), ay - (by + bsz))
                assert max(gap_x, gap_y) >= params.min_gap


def test_render_is_deterministic(params):
    first = render_scene(3, "blue", "triangle", random.Random("test-det"), params)
    second = render_scene(3, "blue", "triangle", random.Random("test-det"), params)
    assert first.tobytes() == second.tobytes()


def test_impossible_placement_raises(params):
    cramped = params.model_copy(update={"image_size": 16, "object_size": (12, 12)})
    with pytest.raises(ValueError, match="cannot place 3 objects"):
        render_scene(3, "red", "square", random.Random(0), cramped)


@pytest.mark.parametrize(
    ("colour", "shape", "bad"), [("magenta", "circle", "magenta"), ("red", "hexagon", "hexagon")]
)
def test_unknown_colour_or_shape_raises_naming_it(params, colour, shape, bad):
    with pytest.raises(ValueError, match=bad):
        render_scene(1, colour, shape, random.Random(0), params)
    with pytest.raises(ValueError, match=bad):
        keyword_prompt(1, colour, shape)
    with pytest.raises(ValueError, match=bad):
        narrative_prompt(1, colour, shape, 0, random.Random(0))


def test_unknown_colour_in_params_raises_before_writing(params, tmp_path):
    bad = params.model_copy(update={"colours": [*params.colours, "magenta"]})
    with pytest.raises(ValueError, match="magenta"):
        generate_shapes_dataset(bad, tmp_path / "out", num_samples=3)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- oracle


def test_oracle_on_blank_and_noise_images():
    assert read_scene(Image.new("RGB", (32, 32), BACKGROUND)) == (0, "none", "none")
    assert read_scene(Image.new("L", (32, 32), 0)) == (0, "none", "none")
    assert read_scene(Image.new("RGB", (0, 0))) == (0, "none", "none")
    rng = np.random.default_rng(7)
    for size in (32, 64):
        noise = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        count, colour, shape = read_scene(noise)
        assert count >= 0 and isinstance(colour, str) and isinstance(shape, str)
    rgba = Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), mode="RGBA")
    read_scene(rgba)


def test_oracle_tolerates_pixel_noise(params):
    rng = np.random.default_rng(11)
    combos = all_combinations(params)
    for i, combo in enumerate(combos):
        clean = np.asarray(render_scene(*combo, random.Random(f"test-noise:{i}"), params))
        noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
        assert read_scene(Image.fromarray(noisy)) == combo


# ---------------------------------------------------------------------------- text


def test_keyword_prompt_format():
    suffix = "white background, flat icon, centered, high quality"
    assert keyword_prompt(3, "red", "circle") == f"3 red circles, {suffix}"
    assert keyword_prompt(1, "red", "circle") == f"1 red circle, {suffix}"
    assert keyword_prompt(2, "purple", "triangle") == f"2 purple triangles, {suffix}"


def _banned_words(params: ShapesParams) -> list[str]:
    words = [*params.colours, *params.shapes, *(SHAPE_PLURALS[s] for s in params.shapes)]
    return [*words, "circular", "triangular"]


def test_narratives_avoid_keywords_and_keep_grammar(params):
    banned = re.compile(r"\b(" + "|".join(_banned_words(params)) + r")", re.IGNORECASE)
    rng = random.Random("test-narrative")
    for count, colour, shape in all_combinations(params):
        singulars = [s for s, _ in SHAPE_OBJECTS[shape]]
        plurals = [p for _, p in SHAPE_OBJECTS[shape]]
        for template in range(len(TEMPLATES)):
            for _ in range(4):
                text = narrative_prompt(count, colour, shape, template, rng)
                assert not banned.search(text), text
                assert not re.search(r"\ba [aeiou]", text), text
                assert not re.search(r"\ban [^aeiou]", text), text
                if count == 1:
                    assert any(re.search(rf"\b{s}\b", text) for s in singulars), text
                    assert not any(re.search(rf"\b{p}\b", text) for p in plurals), text
                    assert not re.search(r"\bare\b", text), text
                else:
                    assert any(re.search(rf"\b{p}\b", text) for p in plurals), text
                    assert not re.search(r"\bis\b", text), text


def test_at_least_eight_templates():
    assert len(TEMPLATES) >= 8
    assert len(set(TEMPLATES)) == len(TEMPLATES)


# ------------------------------------------------------------------------- held-out


def _pairs(combos):
    return {
        *((0, n, c) for n, c, _ in combos),
        *((1, n, s) for n, _, s in combos),
        *((2, c, s) for _, c, s in combos),
    }


def test_held_out_combinations_keep_every_pair_covered(params):
    held = held_out_combinations(params)
    assert len(held) == params.held_out_combinations == len(set(held))
    assert held == held_out_combinations(params)
    every = all_combinations(params)
    training = [c for c in every if c not in held]
    assert _pairs(training) == _pairs(every)
    other_seed = held_out_combinations(params.model_copy(update={"seed": params.seed + 1}))
    assert len(other_seed) == len(held)


def test_held_out_templates(params):
    held = held_out_templates(params)
    assert len(held) == params.held_out_templates == len(set(held))
    assert all(0 <= t < len(TEMPLATES) for t in held)
    assert held == held_out_templates(params)


def test_too_many_held_out_combinations_raises(params):
    greedy = params.model_copy(update={"held_out_combinations": len(all_combinations(params))})
    with pytest.raises(ValueError, match="cover every attribute pair"):
        held_out_combinations(greedy)


# --------------------------------------------------------------------------- writer


def test_generation_rows_and_held_out_marks(params, tmp_path):
    out = generate_shapes_dataset(params, tmp_path / "shapes", num_samples=400)
    assert out == tmp_path / "shapes"
    rows = _rows(out)
    assert len(rows) == 400
    held_combos = set(held_out_combinations(params))
    held_templates = set(held_out_templates(params))
    for row in rows:
        combo = (row["count"], row["colour"], row["shape"])
        assert (out / row["file_name"]).is_file()
        assert row["file_name"].startswith("images/") and row["file_name"].endswith(".png")
        assert row["prompt"] == keyword_prompt(*combo)
        assert KEYWORD_RE.match(row["prompt"])
        if combo in held_combos:
            assert row["heldout"] == "combination"
        elif row["template"] in held_templates:
            assert row["heldout"] == "template"
        else:
            assert row["heldout"] == "none"
    marks = {row["heldout"] for row in rows}
    assert marks == {"none", "combination", "template"}
    held_share = sum(row["heldout"] == "combination" for row in rows) / len(rows)
    natural = len(held_combos) / len(all_combinations(params))
    assert abs(held_share - natural) < 0.06
    for row in rows[:50]:
        with Image.open(out / row["file_name"]) as image:
            assert read_scene(image) == (row["count"], row["colour"], row["shape"])


def test_generation_is_deterministic_and_prefix_stable(params, tmp_path):
    short = generate_shapes_dataset(params, tmp_path / "short", num_samples=30)
    again = generate_shapes_dataset(params, tmp_path / "again", num_samples=30)
    longer = generate_shapes_dataset(params, tmp_path / "long", num_samples=45)
    assert _rows(short) == _rows(again)
    assert _rows(longer)[:30] == _rows(short)
    for row in _rows(short):
        name = row["file_name"]
        data = (short / name).read_bytes()
        assert data == (again / name).read_bytes() == (longer / name).read_bytes()


def test_generation_replaces_output_and_leaves_no_temp(params, tmp_path):
    out = tmp_path / "shapes"
    generate_shapes_dataset(params, out, num_samples=20)
    (out / "stale.txt").write_text("from an older run")
    generate_shapes_dataset(params, out, num_samples=10)
    assert not (out / "stale.txt").exists()
    assert len(_rows(out)) == 10
    assert len(list((out / "images").iterdir())) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_interrupted_generation_keeps_previous_output(params, tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    generate_shapes_dataset(params, out, num_samples=10)
    before = (out / "metadata.jsonl").read_bytes()
    real = shapes.sample_row

    def failing(params, index, *args):
        if index == 5:
            raise KeyboardInterrupt
        return real(params, index, *args)

    monkeypatch.setattr(shapes, "sample_row", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(params, out, num_samples=20)
    assert (out / "metadata.jsonl").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
