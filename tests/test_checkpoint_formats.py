"""Every supported checkpoint format loads to the official outputs; bad checkpoints give clear errors."""
import copy
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import ConfigDict
from torch import nn

from mmswin.checkpoint import (CheckpointError, convert_state_dict, detect_format, load_pretrained,
                               merge_official_to_unfold, merge_unfold_to_official)
from mmswin.checkpoint.convert import convert_checkpoint, save_atomic
from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import DATA, SMALL, CodePayload, golden_input

DERIVED = ('relative_position_index', 'relative_coords_table', 'attn_mask')


def _body(sd: dict) -> dict:
    """The official backbone weights of a classification state dict (no head, no classifier norm)."""
    return {k: v for k, v in sd.items()
            if not k.startswith(('head.', 'norm.')) and not k.endswith(DERIVED)}


def _unfold_permutation(c: int) -> torch.Tensor:
    """``perm`` with ``unfold_features[..., j] == official_features[..., perm[j]]``, derived here from
    ``nn.Unfold`` and the official slicing, independently of mmswin's code."""
    x = torch.arange(4 * 4 * c, dtype=torch.float32).view(1, 4, 4, c)  # (B, H, W, C), distinct values
    official = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    unfold = nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)  # (B, L, 4C)
    official = official.reshape(1, -1, 4 * c)
    return torch.tensor([int((official[0, 0] == v).nonzero()) for v in unfold[0, 0]])


