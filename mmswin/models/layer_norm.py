"""``nn.LayerNorm`` with mmswin's compiled kernel in CPU bf16 inference.

PyTorch's bf16 layer norm on the CPU converts and reduces with its AVX2 code and takes about 150 us for
4096 tokens of 96 channels on 2 cores; the kernel (``mmswin/csrc/layer_norm_cpu.cpp``) takes the mean and
the mean squared deviation of each row in fp32 with AVX-512 while the row stays in L1, and computes
``(x * rstd - mean * rstd) * weight + bias`` as PyTorch does, rounding once. Same parameters, same
checkpoints; elsewhere (fp32, autograd, torch.compile, other devices, no kernels) ``nn.LayerNorm``.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from . import cpu_kernels


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis, through the kernel for bf16 CPU inputs when nothing is
    recorded for autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_kernel(x):
            return cpu_kernels.kernels().layer_norm(x.contiguous(), *self.kernel_args())
        return super().forward(x)

    def kernel_args(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
        """``(weight, bias, eps)`` as the kernels take them (fp32 affine parameters or ``None``)."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return weight, bias, self.eps

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether this norm of ``x`` runs in the kernel: bf16 on the CPU, nothing recorded for autograd, not
        under torch.compile, the kernels in use."""
        if x.dtype != torch.bfloat16 or x.device.type != 'cpu' or len(self.normalized_shape) != 1:
            return False
        if torch.compiler.is_compiling() or x.shape[-1:] != self.normalized_shape:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return cpu_kernels.use_kernels()
