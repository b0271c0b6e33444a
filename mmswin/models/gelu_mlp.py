"""The transformer MLP ``fc2(gelu(fc1(x)))`` as one autograd function that keeps only ``fc1``'s output
for the backward pass and recomputes the GELU there.

Plain autograd keeps both the ``fc1`` output (for the GELU's gradient) and the GELU output (for
``fc2``'s weight gradient): two ``(tokens, 4C)`` tensors per block, the largest activations of a Swin
block. Recomputing the GELU costs one elementwise pass in the backward and saves one of them (about a
fifth of Swin-T's training activations). Both passes run over chunks of tokens, so that the GELU output
and the hidden gradient stay in the CPU's caches and are never allocated whole, and fc1's output is kept
as its chunks. Forward values are those of the layer-by-layer computation; gradients are the same
products, the weight and bias gradients summed over the chunks in fp32 and returned in the parameters'
own dtype (under autocast, fp32 parameters get the fp32 sums, not their bf16 rounding). In CPU bf16, the
backward's GELU, its gradient and the gradient's sum for fc1's bias are one pass of the compiled kernels
(:mod:`.cpu_kernels`) where they are used, instead of three of PyTorch's, to bf16's rounding of the same
values. There, with at least two chunks per thread, the forward and the backward are one call of the
kernels each, sharing whole chunks out among the threads (each product on one thread), and the chunks
are equal and, from four on, their number a multiple of four (whatever the thread count).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .chunk_sums import add_chunk
from .graph_capture import recording_graph
from .matmul import autocast_dtype, autocast_off, bf16_products_in_fp32, bias_fused, chunk_linear, chunk_mm


class _GeluMlp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], approximate: str, fp32_products: bool, chunk: int) -> torch.Tensor:
        # The parameters come in their own dtype and are cast to x's here, so that the backward returns
        # their gradients in that dtype straight from the fp32 sums (no rounding to bf16 and back).
        ctx.param_dtypes = [None if t is None else t.dtype for t in (w1, b1, w2, b2)]
        params = (w1, b1, w2)
        w1, b1, w2, b2 = (None if t is None else t.to(x.dtype) for t in (w1, b1, w2, b2))
        rows = x.reshape(-1, x.shape[-1])
        if _shares_chunks(rows, approximate, fp32_products, chunk):  # whole chunks per thread, in one call
            fused = b1 is not None and bias_fused(rows, w1, b1)
            out, hidden = cpu_kernels.kernels().gelu_mlp_forward(rows.contiguous(), w1, b1, w2, b2, chunk, fused)
        else:
            hidden = []
            out = rows.new_empty(rows.shape[0], w2.shape[0])
            for start in range(0, rows.shape[0], chunk):
                h = chunk_linear(rows[start:start + chunk], w1, b1, fp32_products)
                hidden.append(h)
                chunk_linear(F.gelu(h, approximate=approximate), w2, b2, fp32_products, out=out[start:start + chunk])
        # fc1's output is kept as its chunks: a whole (tokens, hidden) tensor would be mapped afresh by the
        # C allocator (page faults) at the first stage of detection inputs. The parameters as given are kept
        # for a backward with create_graph=True (they are alive anyway).
        ctx.save_for_backward(x, w1, w2, *params, *hidden)
        ctx.approximate, ctx.fp32_products = approximate, fp32_products
        ctx.has_bias = (b1 is not None, b2 is not None)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w1, w2, *saved = ctx.saved_tensors
        params, hidden = saved[:3], saved[3:]  # (w1, b1, w2) as given, fc1's output chunks
        if torch.is_grad_enabled():  # create_graph=True
            return (*_differentiable_grads(ctx, grad_out, x, *params), None, None, None)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_b1 = need_b1 and ctx.has_bias[0]
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        in_kernels = ctx.approximate == 'none' and _gelu_in_kernels(hidden[0].device.type, hidden[0].dtype)
        if in_kernels and not ctx.fp32_products and cpu_kernels.threads_share(len(hidden)):
            grad_x, grad_w1, grad_b1, grad_w2 = cpu_kernels.kernels().gelu_mlp_backward(
                grad_out.contiguous(), x2.contiguous(), hidden, w1, w2, need_x, need_w1, need_b1, need_w2)
        else:
            grad_x, grad_w1, grad_b1, grad_w2 = _chunk_by_chunk(
                ctx, grad_out, x2, hidden, w1, w2, in_kernels, (need_x, need_w1, need_b1, need_w2))
        grad_b2 = _chunk_column_sums(grad_out, hidden) if need_b2 and ctx.has_bias[1] else None
        grads = [None if g is None else g.to(dtype)
                 for g, dtype in zip((grad_w1, grad_b1, grad_w2, grad_b2), ctx.param_dtypes)]
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, *grads, None, None, None


def _chunk_by_chunk(ctx, grad_out: torch.Tensor, x: torch.Tensor, hidden: List[torch.Tensor], w1: torch.Tensor,
                    w2: torch.Tensor, in_kernels: bool, need: Tuple[bool, ...]) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``x: (tokens, C)`` and of fc1's weight and bias and fc2's weight, from ``grad_out:
    (tokens, C)`` and fc1's output kept as the chunks ``hidden``, one chunk after the other; the weight and
    bias gradients are accumulated over the chunks in fp32 (fp64 stays fp64)."""
    need_x, need_w1, need_b1, need_w2 = need
    fp32 = ctx.fp32_products
    sums = torch.promote_types(w1.dtype, torch.float32)
    grad_w1 = grad_w2 = grad_b1 = None
    grad_x = x.new_empty(x.shape) if need_x else None
    start = 0
    for h in hidden:
        rows = slice(start, start + h.shape[0])
        start += h.shape[0]
        g_out = grad_out[rows]
        grad_act = chunk_mm(g_out, w2, fp32)
        if in_kernels:  # the activation, its gradient and their bias sum in one pass
            act, grad_h, grad_h_sum = cpu_kernels.kernels().gelu_backward(grad_act, h, need_b1)
        else:
            act = F.gelu(h, approximate=ctx.approximate) if need_w2 else None
            grad_h = torch.ops.aten.gelu_backward(grad_act, h, approximate=ctx.approximate)
            # The kernel sums bf16/fp16 in fp32 already; dtype=float32 would first copy grad_h whole.
            grad_h_sum = grad_h.sum(0) if need_b1 else None
        if need_w2:
            grad_w2 = add_chunk(grad_w2, chunk_mm(g_out.t(), act, fp32), sums)
        if need_w1:
            grad_w1 = add_chunk(grad_w1, chunk_mm(grad_h.t(), x[rows], fp32), sums)
        if need_b1:
            grad_b1 = add_chunk(grad_b1, grad_h_sum, sums)
        if grad_x is not None:
            chunk_mm(grad_h, w1, fp32, out=grad_x[rows])
    return grad_x, grad_w1, grad_b1, grad_w2


