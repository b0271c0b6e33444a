"""Window attention: V1 (scaled dot product + bias table) and V2 (cosine + continuous position bias).

Both run through ``F.scaled_dot_product_attention`` with the position bias and the shift mask as its
additive ``attn_mask`` where its kernels are the fastest (see ``matmul.attention``), else through the
plain matmul/softmax path, which ``use_sdpa=False`` selects everywhere (the reference). CPU bf16
inference and training take the fused kernels of :mod:`.fused_attention` instead where they are built (not
with ``use_sdpa=False``).

CPU inference processes windows in chunks of about ``layers.CHUNK_TOKENS`` tokens (with the projections on AMX
tiles, at most ``layers.TILE_ATTENTION_CHUNK_TOKENS``), from the qkv projection to the output projection, so
that the intermediates stay in the CPU's caches and below the size that the C allocator maps afresh (page
faults) on every allocation; the values are those of the unchunked path.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, fused_attention, layers
from .graph_capture import recording_graph, transformed
from .layers import needs_grad
from .matmul import attention, autocast_off, linear
from .qkv_projection import qkv_heads
from .windows import Size2, image_chunks, log_spaced_coords_on, relative_position_index, relative_position_index_on

LOGIT_SCALE_MAX = math.log(100.0)
FP16_NORM_EPS = 1e-3
NORM_EPS = 1e-12  # F.normalize's, as in the official model


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias table (V1).

    Args:
        dim: Channels ``C``.
        num_heads: Heads; must divide ``dim``.
        window_size: Window side the bias table is sized for.
        qkv_bias: Learn a bias for q, k and v.
        qk_scale: Logit scale; defaults to ``head_dim ** -0.5``.
        attn_drop: Dropout on attention weights.
        proj_drop: Dropout after the output projection.
        use_sdpa: Use ``F.scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 use_sdpa: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.use_sdpa = use_sdpa
        self._make_qkv(dim, qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._make_position_bias(num_heads, window_size)
        self._bias_cache: Optional[tuple] = None  # (key, layers, parameter values, bias): see attention_bias

    def _make_qkv(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def _make_position_bias(self, num_heads: int, window_size: int) -> None:
        side = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, num_heads))
        self.register_buffer('relative_position_index',
                             relative_position_index((window_size, window_size)), persistent=False)

    def position_bias(self, window: Size2) -> torch.Tensor:
        """Relative position bias ``(nH, N, N)`` for a ``window`` of ``N = wh * ww`` tokens."""
        if window != (self.window_size, self.window_size):
            raise ValueError(f'V1 attention has a bias table for window {self.window_size}, '
                             f'got window {window}')
        n = window[0] * window[1]
        return gather_bias(self.relative_position_bias_table, self.relative_position_index, n)

    def position_bias_parameters(self) -> List[nn.Parameter]:
        """The parameters :meth:`position_bias` is computed from."""
        return [self.relative_position_bias_table]

    def position_bias_layers(self) -> List[nn.Module]:
        """The layers :meth:`position_bias` calls."""
        return []

    def attention_bias(self, window: Size2, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`position_bias` as a contiguous ``(1, nH, N, N)`` in ``dtype`` (adding a permuted view of a
        table lookup to the logits is ten times slower than adding a contiguous one).

        On the CPU, when no gradient is wanted for it (inference, or frozen parameters), it is reused
        while the window, dtype, inference mode, the layers of :meth:`position_bias_layers` and the values
        (and dtypes) of :meth:`position_bias_parameters` stay the same, and no hook sees those layers. The
        values are compared with a copy kept beside the bias (a few thousand numbers), not through version
        counters, which miss writes through ``.data`` such as those of EMA hooks. On other devices it is
        computed on every call (a few kernels): the comparison would make the host wait for the device once
        per block, and a synchronisation breaks CUDA graph capture.
        """
        params = self.position_bias_parameters()
        if recording_graph() or any(p.device.type != 'cpu' for p in params) or (
                torch.is_grad_enabled() and any(p.requires_grad for p in params)) or layers.plain_calls(
                    *self.position_bias_layers()):
            return self.position_bias(window).to(dtype, memory_format=torch.contiguous_format).unsqueeze(0)
        key = (window, dtype, torch.is_inference_mode_enabled())
        modules = [m for layer in self.position_bias_layers() for m in layer.modules()]
        cache = self._bias_cache
        if cache is not None and cache[0] == key and len(modules) == len(cache[1]) and all(
                m is c for m, c in zip(modules, cache[1])) and len(params) == len(cache[2]) and all(
                p.device == c.device and p.dtype == c.dtype and p.shape == c.shape and torch.equal(p, c)
                for p, c in zip(params, cache[2])):
            return cache[3]
        with torch.no_grad():
            bias = self.position_bias(window).to(dtype, memory_format=torch.contiguous_format).unsqueeze(0)
            self._bias_cache = (key, modules, [p.detach().clone() for p in params], bias)
        return bias

    cosine = False  # logits of unit vectors (V2)

    def head_logit_scales(self) -> torch.Tensor:
        """``(nH,)`` fp32: each head's factor of ``q @ k^T`` (of unit vectors in cosine attention)."""
        return torch.full((self.num_heads,), self.scale, device=self.qkv.weight.device)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The ``(3C,)`` bias of the qkv projection, or ``None``."""
        return self.qkv.bias

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B_, N, C)`` to ``(B_, N, 3, nH, head_dim)``: the qkv layer called (hooks see it)."""
        b, n, c = x.shape
        return layers.call_linear(self.qkv, x).view(b, n, 3, self.num_heads, c // self.num_heads)

    def queries_keys_values(self, x: torch.Tensor) -> tuple:
        """``(q, k, v, scale)``, each ``(B_, nH, N, head_dim)``, such that the logits are
        ``scale * q @ k^T``."""
        if torch.compiler.is_compiling() or layers.plain_calls(self.qkv):
            q, k, v = self.project_qkv(x).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v, self.scale
        # q scaled first, as in the official model
        q, k, v = qkv_heads(x, self.qkv.weight, self.qkv_bias(), self.num_heads, self.scale,
                            layers.chunk_tokens(x))
        return q, k, v, 1.0

    def forward(self, x: torch.Tensor, window: Size2,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention over windows, on the CPU in chunks of windows of one image (about
        :data:`~.layers.CHUNK_TOKENS` tokens): in inference written into one output; where autograd records,
        joined with ``torch.cat``, so that the queries, keys, logits and their gradients of a chunk are never
        whole-stage tensors (at detection sizes the C allocator maps those afresh on every step, page by page).

        Args:
            x: ``(B * nW, N, C)`` tokens, windows of one image contiguous.
            window: ``(wh, ww)`` with ``wh * ww == N``.
            mask: ``(nW, N, N)`` additive shift mask, or ``None``.

        Returns:
            ``(B * nW, N, C)``.
        """
        bw, n, _ = x.shape
        per_chunk = max(1, layers.chunk_tokens(x) // n)
        if bw <= per_chunk or torch.compiler.is_compiling() or layers.plain_calls(self):  # (hooks: one call)
            return self.attend(x, window, mask)
        parts = ((rows, self.attend(x[rows], window, None if mask is None else mask[mask_rows]))
                 for rows, mask_rows in image_chunks(bw, bw if mask is None else mask.shape[0], per_chunk))
        if needs_grad(x, *self.parameters()):
            return torch.cat([part for _, part in parts])
        out = None
        for rows, part in parts:
            if out is None:
                out = part.new_empty(bw, n, part.shape[-1])
            out[rows] = part
        return out

    def attend(self, x: torch.Tensor, window: Size2, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` in one piece: ``x: (B * nW, N, C)``, ``mask: (nW, N, N)`` or ``None``."""
        bw, n, c = x.shape
        drop = self.attn_drop if self.training else 0.0
        if self.use_sdpa and not layers.plain_calls(self) and fused_attention.applies(x, self.num_heads, drop):
            bias = self.attention_bias(window, torch.float32)[0]  # (nH, N, N)
            out = fused_attention.projected_window_attention(x, self.qkv.weight, self.qkv_bias(), self.num_heads,
                                                             bias, mask, self.head_logit_scales(), self.cosine,
                                                             layers.chunk_tokens(x))
            return self.proj_drop(layers.call_linear(self.proj, out))
        q, k, v, scale = self.queries_keys_values(x)
        bias = self.attention_bias(window, q.dtype)  # (1, nH, N, N)
        out = attention(q, k, v, bias, mask, drop, scale, self.use_sdpa)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(layers.call_linear(self.proj, out))

    def attends_rows(self, x: torch.Tensor, window: Size2) -> bool:
        """Whether :meth:`attend_rows` takes windows of ``window`` whose tokens are ``x: (..., C)``: where the
        compiled kernels take the attention (:func:`.fused_attention.applies`)."""
        drop = self.attn_drop if self.training else 0.0
        return (self.use_sdpa and not layers.plain_calls(self)
                and fused_attention.applies(x, self.num_heads, drop, window[0] * window[1]))

    def attend_rows(self, x: torch.Tensor, slots: torch.Tensor, window: Size2,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`attend` in inference where :meth:`attends_rows`, for windows given by their real tokens
        ``x: (B, R, C)`` and the row of ``x`` at each of their positions, ``slots: (nW * N,)`` (-1: a position
        that pads the map, a zero token). Only the real tokens are projected, and only their outputs
        computed: ``(B, R, C)``, with the values of :meth:`attend` on the padded windows."""
        bias = self.attention_bias(window, torch.float32)[0]  # (nH, N, N)
        out = fused_attention.projected_window_attention_rows(x, slots, self.qkv.weight, self.qkv_bias(),
                                                              self.num_heads, bias, mask, self.head_logit_scales(),
                                                              self.cosine)
        return self.proj_drop(layers.call_linear(self.proj, out))

    def projects_on_tiles(self) -> bool:
        """Whether the kernels' inference attention (:meth:`rows_kernel_args`) takes the projections on AMX tiles:
        where the CPU has them (:func:`.cpu_kernels.use_amx`) and C is a multiple of 32."""
        return cpu_kernels.use_amx() and self.dim % 32 == 0

    def rows_kernel_args(self, window: Size2) -> tuple:
        """The arguments of the kernels' in-place inference attention (``window_attention_rows_``) from the
        qkv weight on, for windows of ``window``: the projections' weights and biases in bf16, the projection
        of a padding position's zero token, the heads, the ``(nH, N, N)`` bias and the heads' logit scales in
        fp32, whether the attention is cosine, as :meth:`attend_rows` gives them to the kernels. Where the
        projections run on AMX tiles (:meth:`projects_on_tiles`), the weights come packed for them
        (:func:`.cpu_kernels.tile_pairs`), packed once over the inference forwards."""
        bf16 = [None if t is None else t.detach().to(torch.bfloat16).contiguous()
                for t in (self.qkv_bias(), self.proj.bias)]
        weights = (self.qkv.weight, self.proj.weight)
        if self.projects_on_tiles():
            weights = tuple(cpu_kernels.tile_pairs(w) for w in weights)
        else:
            weights = tuple(w.detach().to(torch.bfloat16).contiguous() for w in weights)
        pad = bf16[0] if bf16[0] is not None else self.qkv.weight.new_zeros(3 * self.dim, dtype=torch.bfloat16)
        bias = self.attention_bias(window, torch.float32)[0].contiguous()
        scale = self.head_logit_scales().to(torch.float32).contiguous()
        return weights[0], bf16[0], pad, self.num_heads, bias, scale, self.cosine, weights[1], bf16[1]

    def attend_token_rows(self, x: torch.Tensor, chunks: tuple, window: Size2,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`attend_rows` of a whole map, with autograd or without: ``x: (B, L, C)`` its tokens in window
        order and ``chunks`` as :class:`.windows.WindowRows` holds them; ``(B, L, C)`` in the same order."""
        bias = self.attention_bias(window, torch.float32)[0]  # (nH, N, N)
        out = fused_attention.projected_rows_attention(x, chunks, self.qkv.weight, self.qkv_bias(), self.num_heads,
                                                       bias, mask, self.head_logit_scales(), self.cosine)
        return self.proj_drop(layers.call_linear(self.proj, out))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}'


class PositionBiasMlp(nn.Sequential):
    """V2's continuous position bias MLP (the official ``cpb_mlp``): ``(..., 2)`` offsets to ``(..., nH)`` through
    ``Linear(2, hidden)``, ReLU and ``Linear(hidden, nH)`` without bias, with the official parameter names
    (``0.weight``, ``0.bias``, ``2.weight``)."""

    def __init__(self, num_heads: int, hidden: int = 512) -> None:
        super().__init__(nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads, bias=False))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        for layer in self:
            coords = layer(coords)
        return coords


class CosineWindowAttention(WindowAttention):
    """V2 window attention: cosine similarity times a learned, clamped per-head ``logit_scale``, plus
    ``16 * sigmoid`` of a continuous position bias from a small MLP (``cpb_mlp``) over log-spaced offsets.

    Args:
        dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, use_sdpa: as
            :class:`WindowAttention`. ``qkv_bias`` learns ``q_bias`` and ``v_bias`` (k has none).
        pretrained_window_size: Window of the pre-trained model whose offsets ``cpb_mlp`` learned
            (0: the current window).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_sdpa: bool = True,
                 pretrained_window_size: int = 0) -> None:
        self.pretrained_window_size = pretrained_window_size
        super().__init__(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, use_sdpa=use_sdpa)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))

    def _make_qkv(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None

    def _make_position_bias(self, num_heads: int, window_size: int) -> None:
        self.cpb_mlp = PositionBiasMlp(num_heads)

    def position_bias_parameters(self) -> List[nn.Parameter]:
        return list(self.cpb_mlp.parameters())

    def position_bias_layers(self) -> List[nn.Module]:
        return [self.cpb_mlp]

    def position_bias(self, window: Size2) -> torch.Tensor:
        # the coordinates in the MLP's dtype, as the official model's buffer follows ``model.half()`` (the logit
        # scale's where the MLP has no parameters, as a dynamically quantised one)
        weight = next(self.cpb_mlp.parameters(), self.logit_scale)
        coords = log_spaced_coords_on(*window, self.pretrained_window_size, str(weight.device)).to(weight.dtype)
        index = relative_position_index_on(*window, str(weight.device))
        n = window[0] * window[1]
        # The MLP in the parameters' dtype even under autocast (fp32 for fp32 parameters); its output goes through
        # a sigmoid scaled by 16 (applied to the table before the lookup: the same values, computed once per
        # offset), in fp32 for half-precision parameters and fp64 for fp64 ones.
        with autocast_off(weight.device.type):
            out = self.cpb_mlp(coords)
            table = 16 * torch.sigmoid(out if out.dtype == torch.float64 else out.float())  # ((2wh-1)(2ww-1), nH)
        return gather_bias(table, index, n)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """As the official model: the qkv layer's weight with the bias assembled from ``q_bias`` and ``v_bias``;
        where hooks or a replacement layer see it (:func:`.layers.observed`), the layer called and the bias
        added to its output."""
        b, n, c = x.shape
        bias = self.qkv_bias()
        if layers.observed(self.qkv):
            out = self.qkv(x)
            out = out if bias is None else out + bias.to(out.dtype)
        else:
            out = linear(x, self.qkv.weight, bias)
        return out.view(b, n, 3, self.num_heads, c // self.num_heads)

    def queries_keys_values(self, x: torch.Tensor) -> tuple:
        if torch.compiler.is_compiling() or layers.plain_calls(self.qkv):
            qkv = self.project_qkv(x).permute(2, 0, 3, 1, 4)
            qk, v = qkv[:2], qkv[2]
        else:
            qk, v = qkv_heads(x, self.qkv.weight, self.qkv_bias(), self.num_heads,
                              chunk_tokens=layers.chunk_tokens(x), stack_qk=True)
        # Queries and keys normalised together, (2, B_, nH, N, d): one pass, and one in the backward.
        return (*unit_vectors(qk, self.logit_scales()).unbind(0), v, 1.0)

    cosine = True

    def head_logit_scales(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale.float(), max=LOGIT_SCALE_MAX).exp().view(-1)

    def logit_scales(self) -> torch.Tensor:
        """``(2, 1, nH, 1, 1)``: the clamped learned logit scale of the queries and 1 for the keys (the
        exponential of a zero padded to the log-scale)."""
        log_scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).view(1, 1, -1, 1, 1)
        return F.pad(log_scale, (0, 0, 0, 0, 0, 0, 0, 0, 0, 1)).exp()

    def extra_repr(self) -> str:
        return super().extra_repr() + f', pretrained_window_size={self.pretrained_window_size}'


class _ScaledUnitVectors(torch.autograd.Function):
    """``(y, |x|)`` with ``y = x * scale / max(|x|, eps)``, and a hand-written backward that needs ``y`` and
    ``|x|`` only: ``x`` is not kept (for V2's queries and keys, the largest tensors of its attention), and
    the backward is two passes over ``y`` instead of the five of the composed operators.

    With ``d = max(|x|, eps)``, ``f = scale / d`` and ``c = [|x| >= eps] / (scale * d)``:
    ``dL/dx = f * g - c * (g.y) y`` (the projection of ``g`` onto ``x``, taken out where ``|x|`` is
    not clamped) and ``dL/dscale = sum((g.y) / scale)`` over the axes ``scale`` is broadcast along.
    ``scale`` is positive (V2's is an exponential); where it underflows to zero, ``y`` and the gradient
    that reaches the exponent are zero, and so is what is returned here.

    The backward is made of differentiable operators on ``y``, ``|x|`` and ``scale``, which autograd
    records with their own history under ``create_graph=True``: ``|x|`` is an output for that (its
    gradient, ``x / |x| = y * d / (scale * |x|)``, comes back only in a second derivative), so that
    second derivatives (Hessian-vector products, gradient penalties) are those of the composed operators.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: Optional[torch.Tensor], eps: float) -> tuple:
        norm = vector_lengths(x)
        factor = norm.clamp_min(eps).reciprocal()
        if scale is not None:
            factor = factor * scale
        out = x * factor
        ctx.save_for_backward(out, norm, scale)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return out, norm

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor]) -> tuple:
        out, norm, scale = ctx.saved_tensors
        clamped = norm.clamp_min(ctx.eps)
        coeff = torch.where(norm >= ctx.eps, clamped.reciprocal(), 0.0)
        inv_scale = None
        if scale is not None:
            inv_scale = _reciprocal_or_zero(scale)
            coeff = coeff * inv_scale
        grad_x = grad_scale = None
        if grad is not None:
            factor = clamped.reciprocal() if scale is None else clamped.reciprocal() * scale
            dot = (grad * out).sum(-1, keepdim=True)
            grad_x = (grad * factor).addcmul_(out, dot * coeff, value=-1)
            if scale is not None and ctx.needs_input_grad[1]:
                grad_scale = (dot * inv_scale).sum_to_size(scale.shape)
        if grad_norm is not None:
            direction = clamped * _reciprocal_or_zero(norm)
            if inv_scale is not None:
                direction = direction * inv_scale
            grad_x_norm = out * (direction * grad_norm)
            grad_x = grad_x_norm if grad_x is None else grad_x + grad_x_norm
        return grad_x, grad_scale, None


