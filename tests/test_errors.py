"""Bad configuration and bad input give clear errors naming the argument and the allowed values."""
import math

import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import SMALL

BACKBONES = [SwinTransformer, SwinTransformerV2]


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('kwargs,error,pattern', [
    (dict(window_size=0), ValueError, r'window_size must be .*>= 1'),
    (dict(window_size=-7), ValueError,
     r'window_size must be a non-empty sequence of ints >= 1, got \(-7, -7, -7, -7\)'),
    (dict(window_size=[7, 7, 7]), ValueError, r'window_size .*one per stage.*got 3'),
    (dict(window_size='7'), TypeError, r'window_size must be a sequence of ints'),
    (dict(num_heads=(1, 2, 5, 8)), ValueError, r'num_heads\[2\]=5 must be positive and divide the stage width 96'),
    (dict(num_heads=(1, 2, 4)), ValueError, r'num_heads has 3 entries but depths has 4'),
    (dict(depths=(2, 2, 0, 2)), ValueError, r'depths must be a non-empty sequence of ints >= 1'),
    (dict(depths=()), ValueError, r'depths must be a non-empty sequence of ints >= 1, got \(\)'),
    (dict(out_indices=(0, 4)), ValueError, r'out_indices must be distinct stage indices in 0\.\.3'),
    (dict(out_indices=(1, 1)), ValueError, r'out_indices must be distinct stage indices in 0\.\.3, got \(1, 1\)'),
    (dict(out_indices=(-1,)), ValueError, r'out_indices must be a non-empty sequence of ints >= 0, got \(-1,\)'),
    (dict(out_indices=()), ValueError, r'out_indices must be a non-empty sequence of ints >= 0, got \(\)'),
    (dict(frozen_stages=5), ValueError, r'frozen_stages must be in -1\.\.4, got 5'),
    (dict(frozen_stages=-2), ValueError, r'frozen_stages must be in -1\.\.4, got -2'),
    (dict(strides=(2, 2, 2, 2)), ValueError, r'strides must be \(patch_size, 2, 2, \.\.\.\).*\(4, 2, 2, 2\)'),
    (dict(strides=(4, 2, 2)), ValueError,
     r'strides must be \(patch_size, 2, 2, \.\.\.\) with 4 entries, .* got \(4, 2, 2\)'),
    (dict(pretrained=3), TypeError, r'pretrained must be a str or None'),
    (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth')), ValueError,
     r'pretrained and init_cfg cannot both be set'),
    (dict(arch='huge'), ValueError, r"arch must be one of \['base', 'large', 'small', 'tiny'\]"),
    (dict(embed_dims=0), ValueError, r'embed_dims must be a positive int'),
    (dict(patch_size=0, strides=(0, 2, 2, 2)), ValueError, r'patch_size must be a positive int'),
    (dict(drop_path_rate=1.0), ValueError, r'drop_path_rate must be a number in \[0, 1\), got 1\.0'),
    (dict(drop_path_rate=None), ValueError, r'drop_path_rate must be a number in \[0, 1\), got None'),
    (dict(drop_rate='0.1'), ValueError, r"drop_rate must be a number in \[0, 1\), got '0\.1'"),
    (dict(mlp_ratio=0), ValueError, r'mlp_ratio must be a number that gives the MLP at least one channel'),
    (dict(mlp_ratio=0.01), ValueError, r'mlp_ratio .*int\(embed_dims \* mlp_ratio\) >= 1\), got 0\.01'),
    (dict(mlp_ratio=None), ValueError, r'mlp_ratio .* got None'),
    (dict(strides=4), TypeError, r'strides must be a sequence of ints, got 4'),
    (dict(use_abs_pos_embed=True, pretrain_img_size=3), ValueError,
     r'pretrain_img_size must be an int, \(size,\) or \(height, width\), each at least patch_size \(4\), got 3'),
    (dict(use_abs_pos_embed=True, pretrain_img_size=(64, 64, 64)), ValueError,
     r'pretrain_img_size must be an int, .* got \(64, 64, 64\)'),
    (dict(init_cfg='file.pth'), TypeError, r"init_cfg must be a dict with a 'type'.*got 'file\.pth'"),
    (dict(init_cfg=dict(type='Pretrained')), TypeError, r"'Pretrained' needs checkpoint=PATH_OR_URL"),
    (dict(init_cfg=dict(type='Pretrained', checkpoint=3)), TypeError, r'needs checkpoint=PATH_OR_URL'),
    (dict(init_cfg=dict(type='Pretrained', checkpoint='a.pth', unsafe_load='no')), TypeError,
     r"unsafe_load must be True or False, got 'no'"),
    (dict(norm_cfg=dict(type='GN')), ValueError, r"norm_cfg type 'GN' is not supported"),
    (dict(act_cfg=dict(type='Mesh')), ValueError, r"act_cfg type 'Mesh' is not an activation of PyTorch or mmcv"),
    # mmpretrain's arguments, and typos
    (dict(img_size=256), TypeError, r'got unexpected argument\(s\): img_size \(an mmpretrain argument: '
                                    r"mmswin's name for it is pretrain_img_size"),
    (dict(pad_small_map=True, patch_cfg={}), TypeError,
     r'pad_small_map \(an mmpretrain argument: .*V2 takes windows of min\(H, W\).*; patch_cfg \(an mmpretrain'),
    (dict(stage_cfgs={}), TypeError, r'stage_cfgs \(an mmpretrain argument: give the stage options'),
    (dict(interpolate_mode='bilinear'), TypeError, r'interpolate_mode \(an mmpretrain argument'),
    (dict(drop_path=0.1), TypeError, r'got unexpected argument\(s\): drop_path \(did you mean drop_path_rate\?\)$'),
    (dict(frozen_stage=1, zzz=2), TypeError, r': frozen_stage \(did you mean frozen_stages\?\); zzz$'),
])
def test_bad_configuration(cls, kwargs, error, pattern):
    args = dict(SMALL)
    if 'arch' in kwargs or 'embed_dims' in kwargs:
        args = dict(drop_path_rate=0.0, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), embed_dims=24)
    args.update(kwargs)
    if 'arch' in kwargs:
        del args['embed_dims'], args['depths'], args['num_heads']
    with pytest.raises(error, match=pattern):
        cls(**args)


