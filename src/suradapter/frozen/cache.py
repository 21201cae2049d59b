"""Storage of the frozen-output cache: content-addressed safetensors shards, verified on open.

Layout under `<encode.cache_dir>/<namespace>/` (namespace = a hash of the fingerprint):
  fingerprint.json                     what made the entries: the text encoder's and VAE's
                                       weights digests, the tokenizer's digest, compute dtype,
                                       resolution, format
  latents/<sha256 of bytes>.safetensors  `mean` (and `logvar` when the VAE has one) [n, C, h, w]
  texts/<sha256 of bytes>.safetensors    `states` [n, T, W]

Every shard's metadata `keys` lists its entries' keys (row i belongs to key i): a prepared
image's `sample_id` (the sha256 of its texts and source image bytes) for latents, the
sha256 of the text for text states. A shard is named by the sha256 of its own bytes and
written to a temp file, then renamed, so:
  - a shard truncated or altered after writing no longer matches its name: it is removed
    when the cache opens, and its entries count as missing (computed again, never served);
  - two writers (processes, ranks, machines on one share) never clobber each other: equal
    names mean equal bytes;
  - a writer killed mid-shard leaves only a temp file, removed on the next open.
There is no index file to go stale: the index is rebuilt from the shard headers on open.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from suradapter.atomic import atomic_write_bytes, remove_dead_temp_files
from suradapter.teacher.cache import fingerprint_id

LATENTS = "latents"
TEXTS = "texts"
KINDS = (LATENTS, TEXTS)
MEAN, LOGVAR, STATES = "mean", "logvar", "states"
FINGERPRINT_FILE = "fingerprint.json"


class FrozenCache:
    """One namespace of the frozen-output cache (one text encoder + VAE + dtype + resolution)."""

    def __init__(self, root: Path, fingerprint: dict[str, object]) -> None:
        self.fingerprint = fingerprint
        self.folder = Path(root) / fingerprint_id(fingerprint)
        for kind in KINDS:
            (self.folder / kind).mkdir(parents=True, exist_ok=True)
        record = self.folder / FINGERPRINT_FILE
        if not record.is_file():
            atomic_write_bytes(record, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        self.damaged: list[str] = []  # shards removed on open: "<kind>/<name>: <why>"
        self.index: dict[str, dict[str, tuple[str, int]]] = {kind: {} for kind in KINDS}
        self._handles: dict[str, object] = {}
        for kind in KINDS:
            self._scan(kind)

    def __getstate__(self) -> dict:  # DataLoader workers reopen their own handles
        return {**self.__dict__, "_handles": {}}

    def missing(self, kind: str, keys: Iterable[str]) -> list[str]:
        """Keys of `kind` not cached yet, in first-seen order, without duplicates."""
        return [key for key in dict.fromkeys(keys) if key not in self.index[kind]]

    def write_shard(self, kind: str, keys: list[str], tensors: dict[str, torch.Tensor]) -> Path:
        """Store tensors [len(keys), ...] as one shard named by its digest; return its path."""
        for name, tensor in tensors.items():
            if tensor.shape[0] != len(keys):
                raise ValueError(
                    f"{kind} shard of {len(keys)} keys got {name} {tuple(tensor.shape)}"
                )
        blob = save(
            {name: tensor.contiguous() for name, tensor in tensors.items()},
            metadata={"keys": json.dumps(keys)},
        )
        path = self.folder / kind / f"{hashlib.sha256(blob).hexdigest()}.safetensors"
        atomic_write_bytes(path, blob)
        for row, key in enumerate(keys):
            self.index[kind].setdefault(key, (path.name, row))
        return path

    def read(self, kind: str, key: str, tensor: str) -> torch.Tensor | None:
        """Entry `key`'s tensor `tensor` (None when the shard does not hold one)."""
        shard, row = self.index[kind][key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.folder / kind / shard), framework="pt")
            self._handles[shard] = handle
        if tensor not in handle.keys():  # noqa: SIM118 (a safe_open handle)
            return None
        return handle.get_slice(tensor)[row : row + 1][0]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for kind in KINDS for p in (self.folder / kind).iterdir())

    def _scan(self, kind: str) -> None:
        folder = self.folder / kind
        remove_dead_temp_files(folder)  # a writer died mid-shard: never renamed, never used
        for shard in sorted(folder.glob("*.safetensors")):
            problem = _shard_problem(shard)
            if problem:
                self.damaged.append(f"{kind}/{shard.name}: {problem}")
                shard.unlink(missing_ok=True)
                continue
            with safe_open(str(shard), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
            for row, key in enumerate(keys):
                self.index[kind].setdefault(key, (shard.name, row))


def _shard_problem(shard: Path) -> str | None:
    """Why `shard` cannot be trusted (its bytes do not hash to its name, or no header), or None."""
    with shard.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != shard.stem:
        return f"content hash {digest[:12]}… does not match its name (truncated or altered)"
    try:
        with safe_open(str(shard), framework="pt") as handle:
            json.loads(handle.metadata()["keys"])
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        return f"unreadable header ({err})"
    return None
