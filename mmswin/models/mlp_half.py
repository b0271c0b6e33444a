"""A Swin block's MLP half, ``x + fc2(gelu(fc1(norm(x))))`` (V2: ``x + norm(fc2(gelu(fc1(x))))``), as one autograd
function for CPU bf16 training, from mmswin's compiled kernels.

Apart, the norm, the MLP (:func:`.gelu_mlp.gelu_mlp`) and the residual sum each write a ``(tokens, C)`` map that the
next one reads back: the normalised tokens, the branch and the sum, and in the backward the branch's gradient, the
norm's and their sum with the residual's. At the first stage of a detection input those maps are larger than the
CPU's caches, and the passes over them are memory-bound. Here each chunk of tokens, shared out among the threads as
:func:`.gelu_mlp.gelu_mlp` shares them, goes through the norm, the MLP and the residual sum while it stays in the
caches, forward and backward. V1 keeps the norm's means and ``1 / std`` and recomputes the normalised chunk in the
backward instead of keeping it (a ``(tokens, C)`` map less per block); V2 keeps the branch before its norm, as the
norm would.

The values are those of the separate passes bit for bit, but for the sums of the parameters' gradients over the
chunks, which are fp32 sums in another order (and fc2's bias gradient, which is summed in fp32 instead of bf16).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from . import cpu_kernels
from .cpu_kernels import first_order_only
from .graph_capture import recording_graph
from .layer_norm import LayerNorm
from .layers import DropPath, mlp_chunk_elements, plain_calls
from .matmul import autocast_dtype, autocast_off, bf16_products_in_fp32, bias_fused


class _NormGeluMlpResidual(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor], eps: float,
                post_norm: bool, chunk: int) -> torch.Tensor:
        # Parameters come in their own dtypes, their gradients are returned in them from the fp32 sums.
        ctx.param_dtypes = [None if p is None else p.dtype for p in (norm_weight, norm_bias, w1, b1, w2, b2)]
        nw, nb = (None if p is None else p.float().contiguous() for p in (norm_weight, norm_bias))
        w1, b1, w2, b2 = (None if p is None else p.to(torch.bfloat16).contiguous() for p in (w1, b1, w2, b2))
        rows = x.reshape(-1, x.shape[-1])
        fused = b1 is not None and bias_fused(rows, w1, b1)
        y, stats, hidden, branch = cpu_kernels.kernels().norm_gelu_mlp_forward(rows, nw, nb, eps, post_norm, w1, b1, w2,
                                                                               b2, chunk, fused)
        ctx.save_for_backward(rows, stats, nw, nb, w1, w2, *hidden, *branch)
        ctx.eps, ctx.post_norm, ctx.chunks = eps, post_norm, len(hidden)
        return y.view(x.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        rows, stats, nw, nb, w1, w2, *saved = ctx.saved_tensors
        hidden, branch = saved[:ctx.chunks], saved[ctx.chunks:]
        g = grad.reshape(rows.shape).to(torch.bfloat16).contiguous()
        grads = cpu_kernels.kernels().norm_gelu_mlp_backward(g, rows, stats, hidden, branch, nw, nb, ctx.eps,
                                                             ctx.post_norm, w1, w2, *ctx.needs_input_grad[:7])
        grad_x, *params = grads
        params = [None if p is None else p.to(dtype) for p, dtype in zip(params, ctx.param_dtypes)]
        return (None if grad_x is None else grad_x.view(grad.shape), *params, None, None, None)


def applies(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, drop_path: nn.Module) -> bool:
    """Whether :func:`norm_mlp_residual` takes the MLP half of ``x: (..., C)`` with these modules: where autograd
    records, bf16 ``x`` on the CPU with bf16 products (autocast or none) in the kernels, mmswin's layer norm, the
    exact GELU, no dropout, no stochastic depth in effect, not under torch.compile, no hook on the layers
    (:func:`.layers.plain_calls`), and at least two chunks per thread (:func:`.cpu_kernels.threads_share`)."""
    if x.device.type != 'cpu' or x.dtype != torch.bfloat16 or recording_graph():
        return False
    if autocast_dtype(x) != torch.bfloat16 or bf16_products_in_fp32(x) or not cpu_kernels.use_kernels():
        return False
    act = getattr(mlp, 'act', None)
    if not (isinstance(act, nn.GELU) and act.approximate == 'none' and mlp.drop.p == 0):
        return False
    if not isinstance(norm, LayerNorm) or norm.normalized_shape != x.shape[-1:] or plain_calls(norm, mlp):
        return False
    if not isinstance(drop_path, DropPath) or drop_path.training and drop_path.p > 0:
        return False
    params = [p for m in (norm, mlp) for p in m.parameters()]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return False
    return cpu_kernels.threads_share(-(-x.numel() // x.shape[-1] // mlp_chunk(x, mlp)))


def mlp_chunk(x: torch.Tensor, mlp: nn.Module) -> int:
    """Tokens per chunk of the MLP half of ``x``, as :func:`.gelu_mlp.gelu_mlp` takes them."""
    tokens = x.numel() // x.shape[-1]
    return cpu_kernels.shared_chunk(tokens, max(1, mlp_chunk_elements(x) // mlp.fc1.out_features))


def norm_mlp_residual(x: torch.Tensor, norm: LayerNorm, mlp: nn.Module, post_norm: bool) -> torch.Tensor:
    """``x + mlp(norm(x))`` (``post_norm``: ``x + norm(mlp(x))``) of ``x: (..., C)`` in the kernels, where
    :func:`applies`; ``mlp`` has ``fc1``, ``fc2`` (linear layers) and an exact GELU between them."""
    with autocast_off('cpu'):
        return _NormGeluMlpResidual.apply(x.contiguous(), norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias,
                                          mlp.fc2.weight, mlp.fc2.bias, norm.eps, post_norm, mlp_chunk(x, mlp))
