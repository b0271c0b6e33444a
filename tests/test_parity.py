"""Parity with the official implementations on the golden random-weight checkpoints.

The checkpoints are loaded the way users load them (``init_cfg=Pretrained``), so these tests also
cover format detection, derived-buffer dropping and the bicubic bias-table resize.
"""
import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import DATA, SMALL, golden_input

TOL = 1e-4


def _pretrained(path):
    return dict(type='Pretrained', checkpoint=str(path))


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('case', ['224x224', '150x190', '352x352_window12'])
def test_v1_matches_official_detection_backbone(v1_expected, case, use_sdpa):
    window = 12 if case.endswith('window12') else 7
    model = SwinTransformer(**SMALL, window_size=window, use_sdpa=use_sdpa,
                            init_cfg=_pretrained(DATA / 'v1_official_cls.pth'))
    model.init_weights()
    model.eval()
    expected = v1_expected['cases'][case]['outs']
    with torch.no_grad():
        outs = model(golden_input(v1_expected['cases'][case]))
    assert len(outs) == len(expected) == 4
    for out, ref in zip(outs, expected, strict=True):
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= TOL


def _layer_norm_nchw(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('case', ['512x512', '768x768_window12_from8'])
def test_v2_matches_official(v2_expected, case, use_sdpa):
    kwargs = dict(window_size=12, pretrained_window_sizes=[8, 8, 8, 8]) if 'window12' in case else {}
    model = SwinTransformerV2(**SMALL, use_sdpa=use_sdpa, **kwargs,
                              init_cfg=_pretrained(DATA / 'v2_official_cls.pth'))
    model.init_weights()
    model.eval()
    stages = v2_expected['cases'][case]['stages']
    with torch.no_grad():
        outs = model(golden_input(v2_expected['cases'][case]))
    for out, stage in zip(outs, stages, strict=True):
        # Output norms are at their default init (weight 1, bias 0): plain layer norm of the stage.
        ref = _layer_norm_nchw(stage)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= TOL


def test_v2_window8_checkpoint_needs_pretrained_window_sizes(v2_expected):
    """Without ``pretrained_window_sizes`` the window-12 model sees other position offsets: the
    golden transfer case must then differ, which shows the option is what makes it match."""
    case = v2_expected['cases']['768x768_window12_from8']
    model = SwinTransformerV2(**SMALL, window_size=12, init_cfg=_pretrained(DATA / 'v2_official_cls.pth'))
    model.init_weights()
    with torch.no_grad():
        out = model.eval()(golden_input(case))[0]
    assert (out - _layer_norm_nchw(case['stages'][0])).abs().max() > 1e-2


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_new_style_config_with_pretrained_init_class_loads_the_official_checkpoint(version, tmp_path, request):
    """Pure-Python (lazy-import) configs, as mmdet's ``mmdet/configs`` are written, name the initialiser by its
    class: ``init_cfg=dict(type=PretrainedInit, ...)`` loads and converts the file as ``'Pretrained'`` does."""
    from mmengine.config import Config
    from mmengine.registry import MODELS

    cls = 'SwinTransformer' if version == 'v1' else 'SwinTransformerV2'
    config = tmp_path / 'swin_config.py'
    config.write_text(
        'from mmengine.model import PretrainedInit\n'
        f'from mmswin.models import {cls}\n\n'
        f'model = dict(type={cls}, embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0,\n'
        f"             init_cfg=dict(type=PretrainedInit, checkpoint={str(DATA / f'{version}_official_cls.pth')!r}))\n")
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()
    expected = request.getfixturevalue(f'{version}_expected')['cases']
    case = expected['150x190'] if version == 'v1' else expected['512x512']
    with torch.no_grad():
        outs = model.eval()(golden_input(case))
    refs = case['outs'] if version == 'v1' else [_layer_norm_nchw(s) for s in case['stages']]
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= TOL