def _reciprocal_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, else 0, with finite gradients everywhere (a second derivative through a
    ``where`` multiplies the unselected branch's gradient by zero: an infinite one would give NaN)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).reciprocal(), 0.0)


def gather_bias(table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(nH, N, N)`` bias of ``N = n`` tokens from a ``(offsets, nH)`` table and the ``(N, N)`` offset
    ``index``, gathered straight into that layout (contiguous; no copy of a permuted lookup)."""
    return table.t()[:, index.view(-1)].view(-1, n, n)


def vector_lengths(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` over the last axis, keeping it; in fp32 for fp16 input (whose squares overflow)."""
    if x.dtype == torch.float16:
        return torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def unit_vectors(x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale * x / max(|x|, eps)`` over the last axis: F.normalize's eps, times ``scale``.

    In fp16, ``|x|^2`` overflows beyond 256, so the norm and the product are taken in fp32 (bf16 has
    fp32's range). The zero keys of padding tokens would get a gradient of ``1 / eps``, so there eps is
    one fp16 can carry (only vectors shorter than that, i.e. padding, are affected).
    """
    if x.dtype == torch.float16:
        return _scaled_unit_vectors(x.float(), scale, FP16_NORM_EPS).to(x.dtype)
    return _scaled_unit_vectors(x, None if scale is None else scale.to(x.dtype), NORM_EPS)


def _scaled_unit_vectors(x: torch.Tensor, scale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """:class:`_ScaledUnitVectors`' first output; its forward in PyTorch's operators under function transforms,
    which take no autograd function without their own rules."""
    if transformed():
        factor = vector_lengths(x).clamp_min(eps).reciprocal()
        return x * (factor if scale is None else factor * scale)
    return _ScaledUnitVectors.apply(x, scale, eps)[0]


def validate_heads(dims: Sequence[int], num_heads: Sequence[int]) -> None:
    """Raises ``ValueError`` when a stage's heads do not divide its width."""
    for i, (d, h) in enumerate(zip(dims, num_heads)):
        if h <= 0 or d % h:
            raise ValueError(f'num_heads[{i}]={h} must be positive and divide the stage width {d}')
