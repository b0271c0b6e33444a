"""Fused window attention for CPU bf16, from mmswin's compiled kernels (``mmswin/csrc``).

One pass per window and head reads its queries, keys and values straight from the qkv projection, computes
``softmax(logits + bias + mask) v`` with the logits, their softmax and the weights kept in the CPU's
registers and L1 cache, and writes the output in the ``(B * nW, N, C)`` layout the output projection
reads. Compared with PyTorch's operators (:func:`mmswin.models.matmul.attention`) there is no split of the
projection into per-head q, k and v, no V2 normalisation pass, no ``(B * nW, nH, N, N)`` logits, no
separate bias, mask and softmax passes and no transpose copy of the output.

The logits stay in fp32 up to the softmax, with the scale (and V2's lengths) applied to them in fp32
where PyTorch's path rounds ``q * scale``, the logits and the bias to bf16: the values agree with that
path to bf16's rounding and are closer to the fp32 attention. Where autograd records, the forward also
keeps each row's log-sum-exp (``N`` fp32 numbers per window and head instead of the ``(N, N)`` weights), and
the backward recomputes the weights from it, window by window, to write the gradients of q, k and v in the
projection's layout and sum those of the position bias and (V2) the logit scales in fp32. Where the
kernels are not used (:mod:`.cpu_kernels`), the attention takes PyTorch's operators.
"""
from typing import Optional, Tuple

import torch
from . import cpu_kernels
from .cpu_kernels import first_order_only
from .graph_capture import recording_graph
from .matmul import autocast_dtype, autocast_off, bias_fused, chunk_linear, linear
from .qkv_projection import ProjectionGrads
from .windows import image_chunks

MAX_TOKENS = 1024  # tokens per window the kernel takes


