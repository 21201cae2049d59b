"""Where a stage runs: this process's accelerator (CUDA when visible) or the CPU, and dtypes.

Under `accelerate launch` / `torchrun` each process takes the GPU of its `LOCAL_RANK`, as
Accelerate itself does; without a visible GPU everything stays on the CPU.
"""

from __future__ import annotations

import os

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def process_device(preference: str = "auto") -> torch.device:
    """The device of this process: `auto` = `cuda:<LOCAL_RANK>` when CUDA is visible, else CPU.

    Raises ValueError when `cuda` is asked for and no GPU is visible.
    """
    if preference not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device '{preference}' is unknown; use auto, cpu or cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank % torch.cuda.device_count())
