"""The transformer MLP ``fc2(gelu(fc1(x)))`` as one autograd function that keeps only ``fc1``'s output
for the backward pass and recomputes the GELU there.

Plain autograd keeps both the ``fc1`` output (for the GELU's gradient) and the GELU output (for
``fc2``'s weight gradient): two ``(tokens, 4C)`` tensors per block, the largest activations of a Swin
block. Recomputing the GELU costs one elementwise pass in the backward and saves one of them (about a
fifth of Swin-T's training activations). Both passes run over chunks of tokens, so that the GELU output
and the hidden gradient stay in the CPU's caches and are never allocated whole. Forward values are those
of the layer-by-layer computation; gradients are the same products, the weight gradients summed over the
chunks in fp32.
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
                b2: Optional[torch.Tensor], approximate: str, fp32_products: bool, chunk: int) -> torch.Tensor:
        h = _linear(x, w1, b1, fp32_products)
        ctx.save_for_backward(x, w1, h, w2)
        ctx.approximate, ctx.fp32_products, ctx.chunk = approximate, fp32_products, chunk
        ctx.has_bias = (b1 is not None, b2 is not None)
        rows = h.reshape(-1, h.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk):
            part = _linear(F.gelu(rows[start:start + chunk], approximate=approximate), w2, b2, fp32_products)
            if out is None:
                out = part.new_empty(rows.shape[0], part.shape[-1])
            out[start:start + chunk] = part
        return out.view(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w1, h, w2 = ctx.saved_tensors
        fp32, approximate, chunk = ctx.fp32_products, ctx.approximate, ctx.chunk
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        h2, x2 = h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1])
        # Weight gradients are sums over tokens: accumulated over the chunks in fp32.
        grad_w1 = w1.new_zeros(w1.shape, dtype=torch.float32) if need_w1 else None
        grad_w2 = w2.new_zeros(w2.shape, dtype=torch.float32) if need_w2 else None
        grad_x = x2.new_empty(x2.shape) if need_x else None
        grad_b1 = h2.new_zeros(h2.shape[-1], dtype=torch.float32) if need_b1 and ctx.has_bias[0] else None
        for start in range(0, h2.shape[0], chunk):
            rows = slice(start, start + chunk)
            g_out, h_c = grad_out[rows], h2[rows]
            if grad_w2 is not None:
                grad_w2 += _mm(g_out.t(), F.gelu(h_c, approximate=approximate), fp32)
            grad_h = torch.ops.aten.gelu_backward(_mm(g_out, w2, fp32), h_c, approximate=approximate)
            if grad_w1 is not None:
                grad_w1 += _mm(grad_h.t(), x2[rows], fp32)
            if grad_b1 is not None:
                # The kernel sums bf16/fp16 in fp32 already; dtype=float32 would first copy grad_h whole.
                grad_b1 += grad_h.sum(0)
            if grad_x is not None:
                grad_x[rows] = _mm(grad_h, w1, fp32)
        grad_b2 = grad_out.sum(0) if need_b2 and ctx.has_bias[1] else None
        grads = [None if g is None else g.to(ref.dtype) for g, ref in ((grad_w1, w1), (grad_w2, w2))]
        grad_b1 = None if grad_b1 is None else grad_b1.to(h.dtype)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, grads[0], grad_b1, grads[1], grad_b2, None, None, None


def gelu_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, approximate: str = 'none',
             chunk: int = 4096) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x: (..., C_in)`` under the current autocast state, storing only
    ``fc1``'s output for backward. The GELU output exists only ``chunk`` tokens at a time, in the forward
    and in the backward pass."""
    device = x.device.type
    fp32_products = bf16_products_in_fp32(x)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    tensors = [None if t is None else t.to(dtype) for t in (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    with torch.autocast(device, enabled=False):
        return _GeluMlp.apply(*tensors, approximate, fp32_products, chunk)
