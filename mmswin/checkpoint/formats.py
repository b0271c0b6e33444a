"""Checkpoint formats of Swin backbones: detection from the keys and conversion to mmswin's names.

Everything here is a pure function of a state dict; the loader and ``tools/model_converters`` share it.
mmswin's own names are the official ones with the downsample at the end of each stage
(``layers.{i}.downsample``) and ``absolute_pos_embed`` as ``(1, C, H, W)``.
"""
import math
import re
from collections import OrderedDict
from typing import Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

# Buffers that are recomputed from the configuration and never loaded.
DERIVED_SUFFIXES = ('relative_position_index', 'relative_coords_table', 'attn_mask', 'k_bias')

# Top-level names that belong to the backbone; anything else (heads, necks, the classifier's norm) is not.
_BACKBONE_KEY = re.compile(r'^(patch_embed\.|absolute_pos_embed$|layers\.|norm\d+\.)')

# mmdet/mmseg/mmpretrain names -> official names (applied in order).
_OPENMMLAB_RENAMES = (
    (re.compile(r'^patch_embed\.projection\.'), 'patch_embed.proj.'),
    (re.compile(r'^stages\.'), 'layers.'),
    (re.compile(r'\.attn\.w_msa\.'), '.attn.'),
    (re.compile(r'\.ffn\.layers\.0\.0\.'), '.mlp.fc1.'),
    (re.compile(r'\.ffn\.layers\.0\.1\.'), '.mlp.act.'),  # an activation with weights (act_cfg PReLU)
    (re.compile(r'\.ffn\.layers\.1\.'), '.mlp.fc2.'),
)

FORMATS = {
    'mmswin': "mmswin's own (official names, {'state_dict', 'meta': {'mmswin_version'}})",
    'official': 'official Swin (microsoft/Swin-Transformer classification, or the official '
                'detection/segmentation backbone)',
    'openmmlab': 'mmdet/mmseg/mmpretrain Swin (stages.*.attn.w_msa, ffn.layers, unfold-ordered merging)',
    'timm': 'timm Swin (official names, merging at the start of stages 1-3)',
}


class Converted(NamedTuple):
    """Result of :func:`convert_state_dict`."""
    state_dict: StateDict  # mmswin names, backbone keys only
    source_format: str  # a key of FORMATS
    version: int  # 1 or 2
    ignored: List[str]  # source keys that are not backbone weights (heads, necks, classifier norm)
    derived: List[str]  # recomputed buffers that were dropped