def _chunk_column_sums(grad_out: torch.Tensor, hidden: List[torch.Tensor]) -> torch.Tensor:
    """fc2's bias gradient: the column sums of ``grad_out: (tokens, C)``, one per chunk of fc1's output
    ``hidden`` and added up over the chunks in fp32 (fp64 stays fp64), as fc1's bias gradient is."""
    sums = torch.promote_types(grad_out.dtype, torch.float32)
    total, start = None, 0
    for h in hidden:
        total = add_chunk(total, grad_out[start:start + h.shape[0]].sum(0), sums)
        start += h.shape[0]
    return total


def _differentiable_grads(ctx, grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                          w2: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``x`` and the parameters (as given to the forward) as differentiable functions of
    them, for a backward with ``create_graph=True`` (a Hessian-vector product, a gradient penalty):
    ``fc1``'s output recomputed from ``x`` whole, with autograd recording every operator."""
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    dtype = x.dtype
    w1c, w2c = w1.to(dtype), w2.to(dtype)
    rows, grad_out = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    h = F.linear(rows, w1c, None if b1 is None else b1.to(dtype))
    grad_h = torch.ops.aten.gelu_backward(grad_out @ w2c, h, approximate=ctx.approximate)
    grads = (grad_h @ w1c if need_x else None,
             grad_h.t() @ rows if need_w1 else None,
             grad_h.sum(0) if need_b1 and ctx.has_bias[0] else None,
             grad_out.t() @ F.gelu(h, approximate=ctx.approximate) if need_w2 else None,
             grad_out.sum(0) if need_b2 and ctx.has_bias[1] else None)
    grad_x = None if grads[0] is None else grads[0].view(x.shape)
    return (grad_x, *(None if g is None else g.to(t) for g, t in zip(grads[1:], ctx.param_dtypes)))


def _shares_chunks(rows: torch.Tensor, approximate: str, fp32_products: bool, chunk: int) -> bool:
    """Whether the forward over ``rows: (tokens, C)`` in chunks of ``chunk`` tokens is one call of the kernels
    that gives each thread whole chunks: the exact GELU in the kernels, bf16 products, and at least two
    chunks per thread (:func:`.cpu_kernels.threads_share`)."""
    return (approximate == 'none' and not fp32_products and _gelu_in_kernels(rows.device.type, rows.dtype)
            and cpu_kernels.threads_share(-(-rows.shape[0] // chunk)))


def _gelu_in_kernels(device: str, dtype: torch.dtype) -> bool:
    """Whether the backward takes the compiled kernels' GELU for fc1's output on ``device`` in ``dtype``:
    bf16 on the CPU, not under torch.compile (which traces the backward too), and the kernels in use."""
    return (device == 'cpu' and dtype == torch.bfloat16 and not recording_graph()
            and cpu_kernels.use_kernels())


def gelu_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, approximate: str = 'none',
             chunk_elements: int = 4096 * 384) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x: (..., C_in)`` under the current autocast state, storing only
    ``fc1``'s output for backward. The hidden tensors are computed ``chunk_elements // hidden`` tokens at
    a time (or in equal chunks a little smaller, where the threads share them out), in the forward and in
    the backward pass."""
    chunk = max(1, chunk_elements // fc1.out_features)
    device = x.device.type
    fp32_products = bf16_products_in_fp32(x)
    dtype = autocast_dtype(x)
    if approximate == 'none' and not fp32_products and _gelu_in_kernels(device, dtype):
        chunk = cpu_kernels.shared_chunk(x.numel() // x.shape[-1], chunk)
    with autocast_off(device):
        return _GeluMlp.apply(x.to(dtype), fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate,
                              fp32_products, chunk)
