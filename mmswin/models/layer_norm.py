"""``nn.LayerNorm`` with mmswin's compiled kernels for bf16 on the CPU.

PyTorch's bf16 layer norm on the CPU converts and reduces with its AVX2 code and takes about 150 us for
4096 tokens of 96 channels on 2 cores; the kernel (``mmswin/csrc/layer_norm_cpu.cpp``) takes the mean and
the mean squared deviation of each row in fp32 with AVX-512 while the row stays in L1, and computes
``(x * rstd - mean * rstd) * weight + bias`` as PyTorch does, rounding once. Where autograd records, the
forward also keeps each row's mean and ``1 / std`` (fp32), and the backward computes the input's gradient
row by row and the weight's and bias's as fp32 sums (PyTorch's bf16 backward runs about three times
slower). Same parameters, same checkpoints; fp16 on the CPU is normalised in fp32 (for finite second
derivatives); elsewhere (fp32, torch.compile, other devices, no kernels) ``nn.LayerNorm``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_kernels
from .graph_capture import recording_graph


class _LayerNormInKernels(torch.autograd.Function):
    """The kernels' layer norm of bf16 ``x: (..., C)`` with its backward. ``weight`` and ``bias`` come in
    their own dtype; their gradients (fp32 sums) are returned in it. With ``channels_first``, tokens
    ``x: (B, L, C)`` are normalised and written as ``(B, C, L)`` (a backbone output), and the gradient is
    laid out by token in one pass (``channels_last_bf16``) before the norm's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                channels_first: bool = False) -> torch.Tensor:
        kernels = cpu_kernels.kernels()
        norm = kernels.layer_norm_channels_first_with_stats if channels_first else kernels.layer_norm_with_stats
        w32 = None if weight is None else weight.float()
        b32 = None if bias is None else bias.float()
        out, stats = norm(x, w32, b32, eps)
        ctx.save_for_backward(x, stats, w32)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.channels_first = channels_first
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, stats, w32 = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        kernels = cpu_kernels.kernels()
        grad = grad.to(torch.bfloat16).contiguous()
        if ctx.channels_first:
            b, c, l = grad.shape
            # (B, C, L, 1) channels-last holds (B, L, C) in memory
            grad = kernels.channels_last_bf16(grad.view(b, c, l, 1)).permute(0, 2, 3, 1).view(b, l, c)
        grad_x, grad_w, grad_b = kernels.layer_norm_backward(grad, x, stats, w32, need_x, need_w, need_b)
        grad_w = grad_w.to(ctx.dtypes[0]) if need_w else None
        grad_b = grad_b.to(ctx.dtypes[1]) if need_b else None
        return (grad_x if need_x else None), grad_w, grad_b, None, None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis, through the kernels for bf16 CPU inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16 and x.device.type == 'cpu':
            # PyTorch's fp16 layer norm on the CPU takes its second derivative in fp16, where the terms in
            # 1 / std^3 overflow for rows of small spread (V2's post-norms of the attention branch): the norm
            # in fp32, as CUDA autocast runs it, rounded to fp16 once (PyTorch's fp16 norm, also computed in
            # fp32 inside, agrees to one unit in the last place).
            weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        if not self.takes_kernel(x):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return _LayerNormInKernels.apply(x.contiguous(), self.weight, self.bias, self.eps)
        return cpu_kernels.kernels().layer_norm(x.contiguous(), *self.kernel_args())

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """This norm of ``x: (B, H, W, C)`` (bf16, where :meth:`takes_kernel`) as a contiguous ``(B, C, H, W)``
        map, normalised and transposed in one pass of the kernels (where autograd records, the gradient
        laid out by token in one more)."""
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c).contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            out = _LayerNormInKernels.apply(tokens, self.weight, self.bias, self.eps, True)
        else:
            out = cpu_kernels.kernels().layer_norm_channels_first(tokens, *self.kernel_args())
        return out.view(b, c, h, w)

    def kernel_args(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
        """``(weight, bias, eps)`` as the kernels take them (fp32 affine parameters or ``None``)."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return weight, bias, self.eps

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether this norm of ``x`` runs in the kernels: bf16 on the CPU, not under torch.compile, the
        kernels in use."""
        if x.dtype != torch.bfloat16 or x.device.type != 'cpu' or len(self.normalized_shape) != 1:
            return False
        if recording_graph() or x.shape[-1:] != self.normalized_shape:
            return False
        return cpu_kernels.use_kernels()