def applies(x: torch.Tensor, heads: int, dropout_p: float, window_tokens: Optional[int] = None) -> bool:
    """Whether :func:`window_attention` takes the attention of windows ``x: (B * nW, N, C)`` (or of windows of
    ``window_tokens`` tokens whose tokens are ``x: (..., C)``) with ``heads`` heads: products in bf16 on the CPU
    (autocast, or bf16 tensors), no dropout, not under torch.compile, a head width that is a multiple of 16,
    ``N <= MAX_TOKENS``, and the kernels available and not turned off by ``MMSWIN_BF16_MATMUL``; in
    inference and where autograd records alike."""
    if x.device.type != 'cpu' or dropout_p > 0 or recording_graph():
        return False
    n = x.shape[-2] if window_tokens is None else window_tokens
    if autocast_dtype(x) != torch.bfloat16 or (x.shape[-1] // heads) % 16 or n > MAX_TOKENS:
        return False
    return cpu_kernels.use_kernels()


class _WindowAttention(torch.autograd.Function):
    """:func:`window_attention` where autograd records: the forward keeps ``qkv`` and each row's lse,
    the backward recomputes the weights in the kernels."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, mask: Optional[torch.Tensor],
                heads: int, cosine: bool) -> torch.Tensor:
        out, lse = cpu_kernels.kernels().window_attention_with_lse(qkv, heads, bias, mask, scale, cosine)
        ctx.save_for_backward(qkv, lse, bias, scale, mask)
        ctx.heads, ctx.cosine = heads, cosine
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        qkv, lse, bias, scale, mask = ctx.saved_tensors
        need_qkv, need_bias, need_scale = ctx.needs_input_grad[:3]
        grad_qkv, grad_bias, grad_scale = cpu_kernels.kernels().window_attention_backward(
            grad.to(torch.bfloat16).contiguous(), qkv, lse, ctx.heads, bias, mask, scale, ctx.cosine, need_bias,
            need_scale)
        return (grad_qkv if need_qkv else None, grad_bias if need_bias else None,
                grad_scale if need_scale and ctx.cosine else None, None, None, None)


def _bf16_projection(ctx, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor]) -> tuple:
    """The qkv projection's weight and bias in bf16 for the functions here, which return their gradients in
    the parameters' own dtypes (kept in ``ctx``)."""
    ctx.param_dtypes = (weight.dtype, None if qkv_bias is None else qkv_bias.dtype)
    return weight.to(torch.bfloat16), None if qkv_bias is None else qkv_bias.to(torch.bfloat16)


class _ProjectedWindowAttention(torch.autograd.Function):
    """:func:`projected_window_attention` where autograd records: per chunk of windows, the qkv projection
    and the kernels' forward, keeping the chunk's projection and lse; the backward takes the chunks in
    the same order, each one's kernel backward followed by its share of the projection's gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], bias: torch.Tensor,
                scale: torch.Tensor, mask: Optional[torch.Tensor], heads: int, cosine: bool,
                per_chunk: int) -> torch.Tensor:
        w, b = _bf16_projection(ctx, weight, qkv_bias)
        bw, n, c = x.shape
        kernels = cpu_kernels.kernels()
        chunks = list(image_chunks(bw, bw if mask is None else mask.shape[0], per_chunk))
        out = x.new_empty(bw, n, c)
        saved = []
        for rows, mask_rows in chunks:
            qkv = chunk_linear(x[rows], w, b, False)
            part_mask = None if mask is None else mask[mask_rows]
            out[rows], lse = kernels.window_attention_with_lse(qkv, heads, bias, part_mask, scale, cosine)
            saved += [qkv, lse]
        ctx.save_for_backward(x, w, bias, scale, mask, *saved)
        ctx.chunks, ctx.heads, ctx.cosine = chunks, heads, cosine
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w, bias, scale, mask, *saved = ctx.saved_tensors
        need_bias, need_scale = ctx.needs_input_grad[3], ctx.needs_input_grad[4] and ctx.cosine
        grad = grad.to(torch.bfloat16).contiguous()
        kernels = cpu_kernels.kernels()
        sums = ProjectionGrads(x, w, ctx.needs_input_grad[:3], ctx.param_dtypes, False)
        grad_bias = grad_scale = None
        for (rows, mask_rows), qkv, lse in zip(ctx.chunks, saved[0::2], saved[1::2]):
            grad_qkv, part_bias, part_scale = kernels.window_attention_backward(
                grad[rows], qkv, lse, ctx.heads, bias, None if mask is None else mask[mask_rows], scale, ctx.cosine,
                need_bias, need_scale)
            sums.add(rows, grad_qkv.view(-1, grad_qkv.shape[-1]))
            if need_bias:
                grad_bias = part_bias if grad_bias is None else grad_bias.add_(part_bias)
            if need_scale:
                grad_scale = part_scale if grad_scale is None else grad_scale.add_(part_scale)
        return (*sums.result(), grad_bias, grad_scale, None, None, None, None)


def projected_window_attention(x: torch.Tensor, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], heads: int,
                               bias: torch.Tensor, mask: Optional[torch.Tensor], scale: torch.Tensor, cosine: bool,
                               chunk_tokens: int) -> torch.Tensor:
    """:func:`window_attention` of windows ``x: (B * nW, N, C)`` projected by ``weight: (3C, C)`` and
    ``qkv_bias: (3C,)`` (or ``None``).

    Where autograd records, the projection and the attention run over chunks of about ``chunk_tokens``
    tokens (whole windows of one image), each chunk's projection kept for the backward: at the first stage
    of a detection input the whole ``(B * nW, N, 3C)`` projection and its gradient would be the largest
    tensors of the block (36 MiB in bf16 for Swin-T at 800x1216), which the C allocator maps afresh, page
    fault by page fault, on every step. The gradients of the bias and (V2) the scales are summed over the
    chunks in order, those of the projection's weight and bias in fp32.

    Returns:
        ``(B * nW, N, C)`` bf16.
    """
    tensors = [t for t in (x, weight, qkv_bias, bias, scale) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return window_attention(linear(x, weight, qkv_bias), heads, bias, mask, scale, cosine)
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
    per_chunk = max(1, chunk_tokens // x.shape[1])
    with autocast_off('cpu'):
        return _ProjectedWindowAttention.apply(x.to(torch.bfloat16).contiguous(), weight, qkv_bias,
                                               bias.to(torch.float32).contiguous(),
                                               scale.to(torch.float32).contiguous(), mask, heads, cosine, per_chunk)


def window_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Window attention from the qkv projection, heads concatenated, in bf16.

    Args:
        qkv: ``(B * nW, N, 3C)``, the projection's output (q, k, v, each ``nH`` heads of ``d = C / nH``),
            windows of one image contiguous.
        heads: ``nH``.
        bias: ``(nH, N, N)`` position bias.
        mask: ``(nW, N, N)`` additive shift mask (window ``b`` takes ``mask[b % nW]``), or ``None``.
        scale: ``(nH,)`` factor of each head's logits (V2: the clamped exponential of ``logit_scale``, whose
            gradient the backward returns).
        cosine: Logits of the unit vectors of q and k (``max(|x|, 1e-12)`` as in ``F.normalize``) as in
            V2; else of q and k as they are (V1).

    Returns:
        ``(B * nW, N, C)`` bf16: ``softmax(scale * q @ k^T + bias + mask) @ v`` per window and head.
    """
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
    qkv = qkv.to(torch.bfloat16).contiguous()
    bias = bias.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, bias, scale)):
        return _WindowAttention.apply(qkv, bias, scale, mask, heads, cosine)
    return cpu_kernels.kernels().window_attention(qkv, heads, bias, mask, scale, cosine)


