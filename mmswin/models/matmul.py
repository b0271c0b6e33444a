"""Matrix products (linear layers, attention, the patch convolution) of the backbones, fast under CPU
bf16 autocast on every x86 CPU.

x86 CPUs without bf16 dot-product instructions (AVX512-BF16 or AMX) run PyTorch's bf16 GEMMs tens to
hundreds of times slower than fp32 ones (measured on an AVX2 EPYC: 0.3-3 GFLOP/s bf16 against
60-160 GFLOP/s fp32). On those CPUs the products here take bf16-rounded inputs, multiply them with the
fp32 kernels and round the result to bf16. A product of two bf16 numbers is exact in fp32, so this is
the arithmetic of a bf16 GEMM with fp32 accumulation, at fp32 speed; activations stay bf16 between
layers as autocast would leave them. CPUs with bf16 instructions, CUDA and other precisions use
PyTorch's kernels unchanged.

CPUs with bf16 instructions run linear layers in bf16 inference through oneDNN's linear with the bias
(and the MLP's GELU) applied to the fp32 accumulator before rounding: no separate pass to broadcast the
bias into the output or to apply the GELU, one rounding instead of two. The training passes' own
forward products with a bias (:func:`chunk_linear`) take the same op, to the same values as ``addmm``.

``MMSWIN_BF16_MATMUL=native`` uses PyTorch's kernels as they are, ``=fp32`` forces the substitution and
``=onednn`` the fused linear (for tests).
"""
import contextlib
import os
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .graph_capture import recording_graph, transformed


@lru_cache(maxsize=1)
def _cpu_capability_has_bf16() -> bool:
    caps = torch._C._cpu._get_cpu_capability()
    if caps.get('architecture') not in ('x86_64', 'x86', 'i386', 'AMD64'):
        return True
    return bool(caps.get('avx512_bf16') or caps.get('amx_bf16'))


@torch.compiler.assume_constant_result  # a constant to torch.compile (the capability query is opaque)
def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 natively (assumed for every CPU but x86 without
    AVX512-BF16/AMX-BF16)."""
    return _cpu_capability_has_bf16()


@torch.compiler.assume_constant_result  # read when a graph is traced, not on each call of it
def bf16_matmul_setting() -> str:
    """The validated value of ``MMSWIN_BF16_MATMUL`` (default ``'auto'``)."""
    mode = os.environ.get('MMSWIN_BF16_MATMUL', 'auto')
    if mode not in ('auto', 'native', 'fp32', 'onednn'):
        raise ValueError(f"MMSWIN_BF16_MATMUL must be 'auto', 'native', 'fp32' or 'onednn', got {mode!r}")
    return mode


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives products of ``x`` on its device: the autocast dtype where autocast is on,
    else ``x.dtype`` (also on devices without autocast, such as ``meta``)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on ``device_type`` (nothing to disable on devices without it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _bf16_matmul_mode(x: torch.Tensor) -> Optional[str]:
    """``MMSWIN_BF16_MATMUL`` under CPU bf16 autocast (``None`` elsewhere)."""
    if x.device.type != 'cpu' or not torch.is_autocast_enabled('cpu'):
        return None
    if torch.get_autocast_dtype('cpu') != torch.bfloat16:
        return None
    return bf16_matmul_setting()


def bf16_products_in_fp32(x: torch.Tensor) -> bool:
    """Whether products with ``x`` should take the fp32 kernels (CPU bf16 autocast, no bf16 hardware)."""
    mode = _bf16_matmul_mode(x)
    return mode == 'fp32' or (mode == 'auto' and not cpu_has_bf16_arithmetic())


@lru_cache(maxsize=1)
def _onednn_has_fused_linear() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_fused_linear(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear` on ``x`` takes oneDNN's fused bf16 linear: CPU bf16 autocast on bf16
    hardware, nothing recorded for autograd (the fused op has no backward), not under torch.compile."""
    mode = _bf16_matmul_mode(x)
    if mode not in ('auto', 'onednn') or (mode == 'auto' and not cpu_has_bf16_arithmetic()):
        return False
    if recording_graph() or not _onednn_has_fused_linear():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + params))


