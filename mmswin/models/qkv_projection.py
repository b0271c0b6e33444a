"""The qkv projection of window attention, split into contiguous per-head queries, keys and values.

Where autograd records, the projection runs over chunks of windows, each product written straight into
q, k and v, and the backward gathers their gradients into the projection's layout one chunk at a time.
The whole ``(B_, N, 3C)`` projection and its gradient never exist: at the first stage of a detection
input they are the largest tensors of a block (36 MiB in bf16 for Swin-T at 800x1216), which the C
allocator maps afresh, page fault by page fault, on every step. Values are those of one projection;
the weight and bias gradients are summed over the chunks in fp32 and returned in the parameters' dtype.
"""
from typing import Optional, Sequence, Tuple

import torch

from .chunk_sums import add_chunk
from .layers import needs_grad
from .matmul import autocast_dtype, autocast_off, bf16_products_in_fp32, chunk_linear, chunk_mm, linear

Heads = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _write_heads(qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """``qkv: (B_, N, 3, nH, d)`` into ``q * scale``, ``k`` and ``v``, each ``(B_, nH, N, d)``."""
    parts = qkv.permute(2, 0, 3, 1, 4)
    if scale != 1.0:
        torch.mul(parts[0], scale, out=q)
    else:
        q.copy_(parts[0])
    k.copy_(parts[1])
    v.copy_(parts[2])


def _empty_heads(x: torch.Tensor, heads: int, n: int, head_dim: int, stack_qk: bool) -> tuple:
    """Uninitialised outputs for ``B_ = x.shape[0]`` windows: ``(qk, v)`` with ``qk: (2, B_, nH, N, d)`` if
    ``stack_qk``, else ``(q, k, v)``, each ``(B_, nH, N, d)``."""
    bw = x.shape[0]
    if stack_qk:
        return x.new_empty(2, bw, heads, n, head_dim), x.new_empty(bw, heads, n, head_dim)
    return tuple(x.new_empty(bw, heads, n, head_dim) for _ in range(3))


def _split_heads(outputs: tuple, stack_qk: bool) -> Heads:
    """``(q, k, v)`` of :func:`_empty_heads`' outputs."""
    return (*outputs[0].unbind(0), outputs[1]) if stack_qk else outputs


class _QkvHeads(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int,
                scale: float, fp32_products: bool, chunk: int, stack_qk: bool) -> tuple:
        # The parameters come in their own dtype and are cast here, so that their gradients are returned
        # in that dtype straight from the fp32 sums.
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        w = weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        bw, n, _ = x.shape
        head_dim = w.shape[0] // (3 * heads)
        outputs = _empty_heads(x, heads, n, head_dim, stack_qk)
        q, k, v = _split_heads(outputs, stack_qk)
        for start in range(0, bw, chunk):
            rows = slice(start, min(start + chunk, bw))
            qkv = chunk_linear(x[rows], w, b, fp32_products)
            _write_heads(qkv.view(-1, n, 3, heads, head_dim), q[rows], k[rows], v[rows], scale)
        ctx.save_for_backward(x, w, weight)  # the weight as given too, for a backward with create_graph=True
        ctx.scale, ctx.fp32_products, ctx.chunk, ctx.stack_qk = scale, fp32_products, chunk, stack_qk
        return outputs

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple:
        if ctx.stack_qk:
            grads = (None, None, grads[1]) if grads[0] is None else (*grads[0].unbind(0), grads[1])
        x, w, weight = ctx.saved_tensors
        bw, n, c = x.shape
        like = next(g for g in grads if g is not None)
        heads, head_dim = like.shape[1], like.shape[3]
        if torch.is_grad_enabled():  # create_graph=True
            return (*_differentiable_grads(ctx, grads, x, weight), None, None, None, None, None)
        sums = ProjectionGrads(x, w, ctx.needs_input_grad[:3], ctx.param_dtypes, ctx.fp32_products)
        for start in range(0, bw, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, bw))
            g = like.new_empty(rows.stop - start, n, 3, heads, head_dim)
            parts = g.permute(2, 0, 3, 1, 4)
            for i, grad in enumerate(grads):
                if grad is None:
                    parts[i].zero_()
                elif i == 0 and ctx.scale != 1.0:
                    torch.mul(grad[rows], ctx.scale, out=parts[0])
                else:
                    parts[i].copy_(grad[rows])
            sums.add(rows, g.view(-1, 3 * c))
        return (*sums.result(), None, None, None, None, None)


