"""ONNX Runtime sessions for the exported text path: one factory for export checks and serving.

Package choice: the project depends on `onnxruntime-gpu` only. On Linux it carries the CPU
execution provider too, so one dependency serves CPU machines and GPU machines; installing
`onnxruntime` beside it would overwrite the same `onnxruntime/` package.

ORT falls back to the CPU provider silently when a GPU provider cannot start (it lists the
providers it was *compiled* with, not the usable ones). The factory therefore tries each
preferred provider in turn, checks which one the session actually took, logs it, and moves
on to the next preference when a provider was not taken.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from suradapter.model.text_path import sd_tokenize
from suradapter.provenance import EXPORT_REPORT_FILE, TEXT_PATH_MODEL, TOKENIZER_DIR

LOG = logging.getLogger(__name__)
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"tensorrt", "cuda"}


class ProviderError(RuntimeError):
    """No preferred execution provider could run the model."""


def gpu_present() -> bool:
    """Whether an NVIDIA driver is visible (ORT's own list cannot tell)."""
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("SUR_FORCE_GPU_PROVIDERS"))


def candidate_providers(preference: list[str]) -> list[str]:
    """The preferred providers this machine could run, in order (compiled in, GPU present)."""
    unknown = [name for name in preference if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; use {sorted(PROVIDERS)}")
    compiled = set(ort.get_available_providers())
    usable = []
    for name in preference:
        if PROVIDERS[name] not in compiled:
            LOG.info("provider %s: not in this onnxruntime build, skipped", name)
        elif name in GPU_PROVIDERS and not gpu_present():
            LOG.info("provider %s: no NVIDIA GPU visible, skipped", name)
        else:
            usable.append(name)
    return usable


def _provider_entry(name: str, trt_cache_dir: Path | None, fp16: bool) -> Any:
    if name == "tensorrt":
        cache = Path(trt_cache_dir or ".sur/trt_cache")
        cache.mkdir(parents=True, exist_ok=True)
        options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_fp16_enable": fp16,
        }
        return (PROVIDERS[name], options)
    return PROVIDERS[name]