def _to_unfold(weight: torch.Tensor) -> torch.Tensor:
    return weight[..., _unfold_permutation(weight.shape[-1] // 4)]


def _run(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _load(model, path, **kwargs):
    load_pretrained(model, str(path), **kwargs)
    return model


def _assert_v1_golden(model, v1_expected, case='150x190', norms=None):
    data = v1_expected['cases'][case]
    for i, (out, ref) in enumerate(zip(_run(model, golden_input(data)), data['outs'], strict=True)):
        if norms is not None:  # golden outputs are LN with weight 1, bias 0
            ref = ref * norms[i][0].view(1, -1, 1, 1) + norms[i][1].view(1, -1, 1, 1)
        assert (out - ref).abs().max() <= 1e-4


def _assert_v2_golden(model, v2_expected):
    data = v2_expected['cases']['512x512']
    for out, stage in zip(_run(model, golden_input(data)), data['stages'], strict=True):
        ref = F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2]).permute(0, 3, 1, 2)
        assert (out - ref).abs().max() <= 1e-4


def test_merge_reordering_matches_unfold():
    w = torch.randn(8, 12)
    assert torch.equal(merge_unfold_to_official(_to_unfold(w)), w)
    assert torch.equal(merge_official_to_unfold(w), _to_unfold(w))


def test_official_classification_v1(tmp_path, v1_expected):
    _assert_v1_golden(_load(SwinTransformer(**SMALL), DATA / 'v1_official_cls.pth'), v1_expected)


def test_official_detection_checkpoint(tmp_path, v1_official_sd, v1_expected):
    """``{'state_dict': {'backbone.*', 'neck.*', ...}}`` as the official detection repo saves it,
    with trained output norms that must be loaded too."""
    torch.manual_seed(0)
    norms = [(torch.rand(24 * 2 ** i) + 0.5, torch.randn(24 * 2 ** i)) for i in range(4)]
    sd = {f'backbone.{k}': v for k, v in _body(v1_official_sd).items()}
    for i, (w, b) in enumerate(norms):
        sd[f'backbone.norm{i}.weight'], sd[f'backbone.norm{i}.bias'] = w, b
    sd['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 24, 1, 1)
    sd['roi_head.bbox_head.fc_cls.weight'] = torch.randn(81, 1024)
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': sd, 'meta': {'epoch': 12}}, path)
    model = SwinTransformer(**SMALL, convert_weights=True)
    report = load_pretrained(model, str(path))
    assert report['initialised'] == []
    assert 'neck.lateral_convs.0.conv.weight' in report['unused']
    _assert_v1_golden(model, v1_expected, norms=norms)



@pytest.mark.parametrize('prefix', [None, 'module.backbone.', 'backbone.', 'module.backbone', 'backbone'])
def test_data_parallel_detector_with_the_prefix_as_spelt(tmp_path, v1_official_sd, v1_expected, prefix):
    """A detector saved from DataParallel (``module.backbone.*``) loads with no prefix, with the prefix as the
    file spells it and without its ``module.``; a prefix no key has is named in the error."""
    sd = {f'module.backbone.{k}': v for k, v in _body(v1_official_sd).items()}
    sd['module.neck.lateral_convs.0.conv.weight'] = torch.randn(256, 24, 1, 1)
    path = tmp_path / 'dp_det.pth'
    torch.save({'state_dict': sd}, path)
    model = SwinTransformer(**SMALL)
    report = load_pretrained(model, str(path), prefix=prefix)
    assert report['unused'] == ['module.neck.lateral_convs.0.conv.weight']  # as the file spells it
    _assert_v1_golden(model, v1_expected)
    plain = tmp_path / 'plain.pth'
    torch.save({'model': v1_official_sd}, plain)
    untouched = SwinTransformer(**SMALL)
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(CheckpointError, match=rf"plain\.pth: no key starts with the prefix 'neck\.' \(first keys: "
                                              r'patch_embed\.proj\.weight, '):
        load_pretrained(untouched, str(plain), prefix='neck.')
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())


@pytest.mark.parametrize('size', [(64, 64), (64, 96)], ids=['square', 'not-square'])
def test_mmdets_absolute_position_embedding(tmp_path, size):
    """mmdet's ``(1, L, C)`` absolute position embedding, on a square and a non-square pre-training grid, loads
    to mmdet's outputs; the converter records the pre-training size in ``meta['arch']`` (a model rebuilt from it
    gives the same outputs), and refuses a non-square one, whose height and width the file does not give."""
    from mmdet.models.backbones import swin as mmdet_swin
    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), use_abs_pos_embed=True)
    torch.manual_seed(0)
    theirs = mmdet_swin.SwinTransformer(**arch, pretrain_img_size=size)
    theirs.init_weights()
    assert theirs.absolute_pos_embed.shape == (1, size[0] * size[1] // 16, 24)
    x = torch.randn(1, 3, *size)
    expected = _run(theirs, x)  # mmdet adds the embedding as it is: inputs of the pre-training size
    path = tmp_path / 'mmdet_abs.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in theirs.state_dict().items()}}, path)
    ours = _load(SwinTransformer(**arch, pretrain_img_size=size), path)
    for out, ref in zip(_run(ours, x), expected, strict=True):
        assert (out - ref).abs().max() <= 1e-5
    ours = SwinTransformer(**arch, pretrain_img_size=size)  # as load_from loads a detector: load_state_dict
    ours.load_state_dict(theirs.state_dict())
    for out, ref in zip(_run(ours, x), expected, strict=True):
        assert (out - ref).abs().max() <= 1e-5
    with pytest.raises(CheckpointError, match=r'mmdet_abs\.pth \(openmmlab format\): absolute_pos_embed has '
                                              rf'{size[0] * size[1] // 16} positions, .* the model has 56x56: set '
                                              r'pretrain_img_size') if size[0] != size[1] else nullcontext():
        load_pretrained(SwinTransformer(**arch), str(path))  # 224: a square one is resized, bicubic
    if size[0] != size[1]:
        with pytest.raises(CheckpointError, match=r'mmdet_abs\.pth .*cannot infer the architecture from the weights: '
                                                  r'absolute_pos_embed of shape \(1, 384, 24\): 384 positions are not '
                                                  r'a square grid'):
            convert_checkpoint(str(path))
        return
    converted = convert_checkpoint(str(path))
    assert converted['meta']['arch']['pretrain_img_size'] == 64
    rebuilt = SwinTransformer(**converted['meta']['arch'])
    rebuilt.load_state_dict(converted['state_dict'])
    for out, ref in zip(_run(rebuilt, x), expected, strict=True):
        assert (out - ref).abs().max() <= 1e-5


def test_mmdet_format_from_mmdets_own_model(tmp_path, v1_official_sd, v1_expected):
    """mmdet's SwinTransformer loads the official file with its own converter; its state dict is an
    mmdet-format checkpoint produced by upstream code, which mmswin must load to the official outputs."""
    from mmdet.models.backbones import swin as mmdet_swin
    src = tmp_path / 'official.pth'
    torch.save({'state_dict': _body(v1_official_sd)}, src)
    theirs = mmdet_swin.SwinTransformer(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                        convert_weights=True,
                                        init_cfg=ConfigDict(type='Pretrained', checkpoint=str(src)))
    theirs.init_weights()
    sd = {f'backbone.{k}': v for k, v in theirs.state_dict().items()}
    assert any('.attn.w_msa.' in k for k in sd) and any('ffn.layers.0.0' in k for k in sd)
    path = tmp_path / 'mmdet.pth'
    torch.save({'state_dict': sd, 'meta': {}}, path)
    assert detect_format(convert_state_dict(sd).state_dict) == ('official', 1)
    _assert_v1_golden(_load(SwinTransformer(**SMALL), path), v1_expected)


def _openmmlab_v2(sd: dict) -> dict:
    """The official V2 body in mmpretrain's layout: ``stages``, ``w_msa``, ``ffn``, merging at the
    start of the next stage in unfold order (V2 merge norms are 2C wide and keep their order)."""
    out = {}
    for k, v in _body(sd).items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        if m:
            k = f'stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}'
            if k.endswith('reduction.weight'):
                v = _to_unfold(v)
        k = k.replace('layers.', 'stages.').replace('.attn.', '.attn.w_msa.')
        k = k.replace('.mlp.fc1.', '.ffn.layers.0.0.').replace('.mlp.fc2.', '.ffn.layers.1.')
        k = k.replace('patch_embed.proj.', 'patch_embed.projection.')
        out['backbone.' + k] = v
    out['head.fc.weight'] = torch.randn(10, 192)
    return out



def test_load_state_dict_renames_a_detector_trained_with_mmdets_swin(tmp_path):
    """A detector checkpoint whose backbone is mmdet's Swin, loaded as mmengine's ``load_from`` and ``resume`` load
    it (``load_checkpoint``, not strict) or by ``load_state_dict`` (strict), fills mmswin's backbone with those
    weights (mmdet's outputs), not only the neck."""
    from mmdet.models.backbones import swin as mmdet_swin
    from mmengine.runner.checkpoint import load_checkpoint

    class Detector(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone, self.neck = backbone, nn.Linear(2, 2)

    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    torch.manual_seed(0)
    trained = Detector(mmdet_swin.SwinTransformer(**arch))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': trained.state_dict(), 'meta': {}}, path)
    x = torch.randn(1, 3, 64, 96)
    trained.backbone.eval()
    expected = _run(trained.backbone, x)
    for strict in (False, True):
        ours = Detector(SwinTransformer(**arch))
        if strict:
            assert ours.load_state_dict(torch.load(path)['state_dict']) is not None  # raises on any mismatch
        else:
            load_checkpoint(ours, str(path), map_location='cpu', strict=False)
        assert torch.equal(ours.neck.weight, trained.neck.weight)
        for out, ref in zip(_run(ours.backbone, x), expected, strict=True):
            assert (out - ref).abs().max() <= 1e-5
    own = SwinTransformer(**arch).state_dict()  # mmswin's own keys are loaded as they are
    again = SwinTransformer(**arch)
    again.load_state_dict(own)
    assert all(torch.equal(v, own[k]) for k, v in again.state_dict().items())


def test_load_state_dict_renames_timms_layout(v1_official_sd, v1_expected):
    sd = {}
    for k, v in _body(v1_official_sd).items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        sd[f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}' if m else k] = v
    sd['head.fc.weight'] = torch.randn(10, 192)  # not the backbone's: reported, as load_state_dict does
    model = SwinTransformer(**SMALL)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')]
    assert result.unexpected_keys == ['head.fc.weight']
    _assert_v1_golden(model, v1_expected)

def test_mmpretrain_v2_layout(tmp_path, v2_official_sd, v2_expected):
    path = tmp_path / 'mmpretrain.pth'
    torch.save({'state_dict': _openmmlab_v2(v2_official_sd), 'meta': {}}, path)
    _assert_v2_golden(_load(SwinTransformerV2(**SMALL), path), v2_expected)


def test_timm_layout(tmp_path, v1_official_sd, v1_expected):
    sd = {}
    for k, v in _body(v1_official_sd).items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        sd[f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}' if m else k] = v
    sd['head.fc.weight'] = torch.randn(10, 192)
    path = tmp_path / 'timm.pth'
    torch.save(sd, path)
    assert detect_format(sd)[0] == 'timm'
    _assert_v1_golden(_load(SwinTransformer(**SMALL), path), v1_expected)


def test_timm_layout_without_block_norms_is_still_timms(v1_official_sd):
    """Without any block's norm width to compare with, the merges' widths against the blocks' qkv say where
    they belong."""
    sd = {}
    for k, v in _body(v1_official_sd).items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        if not k.endswith(('norm1.weight', 'norm1.bias')):
            sd[f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}' if m else k] = v
    assert detect_format(sd) == ('timm', 1)
    assert detect_format(_body(v1_official_sd)) == ('official', 1)


def test_timms_v2_k_bias_buffer_is_dropped_as_derived(v2_official_sd):
    """timm's SwinV2 keeps a zero ``k_bias`` buffer: recomputed, not a weight and not an error."""
    sd = dict(_body(v2_official_sd), **{'layers.0.blocks.0.attn.k_bias': torch.zeros(24)})
    converted = convert_state_dict(sd)
    assert converted.derived == ['layers.0.blocks.0.attn.k_bias']
    assert converted.state_dict.keys() == _body(v2_official_sd).keys()


def test_partial_state_dicts_keep_their_merges_where_they_are(tmp_path, v1_official_sd):
    """Files without stage 0 have no merge there in any layout: the merges' widths say where they belong."""
    late = {k: v for k, v in v1_official_sd.items() if k.startswith(('layers.2.', 'layers.3.'))}  # with buffers
    assert detect_format(late) == ('official', 1)
    assert set(convert_state_dict(late).state_dict) == {k for k in late if not k.endswith(DERIVED)}
    model = SwinTransformer(**SMALL)
    result = model.load_state_dict(late, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in late if k.endswith(DERIVED))
    assert torch.equal(model.layers[2].downsample.reduction.weight, late['layers.2.downsample.reduction.weight'])
    path = tmp_path / 'late.pth'
    torch.save({'model': late}, path)
    _expect_error(SwinTransformer(**SMALL), path, 'late.pth', r'\(official format, Swin V1\) lacks 62 weights',
                  r'first patch_embed\.proj\.weight')

    theirs = {}  # stages 1-3 as mmdet names them, merges at the end of their stage in unfold order
    for k, v in _body(v1_official_sd).items():
        if not k.startswith(('layers.1.', 'layers.2.', 'layers.3.')):
            continue
        if k.endswith('downsample.reduction.weight') or (k.endswith(('downsample.norm.weight',
                                                                      'downsample.norm.bias'))):
            v = _to_unfold(v)
        k = k.replace('layers.', 'stages.').replace('.attn.', '.attn.w_msa.')
        theirs[k.replace('.mlp.fc1.', '.ffn.layers.0.0.').replace('.mlp.fc2.', '.ffn.layers.1.')] = v
    converted = convert_state_dict(theirs)
    assert converted.source_format == 'openmmlab'
    expected = {k: v for k, v in _body(v1_official_sd).items()
                if k.startswith(('layers.1.', 'layers.2.', 'layers.3.'))}
    assert converted.state_dict.keys() == expected.keys()
    assert all(torch.equal(converted.state_dict[k], v) for k, v in expected.items())

    timm = {}  # timm's layout of the same stages: merges move to the start of the next stage
    for k, v in expected.items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        timm[f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}' if m else k] = v
    del timm['layers.2.downsample.reduction.weight'], timm['layers.2.downsample.norm.weight']
    del timm['layers.2.downsample.norm.bias']  # stage 1's merge left out: stage 2 alone shows the layout
    assert detect_format(timm) == ('timm', 1)
    assert convert_state_dict(timm).state_dict.keys() == expected.keys() - {
        'layers.1.downsample.reduction.weight', 'layers.1.downsample.norm.weight', 'layers.1.downsample.norm.bias'}


@pytest.mark.parametrize('name,cls', [('v1', SwinTransformer), ('v2', SwinTransformerV2)])
def test_converted_checkpoint_round_trip(tmp_path, name, cls):
    src = DATA / f'{name}_official_cls.pth'
    dst = tmp_path / 'converted.pth'
    save_atomic(convert_checkpoint(str(src)), str(dst))
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['source_format'] == 'official'
    direct = _load(cls(**SMALL), src)
    converted = _load(cls(**SMALL, convert_weights=False), dst)
    # the saved dict holds exactly the model's weights, except the dense output norms
    arch = saved['meta']['arch']
    assert (arch['embed_dims'], arch['depths'], arch['num_heads']) == (24, [2, 2, 2, 2], [1, 2, 4, 8])
    for model in (cls(**SMALL), cls(**arch)):
        missing, unexpected = model.load_state_dict(saved['state_dict'], strict=False)
        assert unexpected == [] and all(re.fullmatch(r'norm\d\.(weight|bias)', k) for k in missing)
    x = torch.randn(1, 3, 97, 131)
    for a, b in zip(_run(direct, x), _run(converted, x), strict=True):
        assert torch.equal(a, b)
    again = convert_checkpoint(str(dst))  # a converted file is recognised as one
    assert again['meta']['source_format'] == 'mmswin' and again['meta']['arch'] == arch
    assert again['state_dict'].keys() == saved['state_dict'].keys()


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_converter_records_the_options_the_weights_show(tmp_path, cls):
    """``meta['arch']`` gives ``qkv_bias=False`` and a non-square pre-training size when the weights say so,
    and the model rebuilt from it takes the weights whole."""
    path = tmp_path / 'options.pth'
    options = dict(qkv_bias=False, use_abs_pos_embed=True, pretrain_img_size=(64, 96))
    torch.save({'state_dict': cls(**SMALL, **options).state_dict()}, path)
    converted = convert_checkpoint(str(path))
    arch = converted['meta']['arch']
    assert arch['qkv_bias'] is False and arch['use_abs_pos_embed'] is True and arch['pretrain_img_size'] == [64, 96]
    missing, unexpected = cls(**arch).load_state_dict(converted['state_dict'], strict=False)
    assert missing == [] and unexpected == []


@pytest.mark.parametrize('key', ['module', 'state_dict_ema', 'model_ema'])
def test_wrapped_state_dicts(tmp_path, v1_official_sd, v1_expected, key):
    path = tmp_path / 'wrapped.pth'
    torch.save({key: _body(v1_official_sd), 'optimizer': {}}, path)
    _assert_v1_golden(_load(SwinTransformer(**SMALL), path), v1_expected)


def test_absolute_position_embedding_resize_is_bicubic(tmp_path):
    theirs = SwinTransformer(**SMALL, use_abs_pos_embed=True, pretrain_img_size=64)
    nn.init.normal_(theirs.absolute_pos_embed)
    path = tmp_path / 'abs.pth'
    torch.save({'state_dict': theirs.state_dict()}, path)
    model = SwinTransformer(**SMALL, use_abs_pos_embed=True, pretrain_img_size=96)
    assert load_pretrained(model, str(path))['resized'] == ['absolute_pos_embed']
    expected = F.interpolate(theirs.absolute_pos_embed.detach(), size=(24, 24), mode='bicubic')
    assert torch.equal(model.absolute_pos_embed.detach(), expected)


def test_relative_position_bias_table_resize_is_bicubic(tmp_path, v1_official_sd):
    model = SwinTransformer(**SMALL, window_size=12)
    report = load_pretrained(model, str(DATA / 'v1_official_cls.pth'))
    assert len(report['resized']) == 8
    key = 'layers.2.blocks.1.attn.relative_position_bias_table'
    table = v1_official_sd[key]  # (13 * 13, nH)
    ref = F.interpolate(table.t().reshape(1, -1, 13, 13), size=(23, 23), mode='bicubic')
    assert torch.equal(model.state_dict()[key], ref.reshape(-1, 23 * 23).t())


# ---------------------------------------------------------------- errors: all or nothing, clear messages
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _expect_error(model, path, *patterns):
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, str(path))
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), str(info.value)
    _assert_untouched(model, before)