def projected_window_attention_rows(x: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor,
                                    qkv_bias: Optional[torch.Tensor], heads: int, bias: torch.Tensor,
                                    mask: Optional[torch.Tensor], scale: torch.Tensor, cosine: bool) -> torch.Tensor:
    """:func:`projected_window_attention` in inference of windows given by their real tokens only.

    Args:
        x: ``(B, R, C)`` bf16, the real tokens of ``nW`` windows of ``N`` tokens in each image.
        slots: ``(nW * N,)`` int64, the row of ``x`` at each window position, -1 where the position pads the
            map. Its token is zero, projected to ``qkv_bias``; its output, which the map would crop, is not
            computed. Each row of ``x`` is named once.
        weight, qkv_bias, heads, bias, mask, scale, cosine: As :func:`projected_window_attention`.

    Returns:
        ``(B, R, C)`` bf16: the outputs of the real tokens, the values of the padded windows' attention.
    """
    qkv = linear(x, weight, qkv_bias).to(torch.bfloat16).contiguous()
    # the projection of a zero token, as the linear layer rounds it
    pad = qkv.new_zeros(qkv.shape[-1]) if qkv_bias is None else qkv_bias.detach().to(torch.bfloat16).contiguous()
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
    return cpu_kernels.kernels().window_attention_rows(qkv, slots, pad, heads, bias.to(torch.float32).contiguous(),
                                                       mask, scale.to(torch.float32).contiguous(), cosine)


