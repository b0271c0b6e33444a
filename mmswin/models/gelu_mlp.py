"""The transformer MLP ``fc2(gelu(fc1(x)))`` as one autograd function that keeps only ``fc1``'s output
for the backward pass and recomputes the GELU there.

Plain autograd keeps both the ``fc1`` output (for the GELU's gradient) and the GELU output (for
``fc2``'s weight gradient): two ``(tokens, 4C)`` tensors per block, the largest activations of a Swin
block. Recomputing the GELU costs one elementwise pass in the backward and saves one of them (about a
fifth of Swin-T's training activations). Forward values are those of the layer-by-layer computation;
gradients are the same products in the same order.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .matmul import bf16_products_in_fp32


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], fp32_products: bool) -> torch.Tensor:
    if fp32_products:
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


def _mm(a: torch.Tensor, b: torch.Tensor, fp32_products: bool) -> torch.Tensor:
    if fp32_products:
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


class _GeluMlp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], approximate: str, fp32_products: bool) -> torch.Tensor:
        h = _linear(x, w1, b1, fp32_products)
        ctx.save_for_backward(x, w1, h, w2)
        ctx.approximate, ctx.fp32_products = approximate, fp32_products
        ctx.has_bias = (b1 is not None, b2 is not None)
        return _linear(F.gelu(h, approximate=approximate), w2, b2, fp32_products)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w1, h, w2 = ctx.saved_tensors
        fp32 = ctx.fp32_products
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        grad_w2 = _mm(grad_out.t(), F.gelu(h2, approximate=ctx.approximate), fp32) if need_w2 else None
        grad_b2 = grad_out.sum(0) if need_b2 and ctx.has_bias[1] else None
        grad_h = torch.ops.aten.gelu_backward(_mm(grad_out, w2, fp32), h2, approximate=ctx.approximate)
        x2 = x.reshape(-1, x.shape[-1])
        grad_w1 = _mm(grad_h.t(), x2, fp32) if need_w1 else None
        grad_b1 = grad_h.sum(0) if need_b1 and ctx.has_bias[0] else None
        grad_x = _mm(grad_h, w1, fp32).view(x.shape) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def gelu_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, approximate: str = 'none') -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x: (..., C_in)`` under the current autocast state, storing only
    ``fc1``'s output for backward."""
    device = x.device.type
    fp32_products = bf16_products_in_fp32(x)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    tensors = [None if t is None else t.to(dtype) for t in (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    with torch.autocast(device, enabled=False):
        return _GeluMlp.apply(*tensors, approximate, fp32_products)
