"""The content-addressed teacher-feature cache: safetensors shards plus an index.

Layout under `<cache_dir>/`:
  settings/<key>.json         embed settings (teacher, layer, pooling, dtype, length) -> the
                              namespace `sur embed` filled for them, with its fingerprint, so
                              readers (`sur train`) find it without loading or hashing the LLM
and under `<cache_dir>/<teacher fingerprint id>/`:
  fingerprint.json            what the namespace means (teacher, weights hash, layer, ...)
  shards/<writer>-<n>.safetensors   tensor `features` [n, D]; metadata `keys` = JSON list of
                              text hashes, row i of `features` belongs to key i
  index.json                  text hash -> [shard file, row]; derived from the shards

A key is the sha256 of the text; the namespace already fixes the teacher setting, so the
full cache key is (teacher, weights, layer, pooling, dtype, max_length) + hash(text).
Shards are written to a temp file and renamed, so a crash never leaves a corrupt shard; the
index is rebuilt from the shards whenever it does not match them, so a crash between a shard
and its index update loses nothing. Several writers (processes) use distinct shard names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from suradapter.atomic import atomic_write_bytes

SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
FINGERPRINT_FILE = "fingerprint.json"
FEATURES = "features"
SETTINGS_DIR = "settings"


def text_key(text: str) -> str:
    """The cache key of a text: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_id(fingerprint: dict[str, object]) -> str:
    """A short hash of a teacher fingerprint: the name of its cache namespace."""
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _settings_path(root: Path, settings: dict[str, object]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / SETTINGS_DIR / f"{key}.json"


def record_namespace(root: Path, settings: dict[str, object], fingerprint: dict) -> None:
    """Record that `settings` are served by the namespace of `fingerprint` (atomic)."""
    path = _settings_path(root, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "fingerprint": fingerprint}
    record["fingerprint_id"] = fingerprint_id(fingerprint)
    atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())


def recorded_namespace(root: Path, settings: dict[str, object]) -> dict[str, object]:
    """The fingerprint `sur embed` recorded for `settings`. Raises FileNotFoundError."""
    path = _settings_path(root, settings)
    if not path.is_file():
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        raise FileNotFoundError(
            f"no teacher features in {root} for embed settings ({shown}): run `sur embed`"
        )
    return json.loads(path.read_text())["fingerprint"]


class TeacherCache:
    """One namespace of the cache (one teacher setting)."""

    def __init__(self, root: Path, fingerprint: dict[str, object]) -> None:
        self.folder = Path(root) / fingerprint_id(fingerprint)
        (self.folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        record = self.folder / FINGERPRINT_FILE
        if not record.is_file():
            atomic_write_bytes(record, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        for stale in (self.folder / SHARDS_DIR).glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)  # a writer died mid-shard: never renamed, never used
        self.index = self._load_index()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def shard_files(self) -> list[Path]:
        return sorted((self.folder / SHARDS_DIR).glob("*.safetensors"))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not yet cached, in first-seen order, without duplicates."""
        return [key for key in dict.fromkeys(keys) if key not in self.index]

    def write_shard(self, writer: str, keys: list[str], features: torch.Tensor) -> Path:
        """Store `features` [len(keys), D] as a new shard of `writer`; return its path."""
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise ValueError(f"shard of {len(keys)} keys got features {tuple(features.shape)}")
        sequence = sum(1 for p in self.shard_files if p.name.startswith(f"{writer}-"))
        path = self.folder / SHARDS_DIR / f"{writer}-{sequence:05d}.safetensors"
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tensors = {FEATURES: features.to(torch.float32).contiguous()}
        save_file(tensors, str(temp), metadata={"keys": json.dumps(keys)})
        temp.replace(path)
        for row, key in enumerate(keys):
            self.index[key] = (path.name, row)
        return path

    def save_index(self) -> None:
        """Write index.json atomically (it can always be rebuilt from the shards)."""
        data = {"shards": [p.name for p in self.shard_files], "entries": self.index}
        atomic_write_bytes(self.folder / INDEX_FILE, json.dumps(data).encode())

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features [len(keys), D] in the order of `keys`. Raises KeyError naming a missing one."""
        absent = [key for key in keys if key not in self.index]
        if absent:
            raise KeyError(f"{len(absent)} texts are not in the teacher cache, e.g. {absent[0]}")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self.index[key]
            by_shard.setdefault(shard, []).append((position, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            with safe_open(str(self.folder / SHARDS_DIR / shard), framework="pt") as handle:
                features = handle.get_tensor(FEATURES)
            if out is None:
                out = torch.empty(len(keys), features.shape[1])
            positions, rows = zip(*pairs, strict=True)
            out[list(positions)] = features[list(rows)]
        return out if out is not None else torch.empty(0, 0)

    def _load_index(self) -> dict[str, tuple[str, int]]:
        names = [p.name for p in self.shard_files]
        path = self.folder / INDEX_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("shards") == names:
                return {key: (shard, row) for key, (shard, row) in data["entries"].items()}
        return self.rebuild_index()

    def rebuild_index(self) -> dict[str, tuple[str, int]]:
        """Scan every shard's key list (headers only) and rebuild the index from it."""
        index: dict[str, tuple[str, int]] = {}
        for shard in self.shard_files:
            with safe_open(str(shard), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
            for row, key in enumerate(keys):
                index.setdefault(key, (shard.name, row))
        self.index = index
        return index