def _bf16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, held in fp32."""
    return t.to(torch.bfloat16).float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           gelu: Optional[str] = None) -> torch.Tensor:
    """``F.linear``, then ``F.gelu(approximate=gelu)`` unless ``gelu`` is ``None``. Under CPU bf16 autocast
    without bf16 hardware, a bf16 GEMM done in fp32; with it, in inference, oneDNN's linear with bias and
    GELU fused (:func:`onednn_fused_linear`)."""
    if onednn_fused_linear(x, weight, bias):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        b = None if bias is None else bias.to(torch.bfloat16)
        attr, algorithm = ('none', '') if gelu is None else ('gelu', gelu)
        out = torch.ops.mkldnn._linear_pointwise(rows, weight.to(torch.bfloat16), b, attr, [], algorithm)
        return out.view(*x.shape[:-1], out.shape[-1])
    if not bf16_products_in_fp32(x):
        out = F.linear(x, weight, bias)
    else:
        with torch.autocast('cpu', enabled=False):
            b = None if bias is None else _bf16_values(bias)
            out = F.linear(_bf16_values(x), _bf16_values(weight), b).to(torch.bfloat16)
    if gelu is None:
        return out
    if torch.is_grad_enabled() and out.requires_grad:
        return F.gelu(out, approximate=gelu)
    return torch.ops.aten.gelu_(out, approximate=gelu)  # in place: no second (..., hidden) tensor


def bias_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`chunk_linear` of these bf16 CPU tensors takes oneDNN's linear with the bias applied to
    the fp32 accumulator (``addmm`` first copies the bias into every row of the output, then adds the
    product to it; the values are the same): bf16 hardware, ``MMSWIN_BF16_MATMUL`` ``auto`` or ``onednn``,
    nothing recorded for autograd, not under torch.compile."""
    if x.device.type != 'cpu' or not x.dtype == weight.dtype == bias.dtype == torch.bfloat16:
        return False
    mode = bf16_matmul_setting()
    if mode not in ('auto', 'onednn') or (mode == 'auto' and not cpu_has_bf16_arithmetic()):
        return False
    if recording_graph() or not _onednn_has_fused_linear():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)))


