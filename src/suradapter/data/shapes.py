"""The shapes world: render, read back and write the embedded default SURD dataset.

Each scene holds `count` non-touching objects of one palette colour and one shape on a white
background, drawn without anti-aliasing so every pixel is a palette colour. `read_scene` is
the oracle that recovers (count, colour, shape) from an image; `generate_shapes_dataset`
writes a SURD folder (`metadata.jsonl` beside `images/*.png`) whose sample i depends only on
(seed, i), with some (count, colour, shape) combinations and narrative templates held out.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.config import ShapesParams
from suradapter.data.lexicon import (
    TEMPLATES,
    check_colour,
    check_count,
    check_shape,
    keyword_prompt,
    narrative_prompt,
)

__all__ = [
    "BACKGROUND",
    "PALETTE",
    "Combination",
    "check_params",
    "generate_shapes_dataset",
    "held_out_combinations",
    "held_out_templates",
    "keyword_prompt",
    "narrative_prompt",
    "read_scene",
    "render_scene",
    "sample_row",
]

Combination = tuple[int, str, str]
Box = tuple[int, int, int]  # x0, y0, side

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
NONE = "none"
HELDOUT_NONE, HELDOUT_COMBINATION, HELDOUT_TEMPLATE = "none", "combination", "template"
IMAGES_DIR = "images"
METADATA_FILE = "metadata.jsonl"

PLACEMENT_TRIES = 100  # random positions tried per object before restarting the scene
SCENE_RESTARTS = 50  # scene restarts before giving up
MIN_COMPONENT_PX = 5  # smaller blobs (at 32x32; scaled by area) are noise to the oracle
SQUARE_MIN_FILL = 0.9  # fill ratio of a component in its bounding box: square 1.0
MAX_SNAP_DISTANCE = 120  # RGB distance beyond which a pixel is no palette colour (ignored)
CIRCLE_MIN_FILL = 0.65  # circle 0.75-0.81, triangle 0.50-0.56 (measured, sides 8-12)

_PALETTE_NAMES: tuple[str, ...] = (NONE, *PALETTE)
_PALETTE_RGB = np.array([BACKGROUND, *PALETTE.values()], dtype=np.int32)


def colour_rgb(colour: str) -> tuple[int, int, int]:
    """Return the exact RGB of a palette colour. Raises ValueError naming an unknown colour."""
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(PALETTE)}")
    return PALETTE[colour]


def check_params(params: ShapesParams) -> None:
    """Validate the shapes-world params. Raises ValueError naming the first problem."""
    for colour in params.colours:
        colour_rgb(colour)
        check_colour(colour)
    for shape in params.shapes:
        check_shape(shape)
    for count in params.counts:
        check_count(count)
    low, high = params.object_size
    if not 1 <= low <= high <= params.image_size:
        raise ValueError(
            f"object_size {params.object_size} must satisfy 1 <= min <= max <= image_size "
            f"({params.image_size})"
        )
    if not (params.counts and params.colours and params.shapes):
        raise ValueError("counts, colours and shapes must all be non-empty")


# --------------------------------------------------------------------------- rendering


def _separated(a: Box, b: Box, gap: int) -> bool:
    ax, ay, asz = a
    bx, by, bsz = b
    return (
        ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay
    )


def _try_place(sides: list[int], rng: random.Random, size: int, gap: int) -> list[Box] | None:
    boxes: list[Box] = []
    for side in sides:
        for _ in range(PLACEMENT_TRIES):
            box = (rng.randint(0, size - side), rng.randint(0, size - side), side)
            if all(_separated(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def place_objects(count: int, rng: random.Random, params: ShapesParams) -> list[Box]:
    """Return `count` (x0, y0, side) boxes inside the image, `min_gap` apart.

    Raises ValueError when no such placement is found within the bounded number of tries.
    """
    low, high = params.object_size
    if not 1 <= low <= high <= params.image_size:
        raise ValueError(f"object_size {params.object_size} does not fit {params.image_size}px")
    for _ in range(SCENE_RESTARTS):
        sides = [rng.randint(low, high) for _ in range(count)]
        boxes = _try_place(sides, rng, params.image_size, params.min_gap)
        if boxes is not None:
            return boxes
    raise ValueError(
        f"cannot place {count} objects of side {low}..{high} with gap {params.min_gap} "
        f"in a {params.image_size}px image"
    )


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, ...]) -> None:
    x0, y0, side = box
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render_scene(
    count: int, colour: str, shape: str, rng: random.Random, params: ShapesParams
) -> Image.Image:
    """Return an RGB image_size² render of `count` objects, deterministic given `rng`.

    Raises ValueError for an unknown colour or shape, or when the objects cannot be placed.
    """
    fill = colour_rgb(colour)
    check_shape(shape)
    check_count(count)
    image = Image.new("RGB", (params.image_size, params.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for box in place_objects(count, rng, params):
        _draw_object(draw, shape, box, fill)
    return image


# ------------------------------------------------------------------------------ oracle


def snap_to_palette(pixels: np.ndarray) -> np.ndarray:
    """Return, per RGB pixel of an (H, W, 3) array, the nearest palette index.

    0 is the background, i >= 1 is the i-th `PALETTE` colour, -1 a pixel near no palette colour.
    """
    flat = pixels.reshape(-1, 1, 3).astype(np.int32)
    dist = ((flat - _PALETTE_RGB[None, :, :]) ** 2).sum(axis=2)
    nearest = dist.argmin(axis=1)
    nearest[dist.min(axis=1) > MAX_SNAP_DISTANCE**2] = -1
    return nearest.reshape(pixels.shape[:2])


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Return the 8-connected components of a boolean mask as arrays of flat (padded) indices."""
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    stride = width + 2
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    todo = padded.ravel().tolist()
    found: list[np.ndarray] = []
    for start in np.flatnonzero(padded).tolist():
        if not todo[start]:
            continue
        todo[start] = False
        stack, members = [start], [start]
        while stack:
            here = stack.pop()
            for offset in offsets:
                there = here + offset
                if todo[there]:
                    todo[there] = False
                    stack.append(there)
                    members.append(there)
        found.append(np.array(members))
    return found


