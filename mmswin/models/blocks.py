"""Swin blocks, stages, patch embedding and patch merging. V2 pieces subclass V1 and change only what
differs: the residual norm placement (block) and the norm order (merge)."""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from . import cpu_kernels, layers, mlp_half
from .attention import CosineWindowAttention, WindowAttention
from .graph_capture import recording_graph, transformed
from .layer_norm import LayerNorm
from .layers import DropPath, Mlp, add_residual, build_norm
from .matmul import Conv2d, autocast_dtype, onednn_fused_linear
from .windows import (Size2, WindowChunk, add_tokens_, gather_windows, pad_to_windows, permute_tokens,
                      scatter_windows, select_tokens, shift_mask, window_chunks, window_indices, window_partition,
                      window_reverse, window_rows)


class SwinBlock(nn.Module):
    """Pre-norm Swin block (V1): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: Channels ``C``.
        attn: The window attention module.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        drop: Dropout after the MLP layers.
        drop_path: Stochastic depth rate.
        act_cfg: Activation of the MLP.
        norm_cfg: Normalisation layers.
    """

    res_post_norm = False  # the norms apply to the branches' outputs (V2), not to their inputs

    def __init__(self, dim: int, attn: WindowAttention, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, act_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.norm1 = build_norm(norm_cfg, dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = build_norm(norm_cfg, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_cfg=act_cfg, drop=drop)

    def window_attention(self, x: torch.Tensor, window: Size2, shift: Size2,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Shifted-window attention of ``x: (B, H, W, C)``. As in the official detection backbone, the
        map is zero-padded to whole windows before the cyclic shift and cropped after it; here padding,
        shift and partition are one gather, and their inverse one more."""
        if torch.compiler.is_compiling():
            return self._window_attention_rolled(x, window, shift, mask)
        b, h, w, c = x.shape
        if self.attn.attends_rows(x, window):
            return self._window_attention_of_tokens(x, window, shift, mask)
        gather, scatter, padding = window_indices((h, w), window, shift, x.device)
        windows = gather_windows(x.reshape(b, h * w, c), gather, scatter, padding)
        out = self.attn(windows.view(-1, window[0] * window[1], c), window, mask)
        return scatter_windows(out.view(b, -1, c), gather, scatter, padding).view(b, h, w, c)

    def _window_attention_of_tokens(self, x: torch.Tensor, window: Size2, shift: Size2,
                                    mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`window_attention` where the kernels take the attention (:meth:`.WindowAttention.attends_rows`):
        the map's tokens are permuted into window order, with no padding, and only they are projected and
        attended (a padding position's zero token is the qkv bias inside the kernels), in chunks of about
        :data:`~.layers.CHUNK_TOKENS` tokens; the outputs are permuted back."""
        b, h, w, c = x.shape
        per_chunk = max(1, layers.chunk_tokens(x) // (window[0] * window[1]))
        rows = window_rows((h, w), window, shift, per_chunk, x.device)
        tokens = permute_tokens(x.reshape(b, h * w, c), rows.order, rows.inverse)
        out = self.attn.attend_token_rows(tokens, rows.chunks, window, mask)
        return permute_tokens(out, rows.inverse, rows.order).view(b, h, w, c)

    def _window_attention_rolled(self, x: torch.Tensor, window: Size2, shift: Size2,
                                 mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`window_attention` written as the official pad, roll and partition steps: the form for
        torch.compile, which fuses these copies itself (and fails to fuse the gathers into norms)."""
        h, w = x.shape[1:3]
        x = pad_to_windows(x, window)
        hp, wp = x.shape[1:3]
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = self.attn(window_partition(x, window), window, mask)
        x = torch.roll(window_reverse(x, window, (hp, wp)), shifts=shift, dims=(1, 2))
        return x[:, :h, :w, :]

    def forward(self, x: torch.Tensor, window: Size2, shift: Size2, mask: Optional[torch.Tensor],
                overwrite: bool = False, checkpointed: bool = False) -> torch.Tensor:
        """``x: (B, H, W, C)`` to the same shape. With ``overwrite``, CPU inference may write the output
        into ``x`` and return it (:meth:`forward_in_place`); ``checkpointed``: the call runs under activation
        checkpointing (:meth:`mlp_half`)."""
        if overwrite and self.can_update_in_place(x):
            return self.forward_in_place(x, window, shift, mask)
        x = self.residual(x, lambda t: self.window_attention(self.norm1(t), window, shift, mask), self.norm1,
                          self.attn)
        return self.mlp_half(x, checkpointed)

    def mlp_half(self, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """``x + drop_path(mlp(norm2(x)))`` (V2: ``x + drop_path(norm2(mlp(x)))``) of ``x: (B, H, W, C)``; in CPU
        bf16 training one pass of the kernels, forward and backward, where they take it (:mod:`.mlp_half`).
        Off the CPU under activation checkpointing (``checkpointed``), the MLP's layers one after the other
        rather than :func:`.gelu_mlp`, which keeps one hidden tensor for the backward."""
        if mlp_half.applies(x, self.norm2, self.mlp, self.drop_path):
            return mlp_half.norm_mlp_residual(x, self.norm2, self.mlp, self.res_post_norm)
        mlp = self.mlp
        if checkpointed and x.device.type != 'cpu' and not layers.plain_calls(mlp):
            # The recomputation brings back what the layers keep, and PyTorch's layers one after the other then
            # leave less alive at the backward's peak than gelu_mlp's temporaries on top of the recomputed block
            # (a Swin-T training step at 800x1216 with with_cp=True on a GPU: 681 against 925 MiB in fp32).
            mlp = mlp.layers
        if self.res_post_norm:
            return self.residual(x, lambda t: self.norm2(mlp(t)), self.mlp, self.norm2)
        return self.residual(x, lambda t: mlp(self.norm2(t)), self.norm2, self.mlp)

    def residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                 *modules: nn.Module) -> torch.Tensor:
        """``x + drop_path(branch(x))`` of ``x: (B, H, W, C)``, ``modules`` holding the branch's parameters.
        Where stochastic depth allows (:func:`.layers.skips_dropped_branches`), the branch is computed only
        for the samples that keep it (:func:`.layers.add_kept_branch`)."""
        if not isinstance(self.drop_path, DropPath):  # put there by the user (nn.Identity, mmcv's DropPath)
            return x + self.drop_path(branch(x))
        if layers.skips_dropped_branches(x, self.drop_path, self.branches_draw()):
            return layers.add_kept_branch(x, branch, self.drop_path, modules)
        return add_residual(x, branch(x), self.drop_path)

    def branches_draw(self) -> bool:
        """Whether the branches draw random numbers in this mode (dropout in the attention or the MLP)."""
        return self.training and (self.attn.attn_drop > 0.0 or self.attn.proj_drop.p > 0.0
                                  or self.mlp.drop.p > 0.0)

    def window_branch(self, rows: torch.Tensor, padding: Optional[torch.Tensor], window: Size2,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention branch ``(B * nW', N, C)`` of the windows whose tokens are ``rows: (B, nW' * N, C)``
        (positions ``padding`` pad the map and count as zeros after the norm)."""
        rows = self.norm1(rows)
        if padding is not None:
            rows.index_fill_(1, padding, 0)
        return self.attn.attend(rows.view(-1, window[0] * window[1], rows.shape[-1]), window, mask)

    def mlp_branch(self, rows: torch.Tensor) -> torch.Tensor:
        """The MLP branch of token ``rows: (L, C)``, in one piece."""
        return self.mlp.layers(self.norm2(rows))

    def can_update_in_place(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_in_place` computes this block's values for ``x``: CPU inference in eval
        mode, nothing recorded, not under torch.compile, and a residual stream that stays in ``x``'s dtype."""
        if self.training or x.device.type != 'cpu' or not x.is_contiguous() or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return not torch.is_autocast_enabled('cpu') or torch.get_autocast_dtype('cpu') == x.dtype

    def forward_in_place(self, x: torch.Tensor, window: Size2, shift: Size2,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` for inference, writing both residual sums into ``x: (B, H, W, C)``.

        The attention half runs over chunks of windows, each gathered from ``x`` (padding and shift in
        the gather), normalised, attended and added back to the rows it came from; the MLP half over
        chunks of tokens. No ``(B, H, W, C)`` tensor is allocated (at detection sizes the C allocator maps
        those afresh, page fault by page fault), and each chunk stays in the CPU's caches from the norm to
        the residual sum. Windows share no token, so updating one chunk leaves the inputs of the others
        as they were: the values are those of :meth:`forward`. In bf16 with the compiled kernels, a chunk's
        gather is fused with its norm and its residual sum is one more kernel
        (:meth:`window_chunk_in_kernels_`), with the same values; where there are at least two chunks per
        thread, each half is one call of the kernels that gives each thread whole chunks
        (:meth:`attention_in_kernels_`, :meth:`mlp_in_kernels_`).
        """
        b, h, w, c = x.shape
        n = window[0] * window[1]
        tokens = x.view(b, h * w, c)
        fused = self.chunks_in_kernels(tokens)
        per_chunk = max(1, layers.CHUNK_TOKENS // (b * n))  # windows of each image per chunk
        shared = fused and self.attention_in_kernels_(tokens, (h, w), window, shift, mask, per_chunk)
        chunks = () if shared else window_chunks((h, w), window, shift, per_chunk, x.device)
        for chunk in chunks:
            chunk_mask = None if mask is None else mask[chunk.windows]
            if fused:
                self.window_chunk_in_kernels_(tokens, chunk, window, chunk_mask)
                continue
            branch = self.window_branch(select_tokens(tokens, chunk.index), chunk.padding, window, chunk_mask)
            branch = branch.view(b, -1, c)
            if chunk.padding is not None:
                # -0.0: x + (-0.0) is x for every x, so the rows that padding positions point at stay
                branch.index_fill_(1, chunk.padding, -0.0)
            add_tokens_(tokens, chunk.index, branch)
        rows = tokens.view(-1, c)
        if self.mlp_in_kernels_(rows):
            return x
        for start in range(0, rows.shape[0], layers.CHUNK_TOKENS):
            part = rows[start:start + layers.CHUNK_TOKENS]
            part.add_(self.mlp_branch(part))
        return x

    def attention_in_kernels_(self, tokens: torch.Tensor, hw: Size2, window: Size2, shift: Size2,
                              mask: Optional[torch.Tensor], per_chunk: int) -> bool:
        """The attention half of :meth:`forward_in_place` on the bf16 map ``tokens: (B, H * W, C)`` in one call
        of the kernels that shares whole chunks of windows out among the threads, with the values of
        :meth:`window_chunk_in_kernels_` chunk by chunk, where the kernels take the attention, the products
        oneDNN's fused linear, and there are at least two chunks (as many as of at most ``per_chunk`` windows,
        each of about the same number of real tokens; with the projections on AMX tiles, of at most
        :data:`~.layers.TILE_ATTENTION_CHUNK_TOKENS` tokens) per thread. Returns whether it did; else nothing is
        done."""
        attn = self.attn
        if not attn.attends_rows(tokens, window) or not onednn_fused_linear(
                tokens, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias):
            return False
        n = window[0] * window[1]
        windows = -(-hw[0] // window[0]) * -(-hw[1] // window[1])
        shared = layers.SHARED_ATTENTION_TOKENS
        if attn.projects_on_tiles():
            shared = layers.SHARED_TILE_ATTENTION_TOKENS
            per_chunk = min(per_chunk, max(1, layers.TILE_ATTENTION_CHUNK_TOKENS // (tokens.shape[0] * n)))
        least = -(-shared // (tokens.shape[0] * n))
        per_chunk = cpu_kernels.inference_chunk(windows, per_chunk, least)
        if not cpu_kernels.threads_share(-(-windows // per_chunk)):
            return False
        chunks = window_chunks(hw, window, shift, per_chunk, tokens.device, balance=True)
        masks = [] if mask is None else [mask[c.windows].to(torch.float32).contiguous() for c in chunks]
        norm = self.norm1.kernel_args()
        cpu_kernels.kernels().window_attention_rows_(tokens, [c.real for c in chunks], [c.slots for c in chunks],
                                                     masks, *norm, self.res_post_norm, *attn.rows_kernel_args(window))
        return True

    def mlp_in_kernels_(self, rows: torch.Tensor) -> bool:
        """The MLP half of :meth:`forward_in_place` on bf16 ``rows: (L, C)`` in one call of the kernels that
        shares whole chunks of tokens out among the threads, with the same values, where the norm takes the
        kernels, the products oneDNN's fused linear (:func:`.onednn_fused_linear`), and there are at least two
        chunks per thread (:func:`.cpu_kernels.threads_share`). Returns whether it did; else nothing is done.
        Where the CPU has AMX (:func:`.cpu_kernels.use_amx`) and C and the hidden width are multiples of 32,
        both products run on its tiles with the weights packed once (:func:`.cpu_kernels.tile_pairs`): the
        same values to the products' bf16 roundings (they sum in another order)."""
        mlp = self.mlp
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == 'none' and mlp.drop.p == 0):
            return False
        params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        if not (isinstance(self.norm2, LayerNorm) and self.norm2.takes_kernel(rows)
                and onednn_fused_linear(rows, *params)):
            return False
        chunk = cpu_kernels.inference_chunk(rows.shape[0], layers.CHUNK_TOKENS, layers.SHARED_MLP_TOKENS)
        if not cpu_kernels.threads_share(-(-rows.shape[0] // chunk)):
            return False
        ops = cpu_kernels.kernels()
        fc1, fc2 = params[0], params[2]
        if cpu_kernels.use_amx() and fc1.shape[0] % 32 == 0 and fc1.shape[1] % 32 == 0:  # both products on tiles
            b1, b2 = (None if b is None else b.to(torch.bfloat16) for b in params[1::2])
            ops.gelu_mlp_rows_(rows, cpu_kernels.tile_pairs(fc1), b1, cpu_kernels.tile_pairs(fc2), b2,
                                *self.norm2.kernel_args(), self.res_post_norm, chunk)
            return True
        params = (None if p is None else p.to(torch.bfloat16) for p in params)
        ops.gelu_mlp_rows_(rows, *params, *self.norm2.kernel_args(), self.res_post_norm, chunk)
        return True

    def chunks_in_kernels(self, tokens: torch.Tensor) -> bool:
        """Whether :meth:`forward_in_place` runs its window chunks through
        :meth:`window_chunk_in_kernels_`: where the norm takes the kernels (bf16 on the CPU)."""
        return isinstance(self.norm1, LayerNorm) and self.norm1.takes_kernel(tokens)

    def window_chunk_in_kernels_(self, tokens: torch.Tensor, chunk: WindowChunk, window: Size2,
                                 mask: Optional[torch.Tensor]) -> None:
        """The attention half of :meth:`forward_in_place` for one chunk of windows, adding to bf16
        ``tokens: (B, L, C)`` through the compiled kernels: the gather and the norm in one pass, the residual
        sum in another (no gathered copy, no fills, no index_add). Where the kernels also take the attention,
        only the chunk's real tokens are gathered and projected (:meth:`.WindowAttention.attend_rows`); else
        every window position (padding ones as zeros)."""
        ops = cpu_kernels.kernels()
        b, _, c = tokens.shape
        compact = self.attn.attends_rows(tokens, window)
        rows = chunk.real if compact else chunk.rows
        before, after = self.kernel_norms()
        x = ops.gather_rows(tokens, rows, *before)
        if compact:
            branch = self.attn.attend_rows(x, chunk.slots, window, mask)
        else:
            branch = self.attn.attend(x.view(-1, window[0] * window[1], c), window, mask).reshape(b, -1, c)
        ops.add_rows_(tokens, rows, branch.to(tokens.dtype), *after)

    def kernel_norms(self) -> Tuple[tuple, tuple]:
        """The row kernels' norm arguments ``(weight, bias, eps, normalise)`` of the attention branch's
        gather and of its residual sum: V1 normalises the gathered tokens."""
        return (*self.norm1.kernel_args(), True), (None, None, 0.0, False)


class SwinBlockV2(SwinBlock):
    """Res-post-norm Swin block (V2): ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``."""

    res_post_norm = True

    def forward(self, x: torch.Tensor, window: Size2, shift: Size2, mask: Optional[torch.Tensor],
                overwrite: bool = False, checkpointed: bool = False) -> torch.Tensor:
        if overwrite and self.can_update_in_place(x):
            return self.forward_in_place(x, window, shift, mask)
        x = self.residual(x, lambda t: self.norm1(self.window_attention(t, window, shift, mask)), self.attn,
                          self.norm1)
        return self.mlp_half(x, checkpointed)

    def window_branch(self, rows: torch.Tensor, padding: Optional[torch.Tensor], window: Size2,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        if padding is not None:
            rows.index_fill_(1, padding, 0)
        return self.norm1(self.attn.attend(rows.view(-1, window[0] * window[1], rows.shape[-1]), window, mask))

    def mlp_branch(self, rows: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.mlp.layers(rows))

    def kernel_norms(self) -> Tuple[tuple, tuple]:
        return (None, None, 0.0, False), (*self.norm1.kernel_args(), True)  # V2 normalises the branch


def channels_last(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype, memory_format=torch.channels_last)``; an fp32 CPU image for bf16, where autograd records
    nothing, in one pass of the compiled kernels (PyTorch's copy takes ten times its plain cast there)."""
    if (dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == 'cpu' and x.is_contiguous()
            and not layers.needs_grad(x) and not recording_graph() and cpu_kernels.use_kernels()):
        return cpu_kernels.kernels().channels_last_bf16(x)
    if transformed():  # vmap takes the memory format of the batched tensor
        return x.to(dtype)
    return x.to(dtype=dtype, memory_format=torch.channels_last)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding; pads the image right/bottom to a multiple of the patch.

    Args:
        in_channels: Image channels.
        dim: Embedding channels.
        patch_size: Patch side (kernel and stride).
        norm_cfg: Norm after the projection, or ``None`` for none.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int,
                 norm_cfg: Optional[dict] = None, use_norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = build_norm(norm_cfg, dim) if use_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` to ``(B, ceil(H / p), ceil(W / p), dim)``.

        The image is laid out channels-last (a copy of its few channels), so that the convolution writes
        its output, and takes its gradient, in the tokens' ``(B, H, W, C)`` layout: without it, both are
        transposed copies of the largest activation (at 800x1216 they took 50 of the 72 ms of this
        layer's fp32 training step).
        """
        p = self.patch_size
        h, w = x.shape[-2:]
        if self.embeds_on_tiles(x):
            norm = self.norm.kernel_args() if self.norm is not None else (None, None, 0.0)
            bias = None if self.proj.bias is None else self.proj.bias.to(torch.bfloat16)
            tokens = x.shape[0] * -(-h // p) * -(-w // p)
            chunk = cpu_kernels.inference_chunk(tokens, layers.CHUNK_TOKENS, 64)
            return cpu_kernels.kernels().patch_embedding_tiles(
                x.contiguous(), cpu_kernels.tile_pairs(self.proj.weight), bias, p, *norm, self.norm is not None,
                chunk)
        if h % p or w % p:
            x = F.pad(x, (0, -w % p, 0, -h % p))
        # Under autocast the image is cast as the convolution would cast it, in the same copy.
        dtype = autocast_dtype(x) if x.dtype == torch.float32 else x.dtype
        x = self.proj(channels_last(x, dtype)).permute(0, 2, 3, 1)
        if self.norm is None:
            return x
        return layers.normalise_in_place(self.norm, x) if layers.runs_in_chunks(x, self.norm) else self.norm(x)


    def embeds_on_tiles(self, x: torch.Tensor) -> bool:
        """Whether the inference of ``x: (B, in_channels, H, W)`` runs in one call of the kernels on AMX tiles
        (``patch_embedding_tiles``; :func:`.cpu_kernels.use_amx`): bf16 (an fp32 image under bf16 autocast)
        on the CPU, the kernels' layer norm or none, the embedding's dim a multiple of 32, not recorded into a
        graph. The same values to the products' bf16 roundings."""
        dtype = autocast_dtype(x) if x.dtype == torch.float32 else x.dtype
        return (dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
                and layers.runs_in_chunks(x, self) and (self.norm is None or isinstance(self.norm, LayerNorm))
                and self.proj.out_channels % 32 == 0 and type(self.proj) is Conv2d and not recording_graph()
                and cpu_kernels.use_amx())


class PatchMerging(nn.Module):
    """2x2 patch merging (V1): concatenate neighbours ``[(0,0), (1,0), (0,1), (1,1)]`` (row, col) to 4C,
    normalise (unless ``use_norm`` is off: ``nn.Identity``), reduce to 2C. Odd sizes are zero-padded
    right/bottom."""

    norm_after = False  # V2 normalises the reduction's output instead of its input

    def __init__(self, dim: int, norm_cfg: Optional[dict] = None, use_norm: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = build_norm(norm_cfg, self.norm_dim) if use_norm else nn.Identity()

    @property
    def norm_dim(self) -> int:
        return 4 * self.dim

    @staticmethod
    def merge(x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, ceil(H/2), ceil(W/2), 4C)`` in the official neighbour order."""
        b, h, w, c = x.shape
        x = pad_to_windows(x, (2, 2))
        h2, w2 = x.shape[1] // 2, x.shape[2] // 2
        # (B, h2, row, w2, col, C) -> (B, h2, w2, col, row, C): channel block k = 2 * col + row
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5)
        return x.reshape(b, h2, w2, 4 * c)

    def project(self, merged: torch.Tensor) -> torch.Tensor:
        """Norm and reduction of ``merged: (..., 4C)`` to ``(..., 2C)``."""
        return layers.call_linear(self.reduction, self.norm(merged))

    def merges_on_tiles(self, x: torch.Tensor) -> bool:
        """Whether the inference of ``x: (B, H, W, C)`` (bf16 on the CPU) merges on AMX tiles: the kernels'
        layer norm, C a multiple of 16, not recorded into a graph."""
        return (isinstance(self.norm, LayerNorm) and x.dtype == torch.bfloat16 and x.device.type == 'cpu'
                and self.dim % 16 == 0 and not recording_graph() and cpu_kernels.use_amx())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, ceil(H/2), ceil(W/2), 2C)``. Without autograd on the CPU, in bands of
        about :data:`~.layers.CHUNK_TOKENS` output tokens: the ``(B, H/2, W/2, 4C)`` merged and normalised
        maps are never allocated whole. In bf16 where the CPU has AMX (:func:`.cpu_kernels.use_amx`), one call of
        the kernels (``patch_merging_tiles``): per chunk of output tokens the gather, the norm and the reduction
        on AMX tiles with the weight packed once (:func:`.cpu_kernels.tile_pairs`), the same values to the
        products' bf16 roundings."""
        if not layers.runs_in_chunks(x, self):
            return self.project(self.merge(x))
        if self.merges_on_tiles(x):
            b, h, w, _ = x.shape
            tokens = b * -(-h // 2) * -(-w // 2)
            chunk = cpu_kernels.inference_chunk(tokens, layers.CHUNK_TOKENS // 4, 64)
            return cpu_kernels.kernels().patch_merging_tiles(
                x.contiguous(), cpu_kernels.tile_pairs(self.reduction.weight), *self.norm.kernel_args(),
                self.norm_after, chunk)
        b, h, w, _ = x.shape
        h2, w2 = -(-h // 2), -(-w // 2)
        band = max(1, layers.CHUNK_TOKENS // (b * w2))  # output rows; :meth:`merge` pads each band
        out = None
        for start in range(0, h2, band):
            part = self.project(self.merge(x[:, 2 * start:2 * (start + band)]))
            if out is None:
                out = part.new_empty(b, h2, w2, part.shape[-1])
            out[:, start:start + band] = part
        return out


class PatchMergingV2(PatchMerging):
    """2x2 patch merging (V2): reduce to 2C first, then normalise."""

    norm_after = True

    @property
    def norm_dim(self) -> int:
        return 2 * self.dim

    def project(self, merged: torch.Tensor) -> torch.Tensor:
        return self.norm(layers.call_linear(self.reduction, merged))


class SwinStage(nn.Module):
    """One stage: ``depth`` blocks alternating regular and shifted windows, then optional merging.

    Args:
        blocks: The blocks; odd ones use shifted windows.
        window_size: Configured window side.
        downsample: Patch merging at the end of the stage, or ``None``.
        shrink_window: Where the map's shorter side is no larger than the window, use square windows of
            that side and no shift (official V2); otherwise always pad and shift (official V1 detection).
        with_cp: Gradient checkpointing of each block.
    """

    def __init__(self, blocks: Sequence[SwinBlock], window_size: int,
                 downsample: Optional[PatchMerging] = None, shrink_window: bool = False,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.window_size = window_size
        self.shrink_window = shrink_window
        self.with_cp = with_cp

    def window_layout(self, h: int, w: int) -> Tuple[Size2, Size2]:
        """Window and shift (of shifted blocks) for a ``(h, w)`` feature map."""
        ws = self.window_size
        if not self.shrink_window:
            return (ws, ws), (ws // 2, ws // 2)
        side = min(h, w)
        if side <= ws:  # the official V2 block: window min(H, W) on both axes, shift 0
            return (side, side), (0, 0)
        return (ws, ws), (ws // 2, ws // 2)

    def forward(self, x: torch.Tensor, overwrite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, H, W, C)`` to the stage output ``(B, H, W, C)`` and the next stage's input.

        In CPU inference each block writes its output into its input (:meth:`SwinBlock.forward_in_place`),
        the first block into a copy of ``x``, which stays as it was, or with ``overwrite`` (the backbone's
        own intermediate) into ``x`` itself; not where forward hooks could see those tensors
        (:func:`.layers.observed`).
        """
        h, w = x.shape[1:3]
        window, shift = self.window_layout(h, w)
        hp, wp = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
        mask = shift_mask((hp, wp), window, shift, x.device)
        no_shift = (0, 0)
        in_place = not layers.plain_calls(self)  # a hooked block keeps the tensors it was handed
        for i, blk in enumerate(self.blocks):
            args = (window, shift, mask) if i % 2 else (window, no_shift, None)
            # (torch.func's grad takes no checkpoint: its saved-tensor hooks are not supported there)
            if self.with_cp and x.requires_grad and not transformed():
                x = cp.checkpoint(blk, x, *args, use_reentrant=False, checkpointed=True)
            else:
                if in_place and i == 0 and not overwrite and blk.can_update_in_place(x):
                    x = x.clone()
                x = blk(x, *args, overwrite=in_place)
        return x, (x if self.downsample is None else self.downsample(x))


def make_attention(version: int, dim: int, num_heads: int, window_size: int, qkv_bias: bool,
                   qk_scale: Optional[float], attn_drop: float, proj_drop: float, use_sdpa: bool,
                   pretrained_window_size: int) -> WindowAttention:
    """The attention of a V1 or V2 block."""
    if version == 1:
        return WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=proj_drop, use_sdpa=use_sdpa)
    return CosineWindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                 proj_drop=proj_drop, use_sdpa=use_sdpa,
                                 pretrained_window_size=pretrained_window_size)


BLOCKS: dict = {1: SwinBlock, 2: SwinBlockV2}
MERGES: dict = {1: PatchMerging, 2: PatchMergingV2}
