"""Swin Transformer V1 and V2 backbones for dense prediction (mmdet / mmseg)."""
import difflib
import inspect
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule, PretrainedInit
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import MODELS
from .attention import CosineWindowAttention, WindowAttention, validate_heads
from .blocks import BLOCKS, MERGES, PatchEmbed, SwinStage, make_attention
from .layers import build_norm, norm_channels_first, observed

ARCH_ZOO: Dict[str, dict] = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'large': dict(embed_dims=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}

IntOrSeq = Union[int, Sequence[int]]


def _resolve_arch(arch: Optional[str], embed_dims: Optional[int], depths: Optional[Sequence[int]],
                  num_heads: Optional[Sequence[int]]) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
    """A preset (default 'tiny'), with any explicitly given value taking precedence."""
    if arch is None:
        name = 'tiny'
    elif isinstance(arch, str) and arch.lower() in ARCH_ALIASES.keys() | ARCH_ZOO.keys():
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
    else:
        raise ValueError(f'arch must be one of {sorted(ARCH_ZOO)} (or {sorted(ARCH_ALIASES)}), '
                         f'got {arch!r}')
    preset = ARCH_ZOO[name]
    embed_dims = preset['embed_dims'] if embed_dims is None else embed_dims
    if not _is_int(embed_dims) or embed_dims <= 0:
        raise ValueError(f'embed_dims must be a positive int, got {embed_dims!r}')
    depths = _int_sequence(preset['depths'] if depths is None else depths, 'depths')
    num_heads = _int_sequence(preset['num_heads'] if num_heads is None else num_heads, 'num_heads')
    return embed_dims, depths, num_heads


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_sequence(value: object, name: str, minimum: int = 1) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, '__iter__'):
        raise TypeError(f'{name} must be a sequence of ints, got {value!r}')
    value = tuple(value)
    if not value or not all(_is_int(v) and v >= minimum for v in value):
        raise ValueError(f'{name} must be a non-empty sequence of ints >= {minimum}, got {value}')
    return value


def _square(value: object) -> object:
    """``(n,)`` and ``(n, n)`` as ``n``, as mmdet's and mmseg's ``to_2tuple`` take them; anything else as it is."""
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) for v in value) and len(set(value)) == 1 \
            and len(value) <= 2:
        return value[0]
    return value


def _per_stage(value: IntOrSeq, num_stages: int, name: str, minimum: int = 1) -> Tuple[int, ...]:
    """An int for every stage, or one int per stage."""
    if _is_int(value):
        value = (value,) * num_stages
    value = _int_sequence(value, name, minimum)
    if len(value) != num_stages:
        raise ValueError(f'{name} must be an int or a sequence of {num_stages} ints (one per stage), '
                         f'got {len(value)}: {value}')
    return value


# Arguments of mmpretrain's Swin backbones that mmswin does not take, and what to do instead.
MMPRETRAIN_ONLY = {
    'img_size': "mmswin's name for it is pretrain_img_size (it sizes the use_abs_pos_embed table only)",
    'pad_small_map': 'maps smaller than a window are handled as in the official models: V1 pads them (the '
                     "official detection backbone, as mmdet's), V2 takes windows of min(H, W) without shift "
                     "(the official V2; mmpretrain pads such maps to the window with pad_small_map=True and refuses "
                     "them with False, so its models differ there)",
    'interpolate_mode': 'use_abs_pos_embed is always interpolated bicubically',
    'stage_cfgs': 'give the stage options as arguments of their own (window_size, mlp_ratio, qkv_bias, ...)',
    'patch_cfg': 'give the patch embedding options as arguments of their own (patch_size, patch_norm, '
                 'in_channels)',
}