def create_session(
    model_path: Path,
    preference: list[str],
    trt_cache_dir: Path | None = None,
    fp16: bool = False,
) -> tuple[ort.InferenceSession, str]:
    """Open `model_path` on the first preferred provider that really takes it.

    Returns (session, provider name). Raises ProviderError when none does.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    tried = []
    for name in candidate_providers(preference):
        providers = [_provider_entry(name, trt_cache_dir, fp16)]
        if name != "cpu":
            providers.append(PROVIDERS["cpu"])  # nodes the GPU provider cannot run
        try:
            session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as err:
            tried.append(f"{name}: {err}")
            LOG.warning("provider %s failed to start: %s", name, err)
            continue
        taken = session.get_providers()[0]
        if taken != PROVIDERS[name]:
            tried.append(f"{name}: ORT fell back to {taken}")
            LOG.warning("provider %s asked, but ORT took %s; trying the next", name, taken)
            continue
        LOG.info("text path %s runs on %s", model_path.name, taken)
        return session, name
    raise ProviderError(
        f"no execution provider could run {model_path} (preference {preference}): "
        + ("; ".join(tried) or "none available on this machine")
    )


@dataclass
class OnnxTextPath:
    """An exported text path: token ids [B, T] (+ mask) -> prompt embeddings [B, T, D]."""

    session: ort.InferenceSession
    provider: str
    metadata: dict[str, str]

    @classmethod
    def load(
        cls,
        folder: Path,
        preference: list[str] | None = None,
        trt_cache_dir: Path | None = None,
    ) -> OnnxTextPath:
        """Open the export in `folder` with the session factory."""
        model = Path(folder) / TEXT_PATH_MODEL
        if not model.is_file():
            raise FileNotFoundError(f"no {TEXT_PATH_MODEL} in {folder}: run `sur export` first")
        header = onnx.load(str(model), load_external_data=False)  # graph only, no session
        metadata = {prop.key: prop.value for prop in header.metadata_props}
        del header
        fp16 = metadata.get("dtype") == "float16"
        session, provider = create_session(model, preference or ["cpu"], trt_cache_dir, fp16)
        return cls(session, provider, metadata)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def max_length(self) -> int:
        return int(self.metadata["max_length"])

    def feeds(self, input_ids: Any, attention_mask: Any = None) -> dict[str, np.ndarray]:
        """Validate the inputs and build the session feed. Raises ValueError naming the input."""
        feeds = {"input_ids": self._check("input_ids", input_ids)}
        if "attention_mask" in self.input_names:
            if attention_mask is None:
                raise ValueError("attention_mask is required by this text path (fixed mode)")
            feeds["attention_mask"] = self._check("attention_mask", attention_mask)
            if feeds["attention_mask"].shape != feeds["input_ids"].shape:
                raise ValueError(
                    f"attention_mask shape {feeds['attention_mask'].shape} differs from "
                    f"input_ids shape {feeds['input_ids'].shape}"
                )
        return feeds

    def _check(self, name: str, value: Any) -> np.ndarray:
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if array.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer token ids, got dtype {array.dtype}")
        if array.ndim != 2:
            raise ValueError(f"{name} must be [batch, tokens], got rank {array.ndim}")
        if array.shape[0] < 1:
            raise ValueError(f"{name} has an empty batch")
        if array.shape[1] != self.max_length:
            longer = "too long" if array.shape[1] > self.max_length else "too short"
            raise ValueError(
                f"{name} has {array.shape[1]} tokens ({longer}); this text path takes exactly "
                f"{self.max_length} (pad and truncate with its tokenizer)"
            )
        array = array.astype(np.int64, copy=False)
        vocab = int(self.metadata.get("vocab_size", 0))
        if name == "input_ids" and vocab and (array.min() < 0 or array.max() >= vocab):
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        return array

    def run(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Prompt embeddings as float32 [B, T, D]."""
        output = self.session.run(None, self.feeds(input_ids, attention_mask))[0]
        return output.astype(np.float32, copy=False)

    def tokenize(self, tokenizer: Any, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids and mask of `prompts`, padded and truncated to this path's length."""
        tokens = sd_tokenize(tokenizer, prompts, "np", self.max_length)
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def read_report(folder: Path) -> dict:
    """The export report (`export.json`) written beside the model."""
    return json.loads((Path(folder) / EXPORT_REPORT_FILE).read_text())


def load_export_tokenizer(folder: Path) -> Any:
    """The export's CLIP tokenizer. Raises ValueError if it loaded without its vocabulary.

    `CLIPTokenizer.from_pretrained(folder)`: with transformers 5, `CLIPTokenizer(vocab_file=...)`
    silently drops the files and maps every word to <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.vocab_size <= 2:
        raise ValueError(f"tokenizer in {folder} loaded without its vocabulary")
    return tokenizer


@dataclass
class ExportedTextPath:
    """An export folder opened for inference: prompts in, adapted prompt embeddings out.

    The one inference path of a registered version: the pyfunc model and the server both
    open it with `load_export`.
    """

    text_path: OnnxTextPath
    tokenizer: Any
    report: dict[str, Any]
    token_lock: threading.Lock = field(default_factory=threading.Lock)

    def embed(self, prompts: list[str]) -> np.ndarray:
        """Adapted prompt embeddings, float32 [len(prompts), tokens, width], in one call."""
        with self.token_lock:  # fast tokenizers refuse concurrent calls ("Already borrowed")
            tokens = self.text_path.tokenize(self.tokenizer, prompts)
        return self.text_path.run(**tokens)


def load_export(
    folder: Path, preference: list[str] | None = None, trt_cache_dir: Path | None = None
) -> ExportedTextPath:
    """Open the export in `folder`: its report, text path (session factory) and tokenizer."""
    folder = Path(folder)
    report = read_report(folder)
    text_path = OnnxTextPath.load(folder, preference, trt_cache_dir)
    return ExportedTextPath(text_path, load_export_tokenizer(folder / TOKENIZER_DIR), report)
