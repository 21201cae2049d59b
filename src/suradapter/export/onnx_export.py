"""Export the adapted text path (frozen CLIP text encoder + SUR-adapter) to ONNX, with parity.

Exporter: `torch.onnx.export(..., dynamo=True)` at opset 18. The TorchScript exporter is
deprecated and, on the reference mode's sequence-first attention, bakes the example batch
size into reshapes (ORT then fails at any other batch); the dynamo exporter keeps the batch
dimension symbolic in both modes. The sequence length is fixed at the tokenizer's
max_length, because the Stable Diffusion text path always pads to it.

The export is written to a staging folder, checked against PyTorch on fixed prompts, and
only then moved into place: a failed parity check leaves the previous export untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.config import ExportParams, Params
from suradapter.devices import process_device
from suradapter.export.runtime import OnnxTextPath
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.model.zoo import load_base_from_params
from suradapter.provenance import (
    ADAPTER_WEIGHTS,
    EXPORT_REPORT_FILE,
    TEXT_PATH_MODEL,
    TOKENIZER_DIR,
    sha256_file,
)

LOG = logging.getLogger(__name__)
EXPORTER = "torch.onnx.export(dynamo=True)"
# Loading options transformers records in a saved tokenizer_config.json: they follow the
# environment (HF_HUB_OFFLINE), so they would make the export's bytes differ between machines.
LOAD_OPTIONS = ("local_files_only", "cache_dir", "token", "force_download", "proxies")
# The exporter records each node's Python stack trace: absolute source paths and line numbers,
# which would make the graph's bytes differ between checkouts and leak local paths.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


class ExportParityError(RuntimeError):
    """The ONNX text path disagrees with PyTorch beyond the tolerance."""


class _WithMask(nn.Module):
    def __init__(self, path: AdaptedTextPath) -> None:
        super().__init__()
        self.path = path

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.path(input_ids, attention_mask)


class _IdsOnly(nn.Module):
    """Reference mode ignores the mask (as the reference does), so the graph takes ids only."""

    def __init__(self, path: AdaptedTextPath) -> None:
        super().__init__()
        self.path = path

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.path(input_ids, None)


@dataclass
class ExportResult:
    folder: Path
    report: dict


def exportable(path: AdaptedTextPath) -> nn.Module:
    """The module whose signature the ONNX graph gets: (input_ids[, attention_mask])."""
    needs_mask = not path.adapter.is_reference
    return _WithMask(path) if needs_mask else _IdsOnly(path)


def export_text_path(
    path: AdaptedTextPath,
    params: ExportParams,
    out_dir: Path,
    adapter_dir: Path | None = None,
    base_model: str = "",
) -> ExportResult:
    """Export `path` to `out_dir/text_path.onnx` (+ tokenizer, report); check parity.

    Raises ExportParityError (with the figure) when the max abs diff exceeds the tolerance.
    """
    out_dir = Path(out_dir)
    recover_dir(out_dir)
    staging = staging_dir(out_dir)
    try:
        report = _export_into(staging, path, params, out_dir, adapter_dir, base_model)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)
    LOG.info("exported %s (parity %.3g)", out_dir / TEXT_PATH_MODEL, report["parity_max_abs_diff"])
    return ExportResult(out_dir, report)


def export_adapter(
    params: Params,
    adapter_dir: Path,
    out_dir: Path,
    settings: ExportParams | None = None,
    device: torch.device | None = None,
) -> ExportResult:
    """`sur export`: the base model's text encoder with the adapter in `adapter_dir`, on
    `device` (default: this process's GPU when one is visible, else the CPU), exported and
    checked by `export_text_path` with `settings` (default: `params.export`)."""
    pipeline = load_base_from_params(params.base_model)
    adapter = SURAdapter.from_pretrained(adapter_dir)
    path = AdaptedTextPath.from_pipeline(pipeline, adapter).to(device or process_device())
    settings = settings or params.export
    return export_text_path(path, settings, out_dir, adapter_dir, params.base_model.id)


def _export_into(
    staging: Path,
    path: AdaptedTextPath,
    params: ExportParams,
    out_dir: Path,
    adapter_dir: Path | None,
    base_model: str,
) -> dict:
    # The parity reference stays where the weights are (the GPU, when there is one); the
    # graph is traced from a CPU copy. The caller's model stays untouched.
    reference = copy.deepcopy(path).float().eval()
    on_cpu = reference.text_encoder.device.type == "cpu"
    target = reference if on_cpu and not params.fp16 else copy.deepcopy(reference).cpu()
    module = exportable(target.half() if params.fp16 else target).eval()
    tokens = reference.tokenize(params.parity_prompts[:2])
    args = (tokens.input_ids,)
    if isinstance(module, _WithMask):
        args += (tokens.attention_mask,)
    batch = torch.export.Dim("batch", min=1, max=4096)
    names = ["input_ids", "attention_mask"][: len(args)]
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > params.external_data_mb * 1024 * 1024
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=params.opset,
            input_names=names,
            output_names=["prompt_embeds"],
            dynamic_shapes={name: {0: batch} for name in names},
            verbose=False,
        )
    adapter_sha = sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS) if adapter_dir else ""
    metadata = {
        "adapter_sha256": adapter_sha,
        "adapter_mode": reference.adapter.config.mode,
        "adapter_weight": str(reference.adapter.adapter_weight),
        "base_model": base_model,
        "exporter": EXPORTER,
        "opset": str(params.opset),
        "dtype": "float16" if params.fp16 else "float32",
        "max_length": str(reference.max_length),
        "vocab_size": str(reference.text_encoder.config.vocab_size),
        "hidden_size": str(reference.text_encoder.config.hidden_size),
    }
    program.model.metadata_props.update(metadata)
    for node in program.model.graph.all_nodes():  # this checkout's paths and line numbers
        node.metadata_props.pop(STACK_TRACE_KEY, None)
    program.save(str(staging / TEXT_PATH_MODEL), external_data=external)
    for option in LOAD_OPTIONS:  # how this machine loaded it is not part of the tokenizer
        reference.tokenizer.init_kwargs.pop(option, None)
    reference.tokenizer.save_pretrained(staging / TOKENIZER_DIR)

    exported = OnnxTextPath.load(staging, params.providers, Path(params.trt_cache_dir))
    diff = parity_max_abs_diff(reference, exported, params.parity_prompts)
    tolerance = params.fp16_tolerance if params.fp16 else params.fp32_tolerance
    report = {
        **metadata,
        "parity_max_abs_diff": diff,
        "parity_tolerance": tolerance,
        "parity_prompts": len(params.parity_prompts),
        "parity_torch_device": str(reference.text_encoder.device),
        "parity_provider": exported.provider,
        "external_data": external,
        "weight_bytes": weight_bytes,
        "inputs": exported.input_names,
    }
    if not diff <= tolerance:
        raise ExportParityError(
            f"ONNX text path differs from PyTorch by {diff:.3g} (max abs, "
            f"{report['dtype']}), above the tolerance {tolerance:g}; {out_dir} was left as it was"
        )
    (staging / EXPORT_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def parity_max_abs_diff(
    reference: AdaptedTextPath, exported: OnnxTextPath, prompts: list[str]
) -> float:
    """Max abs difference between PyTorch fp32 (on its device) and ONNX embeddings, at batch
    1 and at all.

    Each batch is compared with PyTorch on the same batch: in reference mode the
    sequence-first attention mixes the prompts of a batch (a reference bug we keep there).
    """
    tokens = reference.tokenize(prompts)
    worst = 0.0
    for rows in (slice(0, 1), slice(0, len(prompts))):  # two batch sizes: dynamic batch
        ids, mask = tokens.input_ids[rows], tokens.attention_mask[rows]
        with torch.no_grad():
            expected = reference(ids, mask).cpu().numpy()
        got = exported.run(ids, mask)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