def _unknown_arguments_error(cls: type, unknown: Dict[str, object]) -> TypeError:
    """A TypeError naming each argument ``cls`` does not take, with mmpretrain's names explained and a
    close accepted name suggested for typos."""
    accepted = [name for c in cls.__mro__ if issubclass(c, SwinTransformer)
                for name, p in inspect.signature(c.__init__).parameters.items()
                if name != 'self' and p.kind is p.POSITIONAL_OR_KEYWORD]
    reasons = []
    for name in unknown:
        if name in MMPRETRAIN_ONLY:
            reasons.append(f"{name} (an mmpretrain argument: {MMPRETRAIN_ONLY[name]})")
        else:
            close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
            reasons.append(f'{name}' + (f' (did you mean {close[0]}?)' if close else ''))
    return TypeError(f'{cls.__name__} got unexpected argument(s): {"; ".join(reasons)}')



def _rename_foreign_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of the backbones: weights of mmdet's, mmseg's, mmpretrain's or timm's Swin (a
    detector or segmentor trained with one, as mmengine's ``load_from`` and ``resume`` load it) are renamed to
    mmswin's, so that they are loaded rather than reported as unexpected while the backbone keeps its own."""
    from mmengine.logging import print_log

    from ..checkpoint.formats import FORMATS, rename_foreign_keys  # imported here: checkpoint imports the models
    own = {k for k in module.state_dict(keep_vars=True)}
    converted = rename_foreign_keys(state_dict, prefix, own)
    pos, mine = state_dict.get(prefix + 'absolute_pos_embed'), getattr(module, 'absolute_pos_embed', None)
    if (converted is not None and isinstance(pos, torch.Tensor) and pos.ndim == 3 and mine is not None
            and pos.shape[0] == 1 and pos.shape[1] == mine.shape[2] * mine.shape[3] and pos.shape[2] == mine.shape[1]):
        # mmdet's (1, L, C) of a grid that is not square (a square one is converted already): the model's grid
        state_dict[prefix + 'absolute_pos_embed'] = pos.transpose(1, 2).reshape(mine.shape)
    if converted is not None:
        print_log(f'{type(module).__name__} at {prefix[:-1] or "the top"}: renamed '
                  f'{len(converted.state_dict)} weights of {FORMATS[converted.source_format]} to mmswin\'s names',
                  logger='current')

def _split_init_cfg(init_cfg: Union[None, dict, List[dict]]) -> Tuple[List[dict], List[dict]]:
    """``init_cfg``'s ``Pretrained`` entries and the others, each checked."""
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg] if init_cfg else []
    for cfg in cfgs:
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise TypeError(f"init_cfg must be a dict with a 'type' (or a list of them), such as "
                            f"dict(type='Pretrained', checkpoint=PATH_OR_URL), got {cfg!r}")
    pretrained = [c for c in cfgs if _is_pretrained(c['type'])]
    for cfg in pretrained:
        if not isinstance(cfg.get('checkpoint'), (str, os.PathLike)):
            raise TypeError(f"init_cfg of type 'Pretrained' needs checkpoint=PATH_OR_URL (a str or path), "
                            f"got {cfg!r}")
        if not isinstance(cfg.get('unsafe_load', False), bool):
            raise TypeError(f"init_cfg's unsafe_load must be True or False, got {cfg['unsafe_load']!r}")
    return pretrained, [c for c in cfgs if not _is_pretrained(c['type'])]


def _is_pretrained(init_type) -> bool:
    """Whether an ``init_cfg`` entry of this type loads a checkpoint: ``'Pretrained'``, or the class
    ``PretrainedInit`` as new-style (pure Python) configs name it, as mmengine takes them."""
    return init_type == 'Pretrained' or isinstance(init_type, type) and issubclass(init_type, PretrainedInit)