class _ProjectedRowsAttention(torch.autograd.Function):
    """:func:`projected_rows_attention` where autograd records: per image and chunk, the qkv projection of
    the chunk's real tokens and the kernels' forward, keeping the projection and lse; the backward takes
    them in the same order, each one's kernel backward followed by its share of the projection's
    gradients, the padding positions' k and v gradients going to the projection's bias. With at least two
    chunks per thread (:func:`.cpu_kernels.threads_share`), the forward and the backward are one call of the
    kernels each, giving each thread whole chunks, to the same values bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], bias: torch.Tensor,
                scale: torch.Tensor, mask: Optional[torch.Tensor], heads: int, cosine: bool,
                chunks: tuple) -> torch.Tensor:
        w, b = _bf16_projection(ctx, weight, qkv_bias)
        pad = w.new_zeros(w.shape[0]) if b is None else b
        kernels = cpu_kernels.kernels()
        if cpu_kernels.threads_share(x.shape[0] * len(chunks)):  # whole chunks per thread, in one call
            out, qkvs, lses = kernels.projected_rows_attention_forward(
                x, w, b, *_chunk_layout(chunks, x.shape[1], mask), pad, heads, bias, scale, cosine,
                b is not None and bias_fused(x, w, b))
            saved = [t for pair in zip(qkvs, lses) for t in pair]
        else:
            out = torch.empty_like(x)
            saved = []
            for image in range(x.shape[0]):
                for places, slots, windows in chunks:
                    qkv = chunk_linear(x[image, places], w, b, False).unsqueeze(0)
                    part_mask = None if mask is None else mask[windows]
                    _, lse = kernels.window_attention_rows_with_lse(qkv, slots, pad, heads, bias, part_mask, scale,
                                                                    cosine, out[image, places].unsqueeze(0))
                    saved += [qkv, lse]
        ctx.save_for_backward(x, w, pad, bias, scale, mask, *saved)
        ctx.chunks, ctx.heads, ctx.cosine = chunks, heads, cosine
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w, pad, bias, scale, mask, *saved = ctx.saved_tensors
        need_bias, need_scale = ctx.needs_input_grad[3], ctx.needs_input_grad[4] and ctx.cosine
        grad = grad.to(torch.bfloat16).contiguous()
        kernels = cpu_kernels.kernels()
        images, tokens, c = x.shape
        if cpu_kernels.threads_share(images * len(ctx.chunks)):  # whole chunks per thread, in one call
            need_x, need_w, need_b = ctx.needs_input_grad[:3]
            grad_x, grad_w, grad_b, grad_bias, grad_scale = kernels.projected_rows_attention_backward(
                grad, x, w, saved[0::2], saved[1::2], *_chunk_layout(ctx.chunks, tokens, mask), pad, ctx.heads, bias,
                scale, ctx.cosine, need_x, need_w, need_b and ctx.param_dtypes[1] is not None, need_bias, need_scale)
            grad_w, grad_b = (None if g is None else g.to(dtype)
                              for g, dtype in zip((grad_w, grad_b), ctx.param_dtypes))
            return grad_x, grad_w, grad_b, grad_bias, grad_scale, None, None, None, None
        # the tokens of all images as the rows of one (B * L, 1, C) input: a chunk's are a slice of them
        sums = ProjectionGrads(x.view(images * tokens, 1, c), w, ctx.needs_input_grad[:3], ctx.param_dtypes, False)
        grad_bias = grad_scale = None
        parts = iter(zip(saved[0::2], saved[1::2]))
        for image in range(images):
            for places, slots, windows in ctx.chunks:
                qkv, lse = next(parts)
                grad_qkv, grad_pad, part_bias, part_scale = kernels.window_attention_rows_backward(
                    grad[image, places].unsqueeze(0), qkv, lse, slots, pad, ctx.heads, bias,
                    None if mask is None else mask[windows], scale, ctx.cosine, need_bias, need_scale)
                sums.add(slice(image * tokens + places.start, image * tokens + places.stop), grad_qkv[0])
                if sums.need_b:  # padding tokens are zero: their q, k and v are the bias
                    sums.grad_b.add_(grad_pad)
                if need_bias:
                    grad_bias = part_bias if grad_bias is None else grad_bias.add_(part_bias)
                if need_scale:
                    grad_scale = part_scale if grad_scale is None else grad_scale.add_(part_scale)
        grad_x, grad_w, grad_b = sums.result()
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, grad_w, grad_b, grad_bias, grad_scale, None, None, None, None


def _chunk_layout(chunks: tuple, tokens: int, mask: Optional[torch.Tensor]) -> tuple:
    """The chunks of a map of ``tokens`` rows as the kernels' passes over them take them: each chunk's first
    row and then ``tokens``, each chunk's slots, and each chunk's rows of ``mask`` (none without one)."""
    return ([places.start for places, _, _ in chunks] + [tokens], [slots for _, slots, _ in chunks],
            [] if mask is None else [mask[windows] for *_, windows in chunks])


def projected_rows_attention(x: torch.Tensor, chunks: tuple, weight: torch.Tensor, qkv_bias: Optional[torch.Tensor],
                             heads: int, bias: torch.Tensor, mask: Optional[torch.Tensor], scale: torch.Tensor,
                             cosine: bool) -> torch.Tensor:
    """:func:`projected_window_attention_rows` of a whole map, chunk by chunk, with autograd or without.

    Args:
        x: ``(B, L, C)``, the map's tokens in window order (:func:`.windows.window_rows`).
        chunks: Per chunk of windows, its places in ``x``'s rows, its ``slots`` and its windows (the rows of
            ``mask``), as :class:`.windows.WindowRows` holds them.
        weight, qkv_bias, heads, bias, mask, scale, cosine: As :func:`projected_window_attention`.

    Returns:
        ``(B, L, C)`` bf16, in ``x``'s order.
    """
    if mask is not None:
        mask = mask.to(torch.float32).contiguous()
    bias = bias.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    tensors = [t for t in (x, weight, qkv_bias, bias, scale) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        with autocast_off('cpu'):
            return _ProjectedRowsAttention.apply(x.to(torch.bfloat16).contiguous(), weight, qkv_bias, bias, scale,
                                                 mask, heads, cosine, chunks)
    out = x.new_empty(x.shape, dtype=torch.bfloat16)
    for places, slots, windows in chunks:
        out[:, places] = projected_window_attention_rows(x[:, places], slots, weight, qkv_bias, heads, bias,
                                                         None if mask is None else mask[windows], scale, cosine)
    return out
