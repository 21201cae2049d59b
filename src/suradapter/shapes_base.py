"""`sur bootstrap-base`: train the shapes-world base model once, measure it, and ship it.

Training is `train.bootstrap`; guidance is tuned on validation and the model measured on the
test sets with the oracle (`evaluate.base_model`); the shipped folder carries the model, its
provenance, metrics, training log and SHA256SUMS.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

from suradapter.config import Params
from suradapter.evaluate.base_model import measure_test_sets, tune_guidance
from suradapter.model.tokenizer import CLIP_BPE_PACKAGE as CLIP_BPE_SOURCE
from suradapter.model.tokenizer import fetch_clip_bpe
from suradapter.provenance import git_commit, sha256_file, write_checksums
from suradapter.train.bootstrap import TRAIN_LOG, save_base_model, train_base_model


def bootstrap_base(params: Params, command: str, max_steps: int | None = None) -> dict:
    """Train, tune guidance on validation, measure on test, and ship the base model folder.

    Returns the metrics written to `<output_dir>/metrics.json`.
    """
    started = time.monotonic()
    pipeline, log = train_base_model(params.bootstrap, params.shapes, max_steps=max_steps)
    train_seconds = time.monotonic() - started
    guidance, validation = tune_guidance(pipeline, params.shapes, params.sampling)
    test = measure_test_sets(pipeline, params.shapes, params.sampling, guidance)
    metrics = {
        "guidance": guidance,
        "validation_keyword_seen": {str(g): s.as_dict() for g, s in validation.items()},
        "test_keyword_heldout": test["keyword"].as_dict(),
        "test_narrative_heldout": test["narrative"].as_dict(),
        "images": {"keyword": test["keyword"].n, "narrative": test["narrative"].n},
    }
    out_dir = Path(params.bootstrap.output_dir)
    save_base_model(pipeline, out_dir, Path(params.bootstrap.checkpoint_dir) / "tokenizer")
    bpe = fetch_clip_bpe(Path(params.bootstrap.checkpoint_dir) / "clip-bpe")
    provenance = {
        "command": command,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(train_seconds, 1),
        "steps": log[-1]["step"] if log else 0,
        "tokenizer": {"source": CLIP_BPE_SOURCE, "sha256": sha256_file(bpe)},
        "versions": {name: version(name) for name in ("torch", "diffusers", "transformers")},
        "params": {
            "bootstrap": params.bootstrap.model_dump(mode="json"),
            "shapes": params.shapes.model_dump(mode="json"),
            "sampling": params.sampling.model_dump(mode="json"),
        },
    }
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copyfile(Path(params.bootstrap.checkpoint_dir) / TRAIN_LOG, out_dir / TRAIN_LOG)
    write_checksums(out_dir)
    return metrics
