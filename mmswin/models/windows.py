"""Window geometry shared by both versions: padding, partition, shift masks, position indices.

Feature maps are channels-last, ``(B, H, W, C)``. A window is a ``(wh, ww)`` pair so that V2 can shrink
it to a feature map smaller than the configured window, as the official V2 code does.
"""
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Size2 = Tuple[int, int]

# Value the official code adds to logits of token pairs that belong to different regions of a shifted
# window. It is not -inf: a padded row may see only foreign tokens and must still give finite values.
SHIFT_MASK_VALUE = -100.0


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


@lru_cache(maxsize=64)
def _window_gather_cpu(hw: Size2, window: Size2, shift: Size2) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    h, w = hw
    hp, wp = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
    # Position (i, j) of the padded map rolled by -shift holds padded pixel (i + sh, j + sw) mod size.
    rows = (torch.arange(hp) + shift[0]) % hp
    cols = (torch.arange(wp) + shift[1]) % wp
    real = (rows[:, None] < h) & (cols[None, :] < w)
    source = torch.where(real, rows[:, None] * w + cols[None, :], h * w)  # h * w: an appended zero token
    gather = window_partition(source[None, :, :, None], window).reshape(-1)
    order = torch.arange(gather.numel())
    scatter = torch.empty(h * w, dtype=torch.long)
    scatter[gather[gather < h * w]] = order[gather < h * w]
    return gather, scatter, bool((~real).any())


def window_indices(hw: Size2, window: Size2, shift: Size2,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Indices that do padding, cyclic shift and window partition (and their inverse) in one gather.

    Args:
        hw: Feature size ``(H, W)``.
        window: Window size ``(wh, ww)``.
        shift: Cyclic shift ``(sh, sw)`` applied after zero padding to whole windows, as the official
            code does.
        device: Where the indices are wanted.

    Returns:
        ``(gather, scatter, padded)``: tokens ``x.view(B, H * W, C)``, with a zero token appended when
        ``padded``, give the windows ``(B, nW * N, C)`` through ``gather``; window outputs
        ``(B, nW * N, C)`` give back ``(B, H * W, C)`` through ``scatter``. Cached per size.
    """
    return _indices_on_device(hw, window, shift, device)


@lru_cache(maxsize=64)
def _indices_on_device(hw: Size2, window: Size2, shift: Size2,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    gather, scatter, padded = _window_gather_cpu(hw, window, shift)
    return gather.to(device), scatter.to(device), padded


@lru_cache(maxsize=64)
def _shift_mask_cpu(hw: Size2, window: Size2, shift: Size2) -> torch.Tensor:
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
    differs = region[:, :, None] != region[:, None, :]
    return torch.zeros(differs.shape).masked_fill_(differs, SHIFT_MASK_VALUE)


def shift_mask(hw: Size2, window: Size2, shift: Size2,
               device: torch.device) -> Optional[torch.Tensor]:
    """Additive attention mask of a cyclically shifted, padded feature map.

    Args:
        hw: Padded feature size ``(Hp, Wp)``, multiples of ``window``.
        window: Window size ``(wh, ww)``.
        shift: Shift ``(sh, sw)``; ``(0, 0)`` gives ``None``.
        device: Where the mask is wanted.

    Returns:
        ``(nW, N, N)`` float32 tensor of 0 and -100 with ``N = wh * ww``, or ``None``. Built once per
        feature size and cached.
    """
    if not any(shift):
        return None
    return _cached_on_device(hw, window, shift, device)


@lru_cache(maxsize=64)
def _cached_on_device(hw: Size2, window: Size2, shift: Size2, device: torch.device) -> torch.Tensor:
    return _shift_mask_cpu(hw, window, shift).to(device)


@lru_cache(maxsize=32)
def relative_position_index(window: Size2) -> torch.Tensor:
    """``(N, N)`` index into a ``(2wh-1) * (2ww-1)`` table of relative offsets, official ordering."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


@lru_cache(maxsize=32)
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