def unwrap_checkpoint(obj: object) -> Tuple[Mapping[str, torch.Tensor], dict]:
    """Returns ``(state_dict, meta)`` of a loaded checkpoint object.

    Accepts ``{'state_dict': ...}`` (mmengine), ``{'model': ...}`` (official), ``{'module': ...}``
    and a bare state dict. Raises ``ValueError`` for anything that is not a mapping of tensors.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f'expected a checkpoint dict, got {type(obj).__name__}')
    meta = obj.get('meta') if isinstance(obj.get('meta'), dict) else {}
    for key in ('state_dict', 'model', 'module', 'state_dict_ema', 'model_ema'):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError('no tensors found: not a model checkpoint')
    return tensors, meta


def strip_prefix(sd: Mapping[str, torch.Tensor],
                 prefix: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Removes ``module.`` and a backbone prefix: ``prefix`` when given (as the keys spell it, with or without
    their ``module.``), else ``backbone.`` when the dict is a whole detector/segmentor (has keys under it).
    Returns the stripped dict and the keys outside the prefix (necks, heads), as the file spells them.

    Raises:
        ValueError: No key starts with ``prefix``.
    """
    given = prefix
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        if any(k.startswith(prefix) for k in sd):  # e.g. 'module.backbone.' as the file has it
            return ({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                    [k for k in sd if not k.startswith(prefix)])
    spelt = {k[len('module.'):] if k.startswith('module.') else k: k for k in sd}  # unwrapped -> as in the file
    unwrapped = {k: sd[key] for k, key in spelt.items()}
    if prefix is None and any(k.startswith('backbone.') for k in unwrapped):
        prefix = 'backbone.'
    if not prefix:
        return unwrapped, []
    if not any(k.startswith(prefix) for k in unwrapped):
        keys = list(sd)
        shown = ', '.join(keys[:5]) + (f', ... ({len(keys)} in all)' if len(keys) > 5 else '')
        raise ValueError(f'no key starts with the prefix {given!r} (first keys: {shown or "none"})')
    return ({k[len(prefix):]: v for k, v in unwrapped.items() if k.startswith(prefix)},
            [spelt[k] for k in unwrapped if not k.startswith(prefix)])


def detect_format(sd: Mapping[str, torch.Tensor], meta: Optional[dict] = None) -> Tuple[str, int]:
    """Recognises a (prefix-stripped) Swin state dict.

    Returns:
        ``(format, version)`` with ``format`` a key of :data:`FORMATS` and ``version`` 1 or 2.

    Raises:
        ValueError: The keys are not those of a Swin backbone.
    """
    keys = list(sd)
    version = 2 if any(k.endswith(('.cpb_mlp.0.weight', '.logit_scale')) for k in keys) else 1
    if meta and meta.get('mmswin_version'):
        return 'mmswin', version
    if any(k.startswith('stages.') for k in keys) and any('.attn.w_msa.' in k for k in keys):
        return 'openmmlab', version
    if any(re.match(r'layers\.\d+\.blocks\.\d+\.attn\.', k) for k in keys):
        return ('timm' if _merges_at_start(sd, 'layers') else 'official'), version
    sample = ', '.join(keys[:3])
    raise ValueError(f'the keys are not those of a Swin backbone (first keys: {sample})')


def _downsample_stages(keys: List[str], stage_name: str) -> set:
    pattern = re.compile(rf'^{stage_name}\.(\d+)\.downsample\.')
    return {int(m.group(1)) for m in map(pattern.match, keys) if m}


def _merges_at_start(sd: Mapping[str, torch.Tensor], stage_name: str) -> bool:
    """Whether the patch mergings sit at the start of stages 1.. (timm, mmpretrain's V2) rather than at the end
    of stages 0.. (official, mmdet). A merge's widths against its own stage's blocks decide: at the end it reads
    4C of the stage's C channels, at the start it writes the stage's C. Only where no stage has both, which stages
    have a merge decide (a file of stages 1-3 alone has no merge at stage 0 in either layout)."""
    starts = _downsample_stages(list(sd), stage_name)
    for i in sorted(starts):
        reduction = sd.get(f'{stage_name}.{i}.downsample.reduction.weight')
        norm1 = sd.get(f'{stage_name}.{i}.blocks.0.norm1.weight')
        if reduction is None or norm1 is None or reduction.ndim != 2 or norm1.ndim != 1:
            continue
        if reduction.shape[1] == 4 * norm1.shape[0]:
            return False
        if reduction.shape[0] == norm1.shape[0]:
            return True
    return bool(starts) and 0 not in starts


def merge_unfold_to_official(weight: torch.Tensor) -> torch.Tensor:
    """Reorders the 4C input dimension of a patch-merging weight from ``nn.Unfold`` order
    (channel-major; neighbours (0,0), (0,1), (1,0), (1,1)) to the official concatenation order
    (neighbour-major; (0,0), (1,0), (0,1), (1,1)). Works on ``(out, 4C)`` weights and ``(4C,)`` norms."""
    lead = weight.shape[:-1]
    c = weight.shape[-1] // 4
    unfold = weight.reshape(*lead, c, 4).transpose(-1, -2)  # (..., 4, C), unfold neighbour order
    return unfold[..., [0, 2, 1, 3], :].reshape(*lead, 4 * c)


def merge_official_to_unfold(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`merge_unfold_to_official`."""
    lead = weight.shape[:-1]
    c = weight.shape[-1] // 4
    official = weight.reshape(*lead, 4, c)[..., [0, 2, 1, 3], :]
    return official.transpose(-1, -2).reshape(*lead, 4 * c)


def _abs_pos_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """``(1, L, C)`` (official classification, mmdet) to ``(1, C, H, W)`` with ``H = W = sqrt(L)``. A
    non-square ``L`` stays ``(1, L, C)``: only the model it is loaded into knows its grid (``pretrain_img_size``)."""
    if t.ndim == 3:
        side = math.isqrt(t.shape[1])
        if side * side != t.shape[1]:
            return t
        return t.transpose(1, 2).reshape(1, t.shape[2], side, side)
    return t


def convert_state_dict(sd: Mapping[str, torch.Tensor], meta: Optional[dict] = None,
                       prefix: Optional[str] = None) -> Converted:
    """Converts any supported Swin state dict to mmswin names.

    Args:
        sd: A state dict (already unwrapped from ``{'state_dict'|'model': ...}``).
        meta: The checkpoint's ``meta``, if any.
        prefix: Key prefix of the backbone (default: ``backbone.`` if present).

    Returns:
        A :class:`Converted`. Derived buffers and non-backbone keys are left out and listed.
    """
    sd, ignored = strip_prefix(sd, prefix)
    fmt, version = detect_format(sd, meta)
    out: StateDict = OrderedDict()
    derived = []
    merge_at_start = _merges_at_start(sd, 'stages' if fmt == 'openmmlab' else 'layers')
    for key, value in sd.items():
        if key.endswith(DERIVED_SUFFIXES):
            derived.append(key)
            continue
        if fmt == 'openmmlab':
            for pattern, repl in _OPENMMLAB_RENAMES:
                key = pattern.sub(repl, key)
        m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', key)
        if m and merge_at_start:
            key = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        if key == 'absolute_pos_embed':
            value = _abs_pos_to_nchw(value)
        if not _BACKBONE_KEY.match(key):
            ignored.append(key)
            continue
        out[key] = value
    if fmt == 'openmmlab':
        _reorder_unfold_merges(out)
    return Converted(out, fmt, version, ignored, derived)



def rename_foreign_keys(sd: Dict[str, torch.Tensor], prefix: str, own: Collection[str]) -> Optional[Converted]:
    """In place: the keys of ``sd`` under ``prefix`` renamed from mmdet's, mmseg's, mmpretrain's or timm's Swin to
    mmswin's, where they are not all ``own`` keys (mmswin's names, without the prefix) and are one of those
    layouts; derived buffers dropped. Returns the conversion, or ``None`` where nothing was renamed."""
    local = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not local or all(k in own for k in local):
        return None
    try:
        fmt, _ = detect_format(local)
    except ValueError:
        return None
    if fmt not in ('openmmlab', 'timm'):
        return None
    converted = convert_state_dict(local, prefix='')
    for key in local:
        del sd[prefix + key]
    sd.update((prefix + k, v) for k, v in converted.state_dict.items())
    sd.update((prefix + k, local[k]) for k in converted.ignored if k in local)  # left to the caller to report
    return converted

def _reorder_unfold_merges(sd: StateDict) -> None:
    """In place: reorders every merge reduction, and the V1 merge norms (4C wide, unlike V2's 2C),
    from unfold order to the official order."""
    for key in [k for k in sd if k.endswith('.downsample.reduction.weight')]:
        weight = sd[key]
        sd[key] = merge_unfold_to_official(weight)
        base = key[:-len('reduction.weight')]
        for name in ('norm.weight', 'norm.bias'):
            if base + name in sd and sd[base + name].shape[-1] == weight.shape[-1]:
                sd[base + name] = merge_unfold_to_official(sd[base + name])


def infer_arch(sd: Mapping[str, torch.Tensor], version: int) -> dict:
    """Constructor arguments of the backbone a converted (mmswin-named) state dict belongs to.

    V2 weights do not fix the window (the position bias is an MLP); it is left out for V2.
    """
    proj = sd['patch_embed.proj.weight']
    depths = []
    while any(k.startswith(f'layers.{len(depths)}.blocks.') for k in sd):
        i = len(depths)
        depths.append(len({k.split('.')[3] for k in sd if k.startswith(f'layers.{i}.blocks.')}))
    head_key = 'attn.logit_scale' if version == 2 else 'attn.relative_position_bias_table'
    num_heads = [sd[f'layers.{i}.blocks.0.{head_key}'].shape[0 if version == 2 else 1]
                 for i in range(len(depths))]
    fc1 = sd['layers.0.blocks.0.mlp.fc1.weight']
    arch = dict(embed_dims=proj.shape[0], depths=depths, num_heads=num_heads, patch_size=proj.shape[-1],
                in_channels=proj.shape[1], mlp_ratio=fc1.shape[0] / fc1.shape[1],
                patch_norm='patch_embed.norm.weight' in sd,
                use_abs_pos_embed='absolute_pos_embed' in sd,
                qkv_bias=('layers.0.blocks.0.attn.q_bias' if version == 2 else
                          'layers.0.blocks.0.attn.qkv.bias') in sd)
    if version == 1:
        arch['window_size'] = [(math.isqrt(sd[f'layers.{i}.blocks.0.{head_key}'].shape[0]) + 1) // 2
                               for i in range(len(depths))]
    arch['strides'] = (arch['patch_size'],) + (2,) * (len(depths) - 1)
    if 'absolute_pos_embed' in sd:
        pos = sd['absolute_pos_embed']
        if pos.ndim != 4:
            raise ValueError(f'absolute_pos_embed of shape {tuple(pos.shape)}: {pos.shape[1]} positions are not a '
                             'square grid, and the file does not say its height and width (load it into a model '
                             'whose pretrain_img_size gives them)')
        height, width = (n * arch['patch_size'] for n in pos.shape[2:])
        arch['pretrain_img_size'] = height if height == width else [height, width]
    return arch