def test_version_specific_options():
    with pytest.raises(ValueError, match='pretrained_window_sizes is a SwinTransformerV2 option'):
        SwinTransformer(**SMALL, pretrained_window_sizes=[8, 8, 8, 8])
    with pytest.raises(ValueError, match='qk_scale is not used by SwinTransformerV2'):
        SwinTransformerV2(**SMALL, qk_scale=0.1)
    with pytest.raises(ValueError, match=r'pretrained_window_sizes must be 0 \(none\) or >= 2'):
        SwinTransformerV2(**SMALL, pretrained_window_sizes=[1, 8, 8, 8])
    with pytest.raises(TypeError, match=r'^SwinTransformerV2 got unexpected argument\(s\): pretrained_window_size '
                                        r'\(did you mean pretrained_window_sizes\?\)$'):
        SwinTransformerV2(**SMALL, pretrained_window_size=[8, 8, 8, 8])


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('x,pattern', [
    (torch.zeros(3, 64, 64), r'expects images as a \(B, C, H, W\) tensor, got \(3, 64, 64\)'),
    (torch.zeros(1, 1, 3, 64, 64), r'\(B, C, H, W\)'),
    (torch.zeros(1, 1, 64, 64), r'in_channels=3, got an input with 1 channels'),
    (torch.zeros(0, 3, 64, 64), r'empty batch'),
    (torch.zeros(1, 3, 0, 64), r'got an empty image \(shape \(1, 3, 0, 64\)\)'),
    ([1, 2, 3], r'got list'),
])
def test_bad_input(cls, x, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**SMALL)(x)


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('x,pattern', [
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r'expects floating-point images .*, got torch.uint8'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.float16),
     r'has torch.float32 parameters and got a torch.float16 input: .* or run under torch.autocast'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.float64), r'has torch.float32 parameters and got a torch.float64 input'),
])
def test_bad_input_dtype(cls, x, pattern):
    with pytest.raises(TypeError, match=pattern):
        cls(**SMALL)(x)


@pytest.mark.parametrize('cls', BACKBONES)
def test_input_dtypes_that_run(cls):
    """An input in the parameters' dtype, or any floating dtype under autocast, runs."""
    model = cls(**SMALL).eval()
    with torch.no_grad():
        assert model.double()(torch.zeros(1, 3, 64, 64, dtype=torch.float64))[0].dtype == torch.float64
        model.float()
        with torch.autocast('cpu', torch.bfloat16):
            assert model(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_non_finite_input_is_not_hidden(cls, bad):
    """Documented behaviour: NaN/Inf pixels make the outputs non-finite (they are never masked into
    finite values); clean images stay finite."""
    model = cls(**SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 10, 10] = bad
    with torch.no_grad():
        outs = model(x)
    for out in outs:
        assert torch.isfinite(out[0]).all()
        assert not torch.isfinite(out[1]).all()