def chunk_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fp32_products: bool,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` of 2-D tensors of one dtype, as the hand-written backward passes use it: with
    ``fp32_products``, the fp32 product of the (bf16) values rounded back to their dtype. With ``out``
    (contiguous, e.g. a chunk of rows of a larger result), the product is written there and returned,
    with no copy from a fresh tensor. A bf16 product with a bias on the CPU takes oneDNN's linear with the
    bias fused (:func:`bias_fused`) where it applies."""
    if fp32_products:
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        return y if out is None else out.copy_(y)
    if out is None:
        if bias is not None and bias_fused(x, weight, bias):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def chunk_mm(a: torch.Tensor, b: torch.Tensor, fp32_products: bool,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` of 2-D tensors as :func:`chunk_linear` takes it, into ``out`` where given."""
    if fp32_products:
        y = (a.float() @ b.float()).to(a.dtype)
        return y if out is None else out.copy_(y)
    return a @ b if out is None else torch.mm(a, b, out=out)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, like :func:`linear`, takes the fp32 kernels for bf16 values on CPUs without
    bf16 instructions (PyTorch's bf16 convolution falls back to a slow path there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bf16_products_in_fp32(x):
            return super().forward(x)
        with torch.autocast('cpu', enabled=False):
            b = None if self.bias is None else _bf16_values(self.bias)
            out = self._conv_forward(_bf16_values(x), _bf16_values(self.weight), b)
        return out.to(torch.bfloat16)


# Elements per piece of the reduced-precision CPU softmax (2 MiB in fp32: a piece stays in the caches).
SOFTMAX_CHUNK_ELEMENTS = 1 << 19


def _softmax_in_pieces(x: torch.Tensor) -> torch.Tensor:
    """The fp32 softmax over the last axis of ``x``, rounded to ``x``'s dtype, :data:`SOFTMAX_CHUNK_ELEMENTS`
    logits at a time (no fp32 copy of ``x``)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    step = max(1, SOFTMAX_CHUNK_ELEMENTS // rows.shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = torch.softmax(rows[start:start + step], -1, dtype=torch.float32)
    return out.view(x.shape)


class _SoftmaxInPieces(torch.autograd.Function):
    """:func:`_softmax_in_pieces` with the backward of PyTorch's softmax, from the output it saves (itself
    differentiable: a backward with ``create_graph=True`` gets second derivatives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = _softmax_in_pieces(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out, = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, -1, out.dtype)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``. In bf16/fp16 on the CPU, the fp32 softmax of pieces of ``x`` rounded to its dtype:
    PyTorch's reduced-precision CPU softmax spends most of its time in a row maximum that runs about 3x
    slower than the fp32 one (49-wide rows). Values agree to one unit in the last place; where autograd
    records, the gradient is that of PyTorch's softmax backward from these values."""
    if x.device.type != 'cpu' or x.dtype not in (torch.bfloat16, torch.float16) or recording_graph():
        return x.softmax(-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SoftmaxInPieces.apply(x)
    return _softmax_in_pieces(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              mask: Optional[torch.Tensor], dropout_p: float, scale: float, use_sdpa: bool = True) -> torch.Tensor:
    """Window attention ``softmax(scale * q @ k^T + bias + mask) @ v``, dropout on the weights.

    Args:
        q, k, v: ``(B * nW, nH, N, d)``, windows of one image contiguous.
        bias: ``(1, nH, N, N)`` position bias.
        mask: ``(nW, N, N)`` additive shift mask, or ``None``.
        dropout_p: Dropout on the attention weights.
        scale: Logit scale.
        use_sdpa: Use ``F.scaled_dot_product_attention`` where it is the fastest: everywhere but on the
            CPU where autograd records (SDPA's only kernel for an additive mask with gradients is its
            math fallback) or in bf16 or fp16 (its fused kernel is slower there than two batched matmuls
            and a softmax over 49-token windows). Elsewhere, and without it, matmul, softmax, matmul.

    Returns:
        ``(B * nW, nH, N, d)``. Under CPU bf16 autocast without bf16 hardware, computed in fp32 from the
        bf16 inputs and rounded to bf16.
    """
    if bf16_products_in_fp32(q):
        with torch.autocast('cpu', enabled=False):
            out = attention(q.float(), k.float(), v.float(), bias.float(), mask, dropout_p, scale, use_sdpa)
        return out.to(torch.bfloat16)
    bw, heads, n, _ = q.shape
    nw = bw if mask is None else mask.shape[0]
    # (not under TorchScript tracing: FLOP counters read matmuls, and know no SDPA; nor under function
    # transforms: SDPA's kernels have no forward-mode AD)
    fused = use_sdpa and not (torch.jit.is_tracing() or transformed()) and (q.device.type != 'cpu' or q.dtype == torch.float32 and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))))
    if fused:
        # 4-D: the fused CPU kernel takes a 4-D mask only (a 3-D one falls back to the math kernel).
        if mask is not None:
            bias = bias + mask.to(q.dtype).unsqueeze(1)  # (nW, nH, N, N)
            if bw > nw:
                # Several images: windows x heads become the head axis, so that the mask broadcasts over
                # images and the inputs stay 4-D (what the fused SDPA kernels take).
                q, k, v = (t.reshape(bw // nw, nw * heads, n, -1) for t in (q, k, v))
                bias = bias.reshape(1, nw * heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        return out.reshape(bw, heads, n, -1)  # (a CUDA kernel's output may be laid out (B, N, H, d))
    # The bias and the mask are added in place, each broadcast: no (B * nW, nH, N, N) tensor but the logits.
    # The product is taken in the (B, nW, nH, N, N) shape the mask broadcasts over: an in-place add on a
    # view of it would make autograd copy the whole logit gradient in the backward.
    if scale != 1.0:
        q = q * scale
    shape = (bw // nw, nw, heads, n, -1)
    logits = q.view(shape) @ k.view(shape).transpose(-2, -1)
    logits.add_(bias)
    if mask is not None:
        logits.add_(mask.to(q.dtype).unsqueeze(1))
    weights = F.dropout(softmax(logits), p=dropout_p, training=dropout_p > 0)
    return (weights @ v.view(shape)).view(bw, heads, n, -1)
