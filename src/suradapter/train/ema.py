"""EMA of the adapter weights (diffusers' EMAModel), kept in the training state as safetensors.

Accelerate's `register_for_checkpointing` would pickle the EMA and load it back with
`weights_only=False`; the shadow weights are plain tensors, so they go beside the
Accelerate state as `ema.safetensors` (update count in the metadata) and load without pickle.
"""

from __future__ import annotations

from pathlib import Path

from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

EMA_FILE = "ema.safetensors"
STEP_KEY = "optimization_step"


def make_ema(model: nn.Module, decay: float | None) -> EMAModel | None:
    """An EMA of `model`'s parameters (decay min(decay, (1+n)/(10+n)) at update n), or None."""
    return None if decay is None else EMAModel(model.parameters(), decay=decay)


def save_ema(ema: EMAModel, folder: Path) -> None:
    tensors = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}
    save_file(tensors, str(folder / EMA_FILE), metadata={STEP_KEY: str(ema.optimization_step)})


def load_ema(ema: EMAModel, folder: Path) -> None:
    """Restore the shadow weights and update count saved by `save_ema` in `folder`."""
    path = folder / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no EMA state (train.ema_decay changed?)")
    with safe_open(str(path), framework="pt") as handle:
        for i, shadow in enumerate(ema.shadow_params):
            shadow.copy_(handle.get_tensor(str(i)))
        ema.optimization_step = int(handle.metadata()[STEP_KEY])
