"""The content-addressed teacher-feature cache: verified safetensors shards plus an index.

Layout under `<cache_dir>/`:
  settings/<key>.json         embed settings (teacher, layer, pooling, dtype, length) -> the
                              namespace `sur embed` filled for them, with its fingerprint, so
                              readers (`sur train`) find it without loading or hashing the LLM
and under `<cache_dir>/<teacher fingerprint id>/`:
  fingerprint.json            what the namespace means (teacher, weights hash, layer, ...)
  shards/<writer>-<sha256 of the shard's bytes>.safetensors
                              tensor `features` [n, D] float32; metadata `keys` = JSON list of
                              text hashes, row i of `features` belongs to key i
  index.json                  text hash -> [shard file, row]; derived from the shards

A key is the sha256 of the text; the namespace already fixes the teacher setting, so the
full cache key is (teacher, weights, layer, pooling, dtype, max_length) + hash(text).

The shards follow the frozen-output cache's scheme (`suradapter.frozen.cache`): a shard is
named by the sha256 of its own bytes and written to a temp file, then renamed, so
  - opening the cache verifies every shard (its bytes hash to its name, its header parses,
    its features are finite float32 rows, one per key); a shard that fails is removed with a
    `TeacherCacheWarning` naming it and why, its keys count as missing and the next
    `sur embed` computes them again; `get` verifies each shard it reads the same way and
    raises `DamagedCacheError` rather than hand a damaged or non-finite row to training;
  - two writers (processes, ranks, two unsharded runs) never overwrite each other's shards:
    equal names mean equal bytes;
  - a writer killed mid-shard leaves only a temp file, removed by the next open once that
    writer's process is gone (a live writer's temp file is left alone).
Non-finite features are never written (`write_shard` raises). `index.json` is rebuilt from
the verified shards whenever it is missing, unparseable or disagrees with them. Shards of the
earlier `<writer>-<n>.safetensors` naming carry no checksum: they are adopted (renamed to
their digest) when their header and features pass the same checks, else removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from suradapter.atomic import atomic_write_bytes, remove_dead_temp_files

SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
FINGERPRINT_FILE = "fingerprint.json"
FEATURES = "features"
SETTINGS_DIR = "settings"
SHARD_SUFFIX = ".safetensors"
CONTENT_NAME = re.compile(r"^(?P<writer>[^-]+)-(?P<digest>[0-9a-f]{64})$")


class TeacherCacheWarning(UserWarning):
    """A damaged shard or index of the teacher cache was found and healed."""


class MissingFeaturesError(KeyError):
    """Texts without teacher features (run `sur embed`); a KeyError that prints its message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedCacheError(ValueError):
    """A shard failed verification when read; it has been removed (run `sur embed`)."""


class _ShardDamage(Exception):
    """Why a shard cannot be trusted (internal: turned into a warning or DamagedCacheError)."""


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


def non_finite_rows(features: torch.Tensor) -> list[int]:
    """Rows of `features` [n, D] holding a NaN or an infinity."""
    return torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten().tolist()