def test_error_not_a_swin(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.randn(64, 3, 7, 7), 'bn1.weight': torch.ones(64)}},
               path)
    _expect_error(SwinTransformer(**SMALL), path, 'resnet.pth', 'not those of a Swin', 'conv1.weight')


def test_error_not_a_swin_with_stages(tmp_path):
    """Keys under ``stages.`` (ConvNeXt's, mmdet's ResNet-like backbones) are not an openmmlab Swin."""
    path = tmp_path / 'convnext.pth'
    torch.save({'state_dict': {'backbone.downsample_layers.0.0.weight': torch.randn(8, 3, 4, 4),
                               'backbone.stages.0.0.depthwise_conv.weight': torch.randn(8, 1, 7, 7)}}, path)
    _expect_error(SwinTransformer(**SMALL), path, 'convnext.pth', 'not those of a Swin')


def test_error_other_size(tmp_path):
    path = tmp_path / 'base.pth'
    torch.save({'model': SwinTransformer(arch='base', drop_path_rate=0.0).state_dict()}, path)
    _expect_error(SwinTransformer(arch='tiny'), path, 'base.pth', 'official',
                  r'patch_embed.proj.weight has shape \(128, 3, 4, 4\) in the checkpoint but '
                  r'\(96, 3, 4, 4\) in the model')


