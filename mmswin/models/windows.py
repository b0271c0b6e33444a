"""Window geometry shared by both versions: padding, partition/reverse, shift masks, position indices.

Feature maps are channels-last, ``(B, H, W, C)``. A window is a ``(wh, ww)`` pair so that V2 can shrink
it to a feature map smaller than the configured window, as the official V2 code does.
"""
import functools
import math
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .graph_capture import recording_graph, transformed

Size2 = Tuple[int, int]

# Value the official code adds to logits of token pairs that belong to different regions of a shifted
# window. It is not -inf: a padded row may see only foreign tokens and must still give finite values.
SHIFT_MASK_VALUE = -100.0


def geometry_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache`` for the index and mask tensors built here from sizes, built outside inference
    mode: a cache first filled under ``torch.inference_mode()`` holds plain tensors, which autograd can save
    when the same sizes come back in training (it refuses inference tensors). While a graph is recorded
    (:func:`.recording_graph`: torch.export's fake tensors, tracing), the tensors are built afresh and not kept.
    The cache's ``cache_info`` and ``cache_clear`` are those of the returned function."""
    def decorate(build: Callable) -> Callable:
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        @functools.wraps(build)
        def lookup(*args, **kwargs):
            if recording_graph():
                return build(*args, **kwargs)
            return cached(*args, **kwargs)
        lookup.cache_info, lookup.cache_clear = cached.cache_info, cached.cache_clear
        return lookup
    return decorate


def pad_to_windows(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """Zero-pads ``x: (B, H, W, C)`` at the bottom/right to multiples of ``window``."""
    _, h, w, _ = x.shape
    pad_h = -h % window[0]
    pad_w = -w % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """Splits ``x: (B, Hp, Wp, C)`` into windows ``(B * nW, wh * ww, C)``, row-major over windows."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Size2, hw: Size2) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wh * ww, C)`` to ``(B, Hp, Wp, C)``."""
    (wh, ww), (h, w) = window, hw
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@geometry_cache(maxsize=64)
def _window_gather_cpu(hw: Size2, window: Size2,
                       shift: Size2) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    (h, w), (wh, ww), (sh, sw) = hw, window, shift
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    # Position (i, j) of the padded map rolled by -shift holds padded pixel (i + sh, j + sw) mod size.
    rows = (torch.arange(hp) + sh) % hp
    cols = (torch.arange(wp) + sw) % wp
    real = (rows[:, None] < h) & (cols[None, :] < w)
    source = torch.where(real, rows[:, None] * w + cols[None, :], -1)  # -1: padding
    gather = window_partition(source[None, :, :, None], window).reshape(-1)
    padding = (gather < 0).nonzero().view(-1)
    # Inverse: real pixel (r, c) sits at (i, j) = (r - sh, c - sw) mod size of the rolled map, whose
    # window-major order is (window row, window col, row in window, col in window).
    i = (torch.arange(h) - sh) % hp
    j = (torch.arange(w) - sw) % wp
    window_id = (i[:, None] // wh) * (wp // ww) + j[None, :] // ww
    scatter = window_id * (wh * ww) + (i[:, None] % wh) * ww + j[None, :] % ww
    return gather.clamp(min=0), scatter.reshape(-1), padding if padding.numel() else None


def window_indices(hw: Size2, window: Size2, shift: Size2,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Indices that do padding, cyclic shift and window partition (and their inverse) in one gather.

    Args:
        hw: Feature size ``(H, W)``.
        window: Window size ``(wh, ww)``.
        shift: Cyclic shift ``(sh, sw)`` applied after zero padding to whole windows, as the official
            code does.
        device: Where the indices are wanted.

    Returns:
        ``(gather, scatter, padding)``: tokens ``x.view(B, H * W, C)`` give the windows
        ``(B, nW * N, C)`` through ``gather``, with zeros at the window positions ``padding`` (``None``
        where nothing pads; ``gather`` points those at any real token); window outputs ``(B, nW * N, C)``
        give back ``(B, H * W, C)`` through ``scatter``. Cached per size, and constants to
        ``torch.compile``.
    """
    args = (*hw, *window, *shift, str(device))
    return _gather_index(*args), _scatter_index(*args), _padding_index(*args)


class WindowChunk(NamedTuple):
    """The token rows of ``M`` window positions (a chunk of whole windows) of ``x.view(B, H * W, C)``."""

    index: torch.Tensor  # (M,) each position's row (a position that pads the map: any real row)
    padding: Optional[torch.Tensor]  # the positions that pad the map, or None where none does
    rows: torch.Tensor  # index with -1 at the padding positions
    real: torch.Tensor  # (R,) the rows of the real positions, in window order
    slots: torch.Tensor  # (M,) each position's place in ``real``, -1 at the padding positions
    windows: slice  # the chunk's windows (the rows of the shift mask they take)


def window_chunks(hw: Size2, window: Size2, shift: Size2, windows_per_chunk: int, device: torch.device,
                  balance: bool = False) -> Tuple[WindowChunk, ...]:
    """The gather of :func:`window_indices` in chunks of ``windows_per_chunk`` windows, for maps read and
    updated in place (:class:`WindowChunk`: the forms of PyTorch's gathers and of the compiled kernels).
    With ``balance``, as many chunks, each of about the same number of real tokens (:func:`balanced_bounds`)
    instead of windows. Cached per size."""
    return _window_chunks(*hw, *window, *shift, windows_per_chunk, balance, str(device))


def balanced_bounds(real: torch.Tensor, chunks: int) -> Tuple[int, ...]:
    """The first window of each of ``chunks`` chunks of consecutive windows, and the number of windows, for
    about the same sum of ``real: (nW,)`` (each window's real tokens) in each chunk: each bound where the
    running sum comes nearest to its share, every chunk at least one window.

    The chunks of the map's last row (and column) of windows hold fewer real tokens where padding fills them,
    and the passes over a chunk's real tokens take time in proportion to their number: with as many windows
    per chunk, the thread that runs the last chunk finishes first and waits."""
    total, windows = real.cumsum(0), real.numel()
    bounds = [0]
    for k in range(1, chunks):
        nearest = int((total - total[-1] * k / chunks).abs().argmin()) + 1
        bounds.append(min(max(nearest, bounds[-1] + 1), windows - (chunks - k)))
    return (*bounds, windows)


class WindowRows(NamedTuple):
    """A map's tokens in window order, for attention of the real tokens only (:func:`window_rows`)."""

    order: torch.Tensor  # (L,) the map's token rows in window order: each once, padding left out
    inverse: torch.Tensor  # (L,) each token's place in ``order``
    chunks: Tuple[Tuple[slice, torch.Tensor, slice], ...]  # per chunk: its places in order, slots, windows


def window_rows(hw: Size2, window: Size2, shift: Size2, windows_per_chunk: int, device: torch.device) -> WindowRows:
    """The tokens of :func:`window_chunks` as one permutation of the map's ``H * W`` tokens, with each chunk's
    places in it, its ``slots`` (relative to the chunk) and its windows (the rows of the shift mask). Cached
    per size."""
    return _window_rows(*hw, *window, *shift, windows_per_chunk, str(device))


@geometry_cache(maxsize=64)
def _window_rows(h: int, w: int, wh: int, ww: int, sh: int, sw: int, per_chunk: int, device: str) -> WindowRows:
    chunks, start = [], 0
    parts = _window_chunks(h, w, wh, ww, sh, sw, per_chunk, False, 'cpu')
    for part in parts:
        places = slice(start, start + part.real.numel())
        start = places.stop
        chunks.append((places, part.slots.to(device), part.windows))
    order = torch.cat([part.real for part in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return WindowRows(order.to(device), inverse.to(device), tuple(chunks))


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of tokens ``x: (B, L, C)`` for a permutation ``index`` of the ``L`` rows whose inverse is
    ``inverse`` (its gradient is the inverse permutation of the output's)."""
    return _shuffle(x, index, inverse, None, None)


def image_chunks(num_windows: int, mask_windows: int, per_chunk: int) -> Iterator[Tuple[slice, slice]]:
    """Chunks of at most ``per_chunk`` of ``num_windows`` windows (the windows of each image contiguous,
    ``mask_windows`` per image) that stay inside one image: per chunk, its windows and the rows of the
    ``(mask_windows, N, N)`` shift mask they take."""
    for first in range(0, num_windows, mask_windows):
        for start in range(0, mask_windows, per_chunk):
            stop = min(start + per_chunk, mask_windows)
            yield slice(first + start, first + stop), slice(start, stop)


@geometry_cache(maxsize=64)
def _window_chunks(h: int, w: int, wh: int, ww: int, sh: int, sw: int, per_chunk: int, balance: bool,
                   device: str) -> Tuple[WindowChunk, ...]:
    gather, _, padding = _window_gather_cpu((h, w), (wh, ww), (sh, sw))
    n = wh * ww
    is_padding = torch.zeros(gather.shape, dtype=torch.bool)
    if padding is not None:
        is_padding[padding] = True
    windows = gather.numel() // n
    if balance:
        bounds = balanced_bounds((~is_padding).view(windows, n).sum(1), -(-windows // per_chunk))
    else:
        bounds = (*range(0, windows, per_chunk), windows)
    chunks = []
    for first, last in zip(bounds, bounds[1:]):
        index, pads = gather[first * n:last * n], is_padding[first * n:last * n]
        positions = pads.nonzero().view(-1)
        rows = index.masked_fill(pads, -1)
        slots = (~pads).long().cumsum(0).sub_(1).masked_fill_(pads, -1)
        chunks.append(WindowChunk(index.to(device), positions.to(device) if positions.numel() else None,
                                  rows.to(device), index[~pads].to(device), slots.to(device), slice(first, last)))
    return tuple(chunks)


def select_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` for tokens ``x: (B, L, C)``: ``(B, M, C)`` for ``M`` indices.

    On the CPU the rows of each image are gathered from a 2-D ``(L, C)`` view, which PyTorch copies row
    by row on both threads; along dim 1 of the 3-D tensor the same gather runs about three times slower.
    """
    if x.device.type != 'cpu' or torch.compiler.is_compiling():
        return x.index_select(1, index)
    if x.shape[0] == 1:
        return x[0].index_select(0, index).unsqueeze(0)
    out = x.new_empty(x.shape[0], index.numel(), x.shape[2])
    for image, rows in zip(x, out):
        torch.index_select(image, 0, index, out=rows)
    return out


def add_tokens_(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x.index_add_(1, index, src)`` for ``x: (B, L, C)`` and ``src: (B, M, C)``, in place.

    On the CPU each image is summed along dim 0 of its 2-D ``(L, C)`` view, which PyTorch runs as a
    scatter-add over the channels on both threads (repeated indices still added in their order, one
    thread per channel); along dim 1 it adds one ``C``-slice at a time on one thread, about three times
    slower. The sums are the same, element by element.
    """
    if x.device.type != 'cpu' or torch.compiler.is_compiling():
        return x.index_add_(1, index, src)
    for image, rows in zip(x, src):
        image.index_add_(0, index, rows)
    return x


class _Shuffle(torch.autograd.Function):
    """Rows ``index`` of ``x: (B, L, C)``, zero at the positions ``zeros`` (or ``None``). The window
    gather and scatter of :func:`window_indices` are each other's adjoint (every real token sits in
    exactly one window position), so the gradient of one is the other: an ``index_select`` instead of
    autograd's zero fill and ``index_add_``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, adjoint: torch.Tensor, zeros: Optional[torch.Tensor],
                adjoint_zeros: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.args = (adjoint, index, adjoint_zeros, zeros)
        out = select_tokens(x, index)
        if zeros is not None:
            out.index_fill_(1, zeros, 0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return (_Shuffle.apply(grad, *ctx.args), None, None, None, None)


def _shuffle(x: torch.Tensor, index: torch.Tensor, adjoint: torch.Tensor, zeros: Optional[torch.Tensor],
             adjoint_zeros: Optional[torch.Tensor]) -> torch.Tensor:
    """:class:`_Shuffle`; PyTorch's operators under function transforms, which take no autograd function
    without their own rules."""
    if transformed():
        out = x.index_select(1, index)
        return out if zeros is None else out.index_fill(1, zeros, 0)
    return _Shuffle.apply(x, index, adjoint, zeros, adjoint_zeros)


def gather_windows(tokens: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                   padding: Optional[torch.Tensor]) -> torch.Tensor:
    """Tokens ``(B, H * W, C)`` to windows ``(B, nW * N, C)`` with the indices of :func:`window_indices`."""
    return _shuffle(tokens, gather, scatter, padding, None)


def scatter_windows(windows: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                    padding: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`gather_windows`: windows ``(B, nW * N, C)`` to tokens ``(B, H * W, C)``."""
    return _shuffle(windows, scatter, gather, None, padding)


# The geometry below depends on sizes only and is cached per size and device (plain ints and a device
# name as keys). torch.compile traces through the cache into these functions, with the sizes as constants.
@geometry_cache(maxsize=64)
def _gather_index(h: int, w: int, wh: int, ww: int, sh: int, sw: int, device: str) -> torch.Tensor:
    return _window_gather_cpu((h, w), (wh, ww), (sh, sw))[0].to(device)


@geometry_cache(maxsize=64)
def _scatter_index(h: int, w: int, wh: int, ww: int, sh: int, sw: int, device: str) -> torch.Tensor:
    return _window_gather_cpu((h, w), (wh, ww), (sh, sw))[1].to(device)


@geometry_cache(maxsize=64)
def _padding_index(h: int, w: int, wh: int, ww: int, sh: int, sw: int, device: str) -> Optional[torch.Tensor]:
    padding = _window_gather_cpu((h, w), (wh, ww), (sh, sw))[2]
    return None if padding is None else padding.to(device)


@geometry_cache(maxsize=64)
def _shift_mask_parts(hw: Size2, window: Size2, shift: Size2) -> Tuple[torch.Tensor, torch.Tensor]:
    """The four masks of :func:`shift_mask`'s kinds of window, ``(4, N, N)`` (inner windows, the last column, the
    last row, the corner), and each window's kind, ``(nW,)`` int64."""
    labels = []
    for size, win, sh in zip(hw, window, shift):
        # Three regions per axis in the shifted layout: untouched, rolled-in from the far side, and
        # the part of the last window that came from the start. With no shift there is one region.
        lab = torch.zeros(size)
        if sh > 0:
            lab[size - win:size - sh] = 1
            lab[size - sh:] = 2
        labels.append(lab)
    region = (labels[0][:, None] * 3 + labels[1][None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
    region = window_partition(region, window).squeeze(-1)  # (nW, N)
    # Every window row but the last lies in one region band, and so does every column but the last: a
    # window's regions depend only on whether it is in the last row and in the last column.
    rows, cols = hw[0] // window[0], hw[1] // window[1]
    last_row, last_col = torch.arange(rows) == rows - 1, torch.arange(cols) == cols - 1
    kinds = (2 * last_row[:, None] + last_col[None, :]).reshape(-1)  # (nW,)
    examples = torch.tensor([0, cols - 1, (rows - 1) * cols, rows * cols - 1])  # a window of each kind
    distinct = region.index_select(0, examples)  # (4, N)
    differs = distinct[:, :, None] != distinct[:, None, :]
    return torch.zeros(differs.shape).masked_fill_(differs, SHIFT_MASK_VALUE), kinds


def shift_mask(hw: Size2, window: Size2, shift: Size2,
               device: torch.device) -> Optional[torch.Tensor]:
    """Additive attention mask of a cyclically shifted, padded feature map.

    Args:
        hw: Padded feature size ``(Hp, Wp)``, multiples of ``window``.
        window: Window size ``(wh, ww)``.
        shift: Shift ``(sh, sw)``; ``(0, 0)`` gives ``None``.
        device: Where the mask is wanted.

    Returns:
        ``(nW, N, N)`` float32 tensor of 0 and -100 with ``N = wh * ww``, or ``None``. The few distinct
        masks of a feature size are built once and kept; the whole mask (12 MiB for the first stage of an
        800x1216 image) is kept for the last :data:`KEPT_MASKS` feature sizes and devices only, so that
        inputs of many sizes (multi-scale training, detection test sets) do not pile masks up.
    """
    if not any(shift):
        return None
    return _cached_on_device(*hw, *window, *shift, str(device))


# Whole shift masks kept: the last four image sizes' four stages (at 800x1216 about 16 MiB a size).
KEPT_MASKS = 16


@geometry_cache(maxsize=KEPT_MASKS)
def _cached_on_device(hp: int, wp: int, wh: int, ww: int, sh: int, sw: int, device: str) -> torch.Tensor:
    masks, kinds = _shift_mask_parts((hp, wp), (wh, ww), (sh, sw))
    return masks.to(device)[kinds.to(device)]


@geometry_cache(maxsize=32)
def relative_position_index(window: Size2) -> torch.Tensor:
    """``(N, N)`` index into a ``(2wh-1) * (2ww-1)`` table of relative offsets, official ordering."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


@geometry_cache(maxsize=32)
def log_spaced_coords(window: Size2, pretrained_window: Optional[Size2] = None) -> torch.Tensor:
    """V2's relative coordinates ``(2wh-1, 2ww-1, 2)``, log-spaced and scaled to about [-1, 1].

    Offsets are divided by ``P - 1`` with ``P`` the pretrained window when given (so a model keeps the
    geometry it was trained with on a larger window), else the window itself; then
    ``sign(t) * log2(8 |t| + 1) / log2(8)``.
    """
    norm = pretrained_window if pretrained_window and pretrained_window[0] > 0 else window
    axes = []
    for size, ref in zip(window, norm):
        t = torch.arange(-(size - 1), size, dtype=torch.float32)
        # A one-token window has only the zero offset; keep it at zero instead of dividing by zero.
        axes.append(t / (ref - 1) if ref > 1 else t)
    table = torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


@geometry_cache(maxsize=32)
def relative_position_index_on(wh: int, ww: int, device: str) -> torch.Tensor:
    """:func:`relative_position_index` on ``device``, cached."""
    return relative_position_index((wh, ww)).to(device)


@geometry_cache(maxsize=32)
def log_spaced_coords_on(wh: int, ww: int, pretrained: int, device: str) -> torch.Tensor:
    """:func:`log_spaced_coords` flattened to ``((2wh-1)(2ww-1), 2)`` on ``device`` (``pretrained`` 0:
    none), cached."""
    ref = (pretrained, pretrained) if pretrained > 0 else None
    return log_spaced_coords((wh, ww), ref).reshape(-1, 2).to(device)
