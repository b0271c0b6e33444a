"""Sums over chunks of tokens: the weight and bias gradients of the hand-written backward passes."""
from typing import Optional

import torch

from . import cpu_kernels
from .graph_capture import recording_graph


def add_chunk(total: Optional[torch.Tensor], part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total + part`` in ``dtype`` for sums over chunks (weight and bias gradients): the first chunk
    becomes the sum (in ``dtype``, a fresh tensor), later ones are added in place. No zero-filled
    accumulator and no add for the first chunk; on a GPU, where everything is one chunk, that is two
    kernels fewer per gradient. A bf16 part of an fp32 sum on the CPU is added by the compiled kernels in
    one pass (PyTorch's ``add_`` first copies it to a fresh fp32 tensor), to the same values."""
    if total is None:
        return part.to(dtype)
    if (total.dtype == torch.float32 and part.dtype == torch.bfloat16 and total.device.type == 'cpu'
            and not recording_graph() and cpu_kernels.use_kernels()
            and total.is_contiguous() and part.is_contiguous() and total.shape == part.shape):
        return cpu_kernels.kernels().accumulate_(total, part)
    return total.add_(part)