def test_error_other_depth(tmp_path):
    path = tmp_path / 'shallow.pth'
    torch.save({'model': SwinTransformer(**dict(SMALL, depths=(2, 2, 1, 2))).state_dict()}, path)
    _expect_error(SwinTransformer(**SMALL), path, 'shallow.pth', r'layers\.2\.blocks\.1\.')


def test_error_other_version():
    _expect_error(SwinTransformer(**SMALL), DATA / 'v2_official_cls.pth', 'Swin V2', 'SwinTransformer')
    _expect_error(SwinTransformerV2(**SMALL), DATA / 'v1_official_cls.pth', 'Swin V1')


def test_error_missing_truncated_and_foreign_files(tmp_path):
    model = SwinTransformer(**SMALL)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_pretrained(model, str(tmp_path / 'nope.pth'))
    data = (DATA / 'v1_official_cls.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    _expect_error(model, tmp_path / 'truncated.pth', 'truncated.pth', 'not a readable checkpoint')
    (tmp_path / 'notes.txt').write_text('hello')
    _expect_error(model, tmp_path / 'notes.txt', 'notes.txt', 'not a readable checkpoint')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    _expect_error(model, tmp_path / 'list.pth', 'list.pth', 'expected a checkpoint dict')


def test_pickled_code_is_never_run_without_opt_in(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    sd = SwinTransformer(**SMALL).state_dict()
    torch.save({'state_dict': sd, 'meta': {'x': CodePayload(marker)}}, path)
    _expect_error(SwinTransformer(**SMALL), path, 'evil.pth', 'posix.system|os.system', 'unsafe_load=True')
    assert not marker.exists()
    # the explicit opt-in reads it (and so runs it): only for trusted files
    load_pretrained(SwinTransformer(**SMALL), str(path), unsafe_load=True)
    assert marker.exists()


def test_init_cfg_unsafe_load_flag(tmp_path):
    """``init_cfg``'s ``unsafe_load``: without it the file is refused, nothing run and nothing loaded; with it
    the file is read (its pickled code runs) and its weights loaded."""
    torch.manual_seed(0)
    source = SwinTransformer(**SMALL).state_dict()
    marker, path = tmp_path / 'm', tmp_path / 'legacy.pth'
    torch.save({'state_dict': source, 'meta': {'x': CodePayload(marker)}}, path)
    model = SwinTransformer(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    default = copy.deepcopy(model)
    default.init_cfg = None
    torch.manual_seed(1)
    default.init_weights()  # the default initialisation alone
    torch.manual_seed(1)  # the same draws
    with pytest.raises(CheckpointError) as info:
        model.init_weights()
    assert 'legacy.pth' in str(info.value) and 'unsafe_load=True' in str(info.value), str(info.value)
    assert not marker.exists()
    _assert_untouched(model, _snapshot(default))  # nothing of the refused file went in
    model = SwinTransformer(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path), unsafe_load=True))
    model.init_weights()
    assert marker.exists()
    loaded = model.state_dict()
    assert loaded.keys() == source.keys()
    for key, value in source.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('source,pattern', [
    (dict(SMALL, depths=(2, 2, 3, 2)), r'holds 13 weights of the backbone that the model has no place for, '
                                       r'first layers\.2\.blocks\.2\.'),
    (dict(SMALL, depths=(2, 2, 2, 2, 1), num_heads=(1, 2, 4, 8, 8), strides=(4, 2, 2, 2, 2)),
     r'no place for, first layers\.3\.downsample'),
    (dict(SMALL, use_abs_pos_embed=True), r'no place for, first absolute_pos_embed'),
])
def test_error_backbone_weights_without_a_place(tmp_path, source, pattern):
    """A checkpoint of a deeper model, or with weights the model's options leave out, is refused instead of
    loading in part; the model's output norms alone may differ (out_indices)."""
    path = tmp_path / 'deeper.pth'
    torch.save({'state_dict': SwinTransformer(**source).state_dict()}, path)
    _expect_error(SwinTransformer(**SMALL), path, 'deeper.pth', pattern, 'another depth or other options')


def test_error_model_options_the_checkpoint_lacks(tmp_path):
    """A model with an absolute position embedding and a file without one: the message names the options."""
    path = tmp_path / 'plain.pth'
    torch.save({'state_dict': SwinTransformer(**SMALL).state_dict()}, path)
    _expect_error(SwinTransformer(**SMALL, use_abs_pos_embed=True), path, 'plain.pth',
                  r'lacks 1 weights of the model, first absolute_pos_embed', 'an absolute position embedding')


def test_error_qkv_biases_without_a_place(tmp_path):
    path = tmp_path / 'biased.pth'
    torch.save({'state_dict': SwinTransformerV2(**SMALL).state_dict()}, path)
    _expect_error(SwinTransformerV2(**SMALL, qkv_bias=False), path, 'biased.pth', r'first layers\.0\.blocks\.0'
                  r'\.attn\.q_bias')
    model = SwinTransformerV2(**SMALL, out_indices=(1, 3))  # fewer output norms than the file: loads
    assert set(load_pretrained(model, str(path))['unused']) == {'norm0.weight', 'norm0.bias', 'norm2.weight',
                                                                'norm2.bias'}


@pytest.mark.parametrize('change,pattern', [
    (lambda t: torch.empty(t.shape, device='meta'), r'is a torch\.float32 on meta, not a tensor of values'),
    (lambda t: t.to(torch.complex64), r'is a torch\.complex64 on cpu'),
    (lambda t: t.long(), r'is a torch\.int64 on cpu'),
    (lambda t: t.to_sparse(), r'is a torch\.sparse_coo tensor'),
    (lambda t: t.to_sparse_csr(), r'is a torch\.sparse_csr tensor'),
])
def test_error_tensors_the_model_cannot_take(tmp_path, change, pattern):
    """Checked before anything is copied: the model is untouched."""
    sd = SwinTransformer(**SMALL).state_dict()
    key = 'layers.3.blocks.1.mlp.fc2.weight'  # late in the file, after tensors that would fit
    sd[key] = change(sd[key])
    path = tmp_path / 'odd.pth'
    torch.save({'state_dict': sd}, path)
    model = SwinTransformer(**SMALL)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=key.replace('.', r'\.') + '.*' + pattern) as info:
        load_pretrained(model, str(path))
    assert 'odd.pth' in str(info.value)
    _assert_untouched(model, before)


def test_checkpoint_argument_types(tmp_path):
    path = tmp_path / 'v1.pth'
    sd = SwinTransformer(**SMALL).state_dict()
    torch.save({'state_dict': sd}, path)
    model = SwinTransformer(**SMALL)
    load_pretrained(model, path)  # a pathlib.Path is taken
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    with pytest.raises(TypeError, match=r"unsafe_load must be True or False, got 'no'"):
        load_pretrained(model, str(path), unsafe_load='no')
    with pytest.raises(TypeError, match='checkpoint must be a path or URL, got None'):
        load_pretrained(model, None)
    _expect_error(model, tmp_path, tmp_path.name, 'is a directory, not a checkpoint file')