@MODELS.register_module()
class SwinTransformer(BaseModule):
    """Swin Transformer V1 backbone, a drop-in for mmdet's and mmseg's ``SwinTransformer``.

    Numerically the official detection backbone: same padding, shift masks and merge order.
    Parameter names are the official ones (``layers.{i}.blocks.{j}.attn.qkv``, ``mlp.fc1``,
    ``layers.{i}.downsample``, ``norm{i}``), so official checkpoints load without renaming; other
    formats (mmdet/mmseg, mmpretrain, timm, detector checkpoints) are converted on load.

    Args:
        pretrain_img_size: Image size of pre-training, an int, ``(size,)`` or ``(height, width)``; sizes
            ``absolute_pos_embed``.
        in_channels: Image channels.
        embed_dims: Width of the first stage (default from ``arch``).
        patch_size: Patch side, an int or a square ``(p, p)``.
        window_size: Window side, an int or one per stage.
        mlp_ratio: MLP width relative to the stage width.
        depths: Blocks per stage (default from ``arch``).
        num_heads: Heads per stage (default from ``arch``).
        strides: Patch embedding stride, then merging strides; must be ``(patch_size, 2, 2, ...)``.
        out_indices: Stages whose outputs are returned, each through its own ``norm{i}``.
        qkv_bias: Learn q/k/v biases.
        qk_scale: Override of ``head_dim ** -0.5`` (V1 only).
        patch_norm: Normalise the patch embedding and the patch merging's features (mmdet's and mmseg's meaning;
            the official code's switch leaves the merging's norms, but every official model has them on).
        drop_rate: Dropout after position embedding and in MLPs.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks to this value.
        use_abs_pos_embed: Add a learned absolute position embedding, interpolated to the input.
        act_cfg: MLP activation, e.g. ``dict(type='GELU')``.
        norm_cfg: Norm layers, e.g. ``dict(type='LN')``.
        with_cp: Gradient checkpointing of each block.
        pretrained: Deprecated path of a checkpoint; use ``init_cfg``.
        convert_weights: Accepted for compatibility; the checkpoint format is detected from its keys.
        frozen_stages: Freeze the patch embedding (0) and stages ``0..k-1`` with their output norms (k);
            -1 freezes nothing.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` (or ``type=PretrainedInit``) loads any
            supported format.
        arch: Preset: 'tiny', 'small', 'base', 'large' (or 't', 's', 'b', 'l').
        norm_eval: Keep norm layers in eval mode during training.
        use_sdpa: Run attention through ``F.scaled_dot_product_attention``.
    """

    version = 1

    def __init__(self,
                 pretrain_img_size: IntOrSeq = 224,
                 in_channels: int = 3,
                 embed_dims: Optional[int] = None,
                 patch_size: IntOrSeq = 4,
                 window_size: IntOrSeq = 7,
                 mlp_ratio: float = 4.0,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 strides: Sequence[int] = (4, 2, 2, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 patch_norm: bool = True,
                 drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1,
                 use_abs_pos_embed: bool = False,
                 act_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 convert_weights: bool = False,
                 frozen_stages: int = -1,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 arch: Optional[str] = None,
                 norm_eval: bool = False,
                 use_sdpa: bool = True,
                 pretrained_window_sizes: IntOrSeq = 0,
                 **unknown: object) -> None:
        if unknown:
            raise _unknown_arguments_error(type(self), unknown)
        if pretrained is not None and init_cfg is not None:
            raise ValueError('pretrained and init_cfg cannot both be set; use init_cfg only')
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a str or None, got {type(pretrained).__name__}')
            warnings.warn('pretrained is deprecated, use init_cfg=dict(type="Pretrained", checkpoint=...)',
                          FutureWarning, stacklevel=2)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        _split_init_cfg(init_cfg)  # bad init_cfg fails here, not at init_weights
        super().__init__(init_cfg=init_cfg)

        embed_dims, depths, num_heads = _resolve_arch(arch, embed_dims, depths, num_heads)
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'num_heads has {len(num_heads)} entries but depths has {num_stages}')
        window_sizes = _per_stage(window_size, num_stages, 'window_size')
        pretrained_windows = _per_stage(pretrained_window_sizes, num_stages, 'pretrained_window_sizes',
                                        minimum=0)
        if 1 in pretrained_windows:
            raise ValueError(f'pretrained_window_sizes must be 0 (none) or >= 2, got {pretrained_windows}')
        patch_size = _square(patch_size)
        for name, value in (('patch_size', patch_size), ('in_channels', in_channels)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f'{name} must be a positive int' + (' or a square (p, p)' if name == 'patch_size'
                                                                     else '') + f', got {value!r}')
        if not _is_real(mlp_ratio) or int(embed_dims * mlp_ratio) < 1:
            raise ValueError(f'mlp_ratio must be a number that gives the MLP at least one channel '
                             f'(int(embed_dims * mlp_ratio) >= 1), got {mlp_ratio!r}')
        for name, value in (('drop_rate', drop_rate), ('attn_drop_rate', attn_drop_rate),
                            ('drop_path_rate', drop_path_rate)):
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f'{name} must be a number in [0, 1), got {value!r}')
        if isinstance(strides, (tuple, list)) and strides:  # mmdet's (patch_size, 2, ...), patch_size may be a pair
            strides = (_square(strides[0]), *strides[1:])
        strides = _int_sequence(strides, 'strides')[:num_stages]  # as mmdet's, longer than the stages is fine
        if len(strides) != num_stages or strides[0] != patch_size or any(s != 2 for s in strides[1:]):
            raise ValueError(f'strides must be (patch_size, 2, 2, ...) with {num_stages} entries, i.e. '
                             f'{(patch_size,) + (2,) * (num_stages - 1)}, got {strides}')
        dims = [embed_dims * 2 ** i for i in range(num_stages)]
        validate_heads(dims, num_heads)
        out_indices = _int_sequence(out_indices, 'out_indices', minimum=0)
        if any(i >= num_stages for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices must be distinct stage indices in 0..{num_stages - 1}, '
                             f'got {out_indices}')
        if not _is_int(frozen_stages) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        if self.version == 1 and any(pretrained_windows):
            raise ValueError('pretrained_window_sizes is a SwinTransformerV2 option')
        if self.version == 2 and qk_scale is not None:
            raise ValueError('qk_scale is not used by SwinTransformerV2 (cosine attention)')

        self.in_channels = in_channels
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.depths = depths
        self.num_heads = num_heads
        self.window_sizes = window_sizes
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.use_abs_pos_embed = use_abs_pos_embed
        self.convert_weights = convert_weights
        self.num_features = dims

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, norm_cfg, use_norm=patch_norm)
        if use_abs_pos_embed:
            img = _square(pretrain_img_size)
            img = (img,) * 2 if _is_int(img) else _int_sequence(img, 'pretrain_img_size')
            if len(img) != 2 or min(img) < patch_size:
                raise ValueError(f'pretrain_img_size must be an int, (size,) or (height, width), each at least '
                                 f'patch_size ({patch_size}), got {pretrain_img_size!r}')
            grid = (img[0] // patch_size, img[1] // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dims, *grid))
        self.pos_drop = nn.Dropout(drop_rate)

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        block_cls, merge_cls = BLOCKS[self.version], MERGES[self.version]
        self.layers = nn.ModuleList()
        for i, (dim, depth, heads, ws) in enumerate(zip(dims, depths, num_heads, window_sizes)):
            first = sum(depths[:i])
            blocks = [
                block_cls(dim,
                          make_attention(self.version, dim, heads, ws, qkv_bias, qk_scale, attn_drop_rate,
                                         drop_rate, use_sdpa, pretrained_windows[i]),
                          mlp_ratio=mlp_ratio, drop=drop_rate, drop_path=rates[first + j],
                          act_cfg=act_cfg, norm_cfg=norm_cfg)
                for j in range(depth)
            ]
            downsample = merge_cls(dim, norm_cfg, use_norm=patch_norm) if i < num_stages - 1 else None
            self.layers.append(SwinStage(blocks, ws, downsample, shrink_window=self.version == 2,
                                         with_cp=with_cp))
        for i in out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg, dims[i]))

        self._init_default_weights()
        self._freeze_stages()
        self.register_load_state_dict_pre_hook(_rename_foreign_keys)

    # ------------------------------------------------------------------ weights
    def _init_default_weights(self) -> None:
        """Official initialisation: truncated normal (std .02) linears and tables, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):  # (without weight or bias with elementwise_affine or bias off)
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if isinstance(m, CosineWindowAttention):
                nn.init.constant_(m.logit_scale, torch.log(torch.tensor(10.0)).item())
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        if self.use_abs_pos_embed:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)

    def init_weights(self) -> None:
        """Default initialisation, then any ``init_cfg``; ``Pretrained`` entries go through mmswin's
        loader, which detects the checkpoint format and converts it."""
        from ..checkpoint import load_pretrained  # imported here: checkpoint imports the models
        from mmengine.model import initialize

        pretrained, others = _split_init_cfg(self.init_cfg)
        self._init_default_weights()
        if others:
            initialize(self, others)
        for cfg in pretrained:
            load_pretrained(self, os.fspath(cfg['checkpoint']), prefix=cfg.get('prefix'),
                            map_location=cfg.get('map_location', 'cpu'),
                            unsafe_load=cfg.get('unsafe_load', False))
        self._is_init = True

    # ------------------------------------------------------------------ modes
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        frozen = [self.patch_embed, self.pos_drop]
        for i in range(self.frozen_stages):
            frozen.append(self.layers[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        return frozen

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0 and self.use_abs_pos_embed:
            self.absolute_pos_embed.requires_grad_(False)
        for m in self._frozen_modules():
            m.eval()
            m.requires_grad_(False)

    def train(self, mode: bool = True) -> 'SwinTransformer':
        """Sets the mode, keeping frozen stages (and norms, with ``norm_eval``) in eval mode."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{name} expects images as a (B, C, H, W) tensor, got {shape}')
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f'{name} has in_channels={self.in_channels}, got an input with {c} channels '
                             f'(shape {tuple(x.shape)})')
        if b == 0:
            raise ValueError(f'{name} got an empty batch (shape {tuple(x.shape)})')
        if h == 0 or w == 0:
            raise ValueError(f'{name} got an empty image (shape {tuple(x.shape)})')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects floating-point images (normalised, as the data preprocessors of mmdet '
                            f'and mmseg give them), got {x.dtype}')
        weight = self.patch_embed.proj.weight
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        if x.dtype != weight.dtype and not autocast:
            raise TypeError(f'{name} has {weight.dtype} parameters and got a {x.dtype} input: cast the input (or '
                            f'the model) to one dtype, or run under torch.autocast')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(B, in_channels, H, W)`` to one ``(B, C_i, ceil(H / 2^(i+2)), ...)`` map per ``out_indices``
        entry (for patch 4), each through ``norm{i}``."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.use_abs_pos_embed:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode='bicubic')
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outs = []
        last = max(self.out_indices)
        own = not observed(self)  # unless hooks see them, the intermediates are the backbone's own
        for i, stage in enumerate(self.layers[:last + 1]):
            # the stage's input is the patch embedding's or the previous merge's output: its own to overwrite
            out, x = stage(x, overwrite=own)
            if i in self.out_indices:
                outs.append(norm_channels_first(getattr(self, f'norm{i}'), out))
        return tuple(outs)