def _differentiable_grads(ctx, grads: Sequence[Optional[torch.Tensor]], x: torch.Tensor,
                          weight: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``x``, ``weight`` and the bias from those of ``(q, k, v)`` as differentiable functions
    of them, for a backward with ``create_graph=True``: the projection's gradient whole, autograd recording
    every operator."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    like = next(g for g in grads if g is not None)
    grads = [torch.zeros_like(like) if g is None else g for g in grads]
    grads[0] = grads[0] * ctx.scale
    g = torch.stack(grads, 2).transpose(1, 3).reshape(-1, weight.shape[0])  # (B_ * N, 3C): (N, 3, nH, d) rows
    rows = x.reshape(-1, x.shape[-1])
    grad_x = (g @ weight.to(x.dtype)).view(x.shape) if need_x else None
    grad_w = (g.t() @ rows).to(ctx.param_dtypes[0]) if need_w else None
    grad_b = g.sum(0).to(ctx.param_dtypes[1]) if need_b and ctx.param_dtypes[1] is not None else None
    return grad_x, grad_w, grad_b


class ProjectionGrads:
    """The gradients of ``x @ w^T + b`` for ``x: (B_, N, C)`` from the output's gradient, one chunk of rows
    of ``x`` at a time: ``x``'s rows are written, ``w``'s and ``b``'s summed over the chunks in fp32 (fp64
    stays fp64) and returned in the parameters' dtypes.

    Args:
        x: The projection's input ``(B_, N, C)``.
        w: Its weight ``(C_out, C)`` in ``x``'s dtype.
        needs: Whether the gradients of ``x``, ``w`` and ``b`` are wanted.
        param_dtypes: The dtypes of the parameters ``w`` and ``b`` (``None``: no bias).
        fp32_products: Products as :func:`~.matmul.chunk_mm` takes them.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor, needs: Sequence[bool],
                 param_dtypes: Tuple[torch.dtype, Optional[torch.dtype]], fp32_products: bool) -> None:
        self.x, self.w, self.param_dtypes, self.fp32_products = x, w, param_dtypes, fp32_products
        self.need_w = needs[1]
        self.need_b = needs[2] and param_dtypes[1] is not None
        self.grad_x = x.new_empty(x.shape) if needs[0] else None
        self.sums = torch.promote_types(w.dtype, torch.float32)
        self.grad_w = self.grad_b = None

    def add(self, rows: slice, grad: torch.Tensor) -> None:
        """The share of windows ``rows`` of ``x``, whose outputs' gradient is ``grad: (tokens, C_out)``."""
        c = self.x.shape[-1]
        if self.grad_x is not None:
            chunk_mm(grad, self.w, self.fp32_products, out=self.grad_x[rows].view(-1, c))
        if self.need_w:
            self.grad_w = add_chunk(self.grad_w, chunk_mm(grad.t(), self.x[rows].reshape(-1, c), self.fp32_products),
                                    self.sums)
        if self.need_b:
            self.grad_b = add_chunk(self.grad_b, grad.sum(0), self.sums)  # the kernel sums in fp32, rounded per chunk

    def result(self) -> Tuple[Optional[torch.Tensor], ...]:
        """``(grad_x, grad_w, grad_b)``, ``None`` where not wanted."""
        grad_w = None if self.grad_w is None else self.grad_w.to(self.param_dtypes[0])
        grad_b = None if self.grad_b is None else self.grad_b.to(self.param_dtypes[1])
        return self.grad_x, grad_w, grad_b


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int,
              scale: float = 1.0, chunk_tokens: int = 4096, stack_qk: bool = False) -> tuple:
    """``x @ weight^T + bias`` split into ``q * scale``, ``k`` and ``v`` for attention.

    Args:
        x: ``(B_, N, C)`` tokens of ``B_`` windows.
        weight: ``(3C, C)`` projection, rows in the order q, k, v and heads within each.
        bias: ``(3C,)`` or ``None``.
        heads: Heads ``nH``.
        scale: Factor of the queries.
        chunk_tokens: Tokens per chunk (whole windows, at least one) where autograd records.
        stack_qk: Return queries and keys stacked in one tensor (V2 normalises both in one pass).

    Returns:
        Contiguous ``(B_, nH, N, C // nH)`` tensors ``q * scale, k, v``, in the current autocast dtype;
        with ``stack_qk``, ``(qk, v)`` where ``qk: (2, B_, nH, N, C // nH)`` holds ``q * scale`` and ``k``.
    """
    bw, n, _ = x.shape
    params = (weight,) if bias is None else (weight, bias)
    if not needs_grad(x, *params):
        qkv = linear(x, weight, bias)
        outputs = _empty_heads(qkv, heads, n, qkv.shape[-1] // (3 * heads), stack_qk)
        _write_heads(qkv.view(bw, n, 3, heads, -1), *_split_heads(outputs, stack_qk), scale)
        return outputs
    device = x.device.type
    fp32_products = bf16_products_in_fp32(x)
    dtype = autocast_dtype(x)
    with autocast_off(device):
        return _QkvHeads.apply(x.to(dtype), weight, bias, heads, scale, fp32_products,
                               max(1, chunk_tokens // n), stack_qk)