def _fill_ratio(members: np.ndarray, stride: int) -> float:
    rows, cols = np.divmod(members, stride)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return len(members) / float(box)


def classify_fill(ratio: float) -> str:
    """Return the shape whose fill ratio (pixels / bounding-box area) matches `ratio`."""
    if ratio >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if ratio >= CIRCLE_MIN_FILL else "triangle"


def _majority(values: Iterable[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def read_scene(image: Image.Image) -> Combination:
    """Return (count, colour, shape) read from an image; (0, 'none', 'none') if it holds nothing.

    Works on any image (noisy or off-palette included): pixels snap to the nearest palette colour.
    """
    pixels = np.asarray(image.convert("RGB"))
    if pixels.size == 0:
        return 0, NONE, NONE
    labels = snap_to_palette(pixels)
    min_px = max(MIN_COMPONENT_PX, round(MIN_COMPONENT_PX * labels.size / 1024))
    blobs = [c for c in _components(labels > 0) if len(c) >= min_px]
    if not blobs:
        return 0, NONE, NONE
    stride = labels.shape[1] + 2
    padded = np.pad(labels, 1).ravel()
    colour_ids = padded[np.concatenate(blobs)]
    colour = _PALETTE_NAMES[int(np.bincount(colour_ids).argmax())]
    shape = _majority(classify_fill(_fill_ratio(blob, stride)) for blob in blobs)
    return len(blobs), colour, shape


# ---------------------------------------------------------------------------- held-out


def all_combinations(params: ShapesParams) -> list[Combination]:
    """Return every (count, colour, shape) combination of the params, in params order."""
    return list(itertools.product(params.counts, params.colours, params.shapes))


def _pairs(combo: Combination) -> tuple[tuple[int, Any, Any], ...]:
    count, colour, shape = combo
    return ((0, count, colour), (1, count, shape), (2, colour, shape))


def held_out_combinations(params: ShapesParams) -> list[Combination]:
    """Return the held-out (count, colour, shape) combinations, chosen from params.seed.

    Every attribute pair stays covered by the training combinations. Raises ValueError when
    `held_out_combinations` of them cannot be held out that way.
    """
    combos = all_combinations(params)
    random.Random(f"{params.seed}:held-out-combinations").shuffle(combos)
    cover = Counter(pair for combo in combos for pair in _pairs(combo))
    chosen: list[Combination] = []
    for combo in combos:
        if len(chosen) == params.held_out_combinations:
            break
        if all(cover[pair] > 1 for pair in _pairs(combo)):
            cover.subtract(_pairs(combo))
            chosen.append(combo)
    if len(chosen) < params.held_out_combinations:
        raise ValueError(
            f"cannot hold out {params.held_out_combinations} combinations and still cover every "
            f"attribute pair (at most {len(chosen)} found)"
        )
    order = all_combinations(params)
    return sorted(chosen, key=order.index)


def held_out_templates(params: ShapesParams) -> list[int]:
    """Return the ids of the held-out narrative templates, chosen from params.seed.

    Raises ValueError when that would leave no template for training.
    """
    if params.held_out_templates >= len(TEMPLATES):
        raise ValueError(
            f"held_out_templates={params.held_out_templates} leaves no training template "
            f"(there are {len(TEMPLATES)})"
        )
    ids = random.Random(f"{params.seed}:held-out-templates").sample(
        range(len(TEMPLATES)), params.held_out_templates
    )
    return sorted(ids)


# ------------------------------------------------------------------------------ writer


def image_name(index: int) -> str:
    """Return the relative file name of sample `index`: 'images/shape_0000042.png'."""
    return f"{IMAGES_DIR}/shape_{index:07d}.png"


def sample_row(
    params: ShapesParams,
    index: int,
    held_combos: frozenset[Combination],
    held_templates: frozenset[int],
) -> tuple[dict[str, Any], Image.Image]:
    """Return (metadata row, image) of sample `index`; it depends only on (params, seed, index)."""
    rng = random.Random(f"{params.seed}:{index}")
    count = rng.choice(params.counts)
    colour = rng.choice(params.colours)
    shape = rng.choice(params.shapes)
    template = rng.randrange(len(TEMPLATES))
    text = narrative_prompt(count, colour, shape, template, rng)
    image = render_scene(count, colour, shape, rng, params)
    if (count, colour, shape) in held_combos:
        heldout = HELDOUT_COMBINATION
    elif template in held_templates:
        heldout = HELDOUT_TEMPLATE
    else:
        heldout = HELDOUT_NONE
    row = {
        "file_name": image_name(index),
        "text": text,
        "prompt": keyword_prompt(count, colour, shape),
        "count": count,
        "colour": colour,
        "shape": shape,
        "template": template,
        "heldout": heldout,
    }
    return row, image


def _progress(indices: range) -> Iterator[int]:
    try:
        from tqdm import tqdm
    except ImportError:
        return iter(indices)
    return iter(tqdm(indices, desc="shapes", unit="sample", leave=False))


def _write_samples(params: ShapesParams, folder: Path, num_samples: int) -> None:
    held_combos = frozenset(held_out_combinations(params))
    held_templates = frozenset(held_out_templates(params))
    (folder / IMAGES_DIR).mkdir()
    with (folder / METADATA_FILE).open("w", encoding="utf-8") as metadata:
        for index in _progress(range(num_samples)):
            row, image = sample_row(params, index, held_combos, held_templates)
            image.save(folder / row["file_name"], format="PNG")
            metadata.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_shapes_dataset(
    params: ShapesParams, out_dir: Path, num_samples: int | None = None
) -> Path:
    """Write the shapes SURD folder (`metadata.jsonl`, `images/`) atomically; return `out_dir`.

    `num_samples` defaults to params.num_samples. Raises ValueError on invalid params.
    """
    check_params(params)
    total = params.num_samples if num_samples is None else num_samples
    if total < 0:
        raise ValueError(f"num_samples must be >= 0, got {total}")
    out_dir = Path(out_dir)
    recover_dir(out_dir)
    staging = staging_dir(out_dir)
    try:
        _write_samples(params, staging, total)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)
    return out_dir