@MODELS.register_module()
class SwinTransformerV2(SwinTransformer):
    """Swin Transformer V2 backbone for dense prediction.

    V2 changes three things: res-post-norm blocks, scaled cosine attention with a continuous
    position bias (``cpb_mlp``, ``logit_scale``, ``q_bias``/``v_bias``) and patch merging that reduces
    before normalising. A window larger than a feature map shrinks to it, as in the official model.

    Args:
        window_size: Window side, an int or one per stage. Default 8.
        pretrained_window_sizes: Window of the pre-trained model per stage (0: none), so that a
            checkpoint trained with a small window transfers to a larger one.
        **kwargs: As :class:`SwinTransformer` (``qk_scale`` is not used).
    """

    version = 2

    def __init__(self, window_size: IntOrSeq = 8, pretrained_window_sizes: IntOrSeq = 0,
                 **kwargs) -> None:
        super().__init__(window_size=window_size, pretrained_window_sizes=pretrained_window_sizes,
                         **kwargs)

    def _init_default_weights(self) -> None:
        super()._init_default_weights()
        # Official res-post-norm initialisation: each residual branch starts at zero.
        for stage in self.layers:
            for blk in stage.blocks:
                for param in (p for norm in (blk.norm1, blk.norm2) for p in (norm.weight, norm.bias)):
                    if param is not None:
                        nn.init.zeros_(param)