class TeacherCache:
    """One namespace of the cache (one teacher setting), its shards verified on open."""

    def __init__(self, root: Path, fingerprint: dict[str, object]) -> None:
        self.folder = Path(root) / fingerprint_id(fingerprint)
        (self.folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        record = self.folder / FINGERPRINT_FILE
        if not record.is_file():
            atomic_write_bytes(record, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        self.damaged: list[str] = []  # shards removed as damaged: "<file>: <why>"
        self.index: dict[str, tuple[str, int]] = {}
        self._shard_keys: dict[str, list[str]] = {}  # verified shard name -> its keys
        for folder in (self.folder, self.folder / SHARDS_DIR):
            remove_dead_temp_files(folder)  # a writer died mid-write: never renamed, never used
        self.rebuild_index()
        self._sync_index_file()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def shard_files(self) -> list[Path]:
        return sorted((self.folder / SHARDS_DIR).glob(f"*{SHARD_SUFFIX}"))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not yet cached, in first-seen order, without duplicates."""
        return [key for key in dict.fromkeys(keys) if key not in self.index]

    def write_shard(self, writer: str, keys: list[str], features: torch.Tensor) -> Path:
        """Store `features` [len(keys), D] as a new shard of `writer`, named by its digest.

        Returns its path. Raises ValueError on a shape mismatch or a non-finite feature.
        """
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise ValueError(f"shard of {len(keys)} keys got features {tuple(features.shape)}")
        if not writer or "-" in writer:
            raise ValueError(f"shard writer '{writer}' must be a non-empty name without '-'")
        features = features.to(torch.float32).contiguous()
        bad = non_finite_rows(features)
        if bad:
            raise ValueError(
                f"refusing to cache {len(bad)} non-finite teacher features (NaN/inf) in "
                f"{self.folder}, e.g. text key {keys[bad[0]]}"
            )
        blob = save({FEATURES: features}, metadata={"keys": json.dumps(keys)})
        path = self.folder / SHARDS_DIR / _content_name(writer, blob)
        atomic_write_bytes(path, blob)
        self._shard_keys[path.name] = list(keys)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (path.name, row))
        return path

    def save_index(self) -> None:
        """Pick up shards other writers finished, then write index.json atomically."""
        self.rebuild_index()
        self._sync_index_file()

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features [len(keys), D] in the order of `keys`, each shard re-verified as it is read.

        Raises MissingFeaturesError (a KeyError) naming a missing key, DamagedCacheError
        naming a shard that fails.
        """
        absent = [key for key in keys if key not in self.index]
        if absent:
            removed = f"; removed as damaged: {'; '.join(self.damaged)}" if self.damaged else ""
            raise MissingFeaturesError(
                f"{len(absent)} texts are not in the teacher cache {self.folder}, e.g. "
                f"{absent[0]}: run `sur embed`{removed}"
            )
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self.index[key]
            by_shard.setdefault(shard, []).append((position, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            features = self._read_verified(shard)
            if out is None:
                out = torch.empty(len(keys), features.shape[1])
            positions, rows = zip(*pairs, strict=True)
            out[list(positions)] = features[list(rows)]
        return out if out is not None else torch.empty(0, 0)

    def rebuild_index(self) -> dict[str, tuple[str, int]]:
        """Verify the shards not verified yet (others' new ones) and rebuild the index.

        A shard that fails verification is removed (see the module docstring).
        """
        on_disk = set()
        for path in self.shard_files:
            if path.name in self._shard_keys:
                on_disk.add(path.name)
                continue
            try:
                keys, name = self._verify(path)
            except FileNotFoundError:  # removed by another opener meanwhile
                continue
            if keys is not None:
                self._shard_keys[name] = keys
                on_disk.add(name)
        self._shard_keys = {n: k for n, k in self._shard_keys.items() if n in on_disk}
        index: dict[str, tuple[str, int]] = {}
        for name in sorted(self._shard_keys):
            for row, key in enumerate(self._shard_keys[name]):
                index.setdefault(key, (name, row))
        self.index = index
        return index

    def _verify(self, path: Path) -> tuple[list[str] | None, str]:
        """(keys, name) of a trusted shard; (None, name) after removing a damaged one."""
        blob = path.read_bytes()
        match = CONTENT_NAME.match(path.name.removesuffix(SHARD_SUFFIX))
        try:
            if match is None:  # the earlier `<writer>-<n>` naming: no checksum to compare
                keys, _ = _decode(blob)
                writer = path.name.removesuffix(SHARD_SUFFIX).split("-")[0]
                adopted = path.with_name(_content_name(writer, blob))
                path.replace(adopted)
                return keys, adopted.name
            _check_digest(blob, match["digest"])
            keys, _ = _decode(blob)
            return keys, path.name
        except _ShardDamage as why:
            self._quarantine(path, str(why))
            return None, path.name

    def _read_verified(self, name: str) -> torch.Tensor:
        path = self.folder / SHARDS_DIR / name
        try:
            blob = path.read_bytes()
            _check_digest(blob, CONTENT_NAME.match(name.removesuffix(SHARD_SUFFIX))["digest"])
            _, features = _decode(blob)
            return features
        except FileNotFoundError:
            why = "the file has gone since the cache was opened"
        except _ShardDamage as damage:
            why = str(damage)
            self._quarantine(path, why)
        self._shard_keys.pop(name, None)
        self.rebuild_index()
        raise DamagedCacheError(
            f"teacher cache {self.folder}: shard {SHARDS_DIR}/{name} failed verification "
            f"({why}); it is not served: run `sur embed` to compute its features again"
        )

    def _quarantine(self, path: Path, why: str) -> None:
        path.unlink(missing_ok=True)
        self.damaged.append(f"{SHARDS_DIR}/{path.name}: {why}")
        warnings.warn(
            f"teacher cache {self.folder}: removed damaged shard {SHARDS_DIR}/{path.name} "
            f"({why}); the next `sur embed` computes its features again",
            TeacherCacheWarning,
            stacklevel=4,
        )

    def _index_record(self) -> dict[str, object]:
        return {
            "shards": sorted(self._shard_keys),
            "entries": {key: list(place) for key, place in self.index.items()},
        }

    def _sync_index_file(self) -> None:
        """Rewrite index.json when it is missing, unparseable or disagrees with the shards."""
        path = self.folder / INDEX_FILE
        record = self._index_record()
        try:
            if json.loads(path.read_text()) == record:
                return
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warnings.warn(
                f"teacher cache {self.folder}: {INDEX_FILE} is unreadable ({err}); "
                "rebuilt from the shards",
                TeacherCacheWarning,
                stacklevel=3,
            )
        atomic_write_bytes(path, json.dumps(record).encode())


def _content_name(writer: str, blob: bytes) -> str:
    return f"{writer}-{hashlib.sha256(blob).hexdigest()}{SHARD_SUFFIX}"


def _check_digest(blob: bytes, expected: str) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise _ShardDamage(
            f"content hash {digest[:12]}… does not match its name (truncated or altered)"
        )


def _decode(blob: bytes) -> tuple[list[str], torch.Tensor]:
    """The keys and features of shard bytes. Raises _ShardDamage saying what is wrong."""
    try:
        tensors = load(blob)
        header_size = int.from_bytes(blob[:8], "little")
        keys = json.loads(json.loads(blob[8 : 8 + header_size])["__metadata__"]["keys"])
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise _ShardDamage(f"unreadable ({err})") from None
    features = tensors.get(FEATURES)
    if features is None or features.dtype != torch.float32 or features.ndim != 2:
        raise _ShardDamage(f"no float32 [n, D] tensor '{FEATURES}'")
    if not isinstance(keys, list) or len(keys) != features.shape[0]:
        raise _ShardDamage(f"{features.shape[0]} feature rows for a key list of another length")
    bad = non_finite_rows(features)
    if bad:
        raise _ShardDamage(f"{len(bad)} non-finite feature rows (NaN/inf), e.g. row {bad[0]}")
    return keys, features
