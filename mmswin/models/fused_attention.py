"""Fused window attention for CPU bf16 inference, from mmswin's compiled kernels (``mmswin/csrc``).

One pass per window and head reads its queries, keys and values straight from the qkv projection, computes
``softmax(logits + bias + mask) v`` with the logits, their softmax and the weights kept in the CPU's
registers and L1 cache, and writes the output in the ``(B * nW, N, C)`` layout the output projection
reads. Compared with PyTorch's operators (:func:`mmswin.models.matmul.attention`) there is no split of the
projection into per-head q, k and v, no V2 normalisation pass, no ``(B * nW, nH, N, N)`` logits, no
separate bias, mask and softmax passes and no transpose copy of the output.

The logits stay in fp32 up to the softmax, with the scale (and V2's lengths) applied to them in fp32
where PyTorch's path rounds ``q * scale``, the logits and the bias to bf16: the values agree with that
path to bf16's rounding and are closer to the fp32 attention. Where the kernels are not used
(:mod:`.cpu_kernels`), the attention takes PyTorch's operators.
"""
from typing import Iterable, Optional

import torch

from . import cpu_kernels
from .matmul import autocast_dtype

MAX_TOKENS = 1024  # tokens per window the kernel takes


def applies(x: torch.Tensor, heads: int, dropout_p: float, params: Iterable[torch.Tensor]) -> bool:
    """Whether :func:`window_attention` takes the attention of windows ``x: (B * nW, N, C)`` with ``heads``
    heads and parameters ``params``: products in bf16 on the CPU (autocast, or bf16 tensors), no
    dropout, nothing recorded for autograd, not under torch.compile, a head width that is a multiple of
    16, ``N <= MAX_TOKENS``, and the kernels available and not turned off by ``MMSWIN_BF16_MATMUL``."""
    if x.device.type != 'cpu' or dropout_p > 0 or torch.compiler.is_compiling():
        return False
    if autocast_dtype(x) != torch.bfloat16 or (x.shape[-1] // heads) % 16 or x.shape[-2] > MAX_TOKENS:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return cpu_kernels.use_kernels()


def window_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Window attention from the qkv projection, heads concatenated, in bf16.

    Args:
        qkv: ``(B * nW, N, 3C)``, the projection's output (q, k, v, each ``nH`` heads of ``d = C / nH``),
            windows of one image contiguous.
        heads: ``nH``.
        bias: ``(nH, N, N)`` position bias.
        mask: ``(nW, N, N)`` additive shift mask (window ``b`` takes ``mask[b % nW]``), or ``None``.
        scale: ``(nH,)`` factor of each head's logits.
        cosine: Logits of the unit vectors of q and k (``max(|x|, 1e-12)`` as in ``F.normalize``) as in
            V2; else of q and k as they are (V1).

    Returns:
        ``(B * nW, N, C)`` bf16: ``softmax(scale * q @ k^T + bias + mask) @ v`` per window and head.
    """
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
    return cpu_kernels.kernels().window_attention(qkv.to(torch.bfloat16).contiguous(), heads,
                                       bias.to(torch.float32).contiguous(), mask,
                                       scale.to(torch.float32).contiguous(), cosine)
