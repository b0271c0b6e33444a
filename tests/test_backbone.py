"""Backbone behaviour: presets, shapes at any size, options that must really work."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmswin.models import ARCH_ZOO, SwinTransformer, SwinTransformerV2
from mmswin.models import windows

from .conftest import SMALL
from .test_fast_paths import FUSED, attention_kernels

BACKBONES = [SwinTransformer, SwinTransformerV2]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('arch', list(ARCH_ZOO))
def test_preset_parameter_counts_equal_official(golden_index, arch):
    counts = golden_index['param_counts']
    assert n_params(SwinTransformer(arch=arch, window_size=7)) == counts[f'v1-{arch}-w7']
    assert n_params(SwinTransformerV2(arch=arch, window_size=8)) == counts[f'v2-{arch}-w8']


def test_arch_aliases_and_explicit_override():
    assert n_params(SwinTransformer(arch='b')) == n_params(SwinTransformer(arch='base'))
    model = SwinTransformer(arch='small', embed_dims=48)
    assert model.embed_dims == 48 and model.depths == (2, 2, 18, 2)
    # no arch: mmdet's defaults (Swin-T)
    assert SwinTransformer().depths == (2, 2, 6, 2) and SwinTransformer().embed_dims == 96


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('hw', [(511, 511), (112, 137), (97, 131), (32, 32), (4, 7), (4, 4), (3, 3), (2, 64), (1, 1)])
def test_output_shapes_any_size(cls, hw):
    model = cls(**SMALL, window_size=7).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    h, w = -(-hw[0] // 4), -(-hw[1] // 4)
    for i, out in enumerate(outs):
        assert out.shape == (2, 24 * 2 ** i, h, w)
        assert torch.isfinite(out).all()
        h, w = -(-h // 2), -(-w // 2)


@pytest.mark.parametrize('hw', [(511, 511), (112, 137), (97, 131)])
def test_shapes_equal_mmdets(hw):
    from mmdet.models.backbones import swin as mmdet_swin
    ours = SwinTransformer(**SMALL).eval()
    theirs = mmdet_swin.SwinTransformer(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    theirs.eval()  # mmdet's train() returns None, so no chaining
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        assert [o.shape for o in ours(x)] == [o.shape for o in theirs(x)]


@pytest.mark.parametrize('cls', BACKBONES)
def test_out_indices_and_norms(cls):
    model = cls(**SMALL, out_indices=(1, 3))
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3')
    assert not hasattr(model, 'norm0') and not hasattr(model, 'norm2')
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [48, 192]


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('frozen', [0, 1, 2, 4])
def test_frozen_stages_from_construction(cls, frozen):
    model = cls(**SMALL, frozen_stages=frozen, use_abs_pos_embed=True)

    def check() -> None:
        frozen_mods = [model.patch_embed] + [model.layers[i] for i in range(frozen)] + \
            [getattr(model, f'norm{i}') for i in range(frozen)]
        for m in frozen_mods:
            assert all(not p.requires_grad for p in m.parameters())
            assert all(not sub.training for sub in m.modules())
        assert not model.absolute_pos_embed.requires_grad
        for i in range(frozen, 4):
            assert all(p.requires_grad for p in model.layers[i].parameters())
            assert all(sub.training for sub in model.layers[i].modules())

    check()  # before any train() call: what DDP sees when it wraps the model
    assert model.train() is model
    check()
    outs = model(torch.randn(1, 3, 64, 64))
    if frozen == 4:
        assert not any(o.requires_grad for o in outs)
        return
    sum(o.sum() for o in outs).backward()  # frozen parameters get no gradient
    assert all(p.grad is None for p in model.patch_embed.parameters())
    assert all(p.grad is not None for p in model.layers[3].parameters())


@pytest.mark.parametrize('cls', BACKBONES)
def test_norm_eval_keeps_norms_in_eval_mode(cls):
    model = cls(**SMALL, norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(not m.training for m in norms)
    assert model.layers[0].blocks[0].attn.training  # everything else trains
    model = cls(**SMALL, norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.LayerNorm))


def _outputs_and_grads(model: nn.Module, x: torch.Tensor):
    outs = model(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def _assert_same(a, b, atol: float) -> None:
    outs_a, grads_a = a
    outs_b, grads_b = b
    for x, y in zip(outs_a, outs_b, strict=True):
        assert (x - y).abs().max() <= atol
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert (grads_a[k] - grads_b[k]).abs().max() <= atol * max(1.0, float(grads_a[k].abs().max())), k


def _perturbed(cls, **kwargs):
    torch.manual_seed(0)
    model = cls(**SMALL, **kwargs)
    with torch.no_grad():  # move V2's zero-initialised post-norms and logit scales off their init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize('cls', BACKBONES)
def test_with_cp_same_outputs_and_grads(cls):
    x = torch.randn(2, 3, 75, 101)
    plain = _perturbed(cls, window_size=7)
    ckpt = _perturbed(cls, window_size=7, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    _assert_same(_outputs_and_grads(plain, x), _outputs_and_grads(ckpt, x), atol=1e-6)


@pytest.mark.parametrize('cls', BACKBONES)
def test_sdpa_matches_eager_outputs(cls):
    """fp32 CPU inference with ``use_sdpa`` runs every block's attention in SDPA's fused kernel, without it in
    matmul, softmax, matmul: the same outputs. (Where autograd records, the CPU takes the matmuls either way; the
    gradients through SDPA are checked on CUDA, in ``test_cuda.py``.)"""
    x = torch.randn(2, 3, 75, 101)
    sdpa = _perturbed(cls, window_size=7).eval()
    eager = _perturbed(cls, window_size=7, use_sdpa=False).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert attention_kernels(sdpa, x) == {FUSED: sum(SMALL['depths'])}
    assert attention_kernels(eager, x) == {}
    with torch.no_grad():
        for a, b in zip(sdpa(x), eager(x), strict=True):
            assert (a - b).abs().max() <= 1e-5


def test_drop_path_linear_schedule():
    model = SwinTransformer(**dict(SMALL, drop_path_rate=0.3))
    rates = [blk.drop_path.p for stage in model.layers for blk in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 8).tolist())
    # active in training (random), identity in eval
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), model(x), strict=True))
    model.train()
    with torch.no_grad():
        assert not all(torch.equal(a, b) for a, b in zip(model(x), model(x), strict=True))


def test_absolute_position_embedding_is_interpolated_bicubically():
    """Official detection semantics: ``(1, C, Hp, Wp)`` embedding resized bicubically to the patch
    grid of the input and added before the first stage (mmdet's version of this path crashes)."""
    model = SwinTransformer(**SMALL, use_abs_pos_embed=True, pretrain_img_size=64).eval()
    assert model.absolute_pos_embed.shape == (1, 24, 16, 16)
    seen = {}
    # a copy: in CPU inference the first stage's blocks update this tensor in place
    model.pos_drop.register_forward_hook(lambda m, args, out: seen.update(x=args[0].clone()))
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        model(x)
        embedded = model.patch_embed(x)  # (B, H, W, C)
        pos = torch.nn.functional.interpolate(model.absolute_pos_embed, size=(25, 33), mode='bicubic')
    assert torch.equal(seen['x'], embedded + pos.permute(0, 2, 3, 1))


def test_shift_masks_built_once_per_feature_size():
    model = SwinTransformer(**SMALL).eval()
    windows._shift_mask_parts.cache_clear()
    windows._cached_on_device.cache_clear()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 3, 97, 131))
    # four stages, one feature size each: four masks built, however many blocks and forwards
    assert windows._shift_mask_parts.cache_info().misses == 4
    assert windows._cached_on_device.cache_info().misses == 4


def test_shift_masks_kept_whole_for_the_last_sizes_only():
    """Of each feature size only its four distinct masks stay; whole masks for the last few sizes."""
    windows._cached_on_device.cache_clear()
    masks, kinds = windows._shift_mask_parts((203, 308), (7, 7), (3, 3))
    assert masks.shape == (4, 49, 49) and kinds.shape == (29 * 44,)
    # inner windows, the last column, the last row, the corner
    grid = kinds.view(29, 44)
    assert len({int(k) for k in grid[:-1, :-1].flatten()}) == 1
    assert len({int(grid[0, 0]), int(grid[0, -1]), int(grid[-1, 0]), int(grid[-1, -1])}) == 4
    for h in range(1, 3 * windows.KEPT_MASKS):
        windows.shift_mask((7 * h, 14), (7, 7), (3, 3), torch.device('cpu'))
    assert windows._cached_on_device.cache_info().currsize == windows.KEPT_MASKS


def test_v2_shrinks_window_to_small_feature_maps():
    """Official V2 (``if min(H, W) <= window_size: shift_size = 0; window_size = min(H, W)``): a stage whose
    shorter side is no larger than the window uses square windows of that side and no shift, on both axes."""
    model = SwinTransformerV2(**SMALL, window_size=8)
    stage = model.layers[3]
    assert stage.window_layout(8, 8) == ((8, 8), (0, 0))
    assert stage.window_layout(5, 5) == ((5, 5), (0, 0))
    assert stage.window_layout(20, 30) == ((8, 8), (4, 4))
    assert stage.window_layout(9, 30) == ((8, 8), (4, 4))
    assert stage.window_layout(8, 16) == ((8, 8), (0, 0))
    assert stage.window_layout(16, 8) == ((8, 8), (0, 0))
    assert stage.window_layout(6, 20) == ((6, 6), (0, 0))
    v1 = SwinTransformer(**SMALL, window_size=7).layers[3]
    assert v1.window_layout(5, 5) == ((7, 7), (3, 3))  # V1 detection always pads and shifts


@pytest.mark.parametrize('hw,side', [((8, 16), 8), ((6, 20), 6), ((20, 7), 7)])
def test_v2_small_stage_windows_do_not_mix(hw, side):
    """Without a shift, the square windows of a small V2 stage never mix: its first ``side`` columns (or
    rows) give what they give alone, as a square map of one window (unlike a shift along the long side)."""
    torch.manual_seed(0)
    model = SwinTransformerV2(**SMALL, window_size=8)
    for p in model.parameters():  # off the zero-initialised post-norms, so that the blocks matter
        p.data.add_(torch.randn_like(p) * 0.1)
    stage = model.layers[3].eval()
    x = torch.randn(2, *hw, 192)  # the last stage of SMALL: 24 * 8 channels
    with torch.no_grad():
        whole = stage(x.clone())[0]
        if hw[0] == side:
            alone = stage(x[:, :, :side].clone())[0]
            torch.testing.assert_close(whole[:, :, :side], alone, rtol=1e-5, atol=1e-5)
        else:
            alone = stage(x[:, :side].clone())[0]
            torch.testing.assert_close(whole[:, :side], alone, rtol=1e-5, atol=1e-5)


def test_train_returns_self_and_default_scope_build():
    from mmengine.registry import MODELS
    model = MODELS.build(dict(type='mmswin.SwinTransformerV2', **SMALL))
    assert isinstance(model, SwinTransformerV2)
    assert model.train(False) is model and not model.training


@pytest.mark.parametrize('cls', BACKBONES)
@pytest.mark.parametrize('hw', [(3, 3), (2, 64), (1, 1)])
def test_images_smaller_than_a_patch_are_zero_padded(cls, hw):
    """As the official detection backbone (and mmdet's): padded right/bottom to a whole patch."""
    model = cls(**SMALL).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        small = model(x)
        padded = model(F.pad(x, (0, -hw[1] % 4, 0, -hw[0] % 4)))
    for a, b in zip(small, padded, strict=True):
        assert torch.equal(a, b)


def test_norm_cfg_requires_grad_false_freezes_the_norms():
    """mmcv's ``build_norm_layer`` option: every norm's parameters are frozen, the rest stay trainable."""
    model = SwinTransformerV2(**SMALL, norm_cfg=dict(type='LN', requires_grad=False))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    norms = {f'{name}.{p}' for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for p in ('weight', 'bias')}
    assert len(norms) > 20 and frozen == norms



@pytest.mark.parametrize('norm_cfg', [dict(type='LN', elementwise_affine=False), dict(type='LN', bias=False)],
                         ids=['no-affine', 'no-bias'])
def test_norms_without_weight_or_bias_as_mmdet_builds_them(tmp_path, norm_cfg):
    """``norm_cfg`` options of ``nn.LayerNorm`` that leave a norm without weight or bias: V1 with mmdet's weights
    gives mmdet's outputs, and both versions initialise and train (finite gradients)."""
    from mmdet.models.backbones import swin as mmdet_swin

    from mmswin.checkpoint import load_pretrained
    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    torch.manual_seed(0)
    theirs = mmdet_swin.SwinTransformer(**arch, norm_cfg=norm_cfg)
    theirs.init_weights()
    theirs.eval()  # (mmdet's train() returns None)
    torch.save(theirs.state_dict(), tmp_path / 'mmdet.pth')
    ours = SwinTransformer(**arch, norm_cfg=norm_cfg)
    load_pretrained(ours, str(tmp_path / 'mmdet.pth'))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for out, ref in zip(ours.eval()(x), theirs(x), strict=True):
            assert (out - ref).abs().max() <= 1e-5
    for cls in BACKBONES:
        model = cls(**arch, norm_cfg=norm_cfg)
        model.init_weights()
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert norms and all(m.bias is None for m in norms)
        assert all((m.weight is None) == (not norm_cfg.get('elementwise_affine', True)) for m in norms)
        sum(o.sum() for o in model.train()(x)).backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('act', ['LeakyReLU', 'HSwish', 'HSigmoid', 'Clamp', 'PReLU'])
def test_activations_mmcv_builds_give_mmdets_outputs(tmp_path, act):
    """``act_cfg`` types beyond the GELU (mmcv's and PyTorch's, found as mmcv's ``build_activation_layer`` finds
    them; PReLU with its weights): V1 with mmdet's weights gives mmdet's outputs, and trains."""
    from mmdet.models.backbones import swin as mmdet_swin

    from mmswin.checkpoint import load_pretrained
    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0,
                act_cfg=dict(type=act))
    torch.manual_seed(0)
    theirs = mmdet_swin.SwinTransformer(**arch)
    theirs.init_weights()
    theirs.eval()  # (mmdet's train() returns None)
    torch.save(theirs.state_dict(), tmp_path / 'mmdet.pth')
    ours = SwinTransformer(**arch)
    load_pretrained(ours, str(tmp_path / 'mmdet.pth'))
    assert type(ours.layers[0].blocks[0].mlp.act) is type(theirs.stages[0].blocks[0].ffn.layers[0][1])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for out, ref in zip(ours.eval()(x), theirs(x), strict=True):
            assert (out - ref).abs().max() <= 1e-5
    sum(o.sum() for o in ours.train()(x)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_patch_norm_off_as_mmdet_builds_it(tmp_path):
    """``patch_norm=False`` takes the norms out of the patch embedding and of every patch merging, as in mmdet's
    Swin: the same parameters, mmdet's weights load and give its outputs; the converter's ``meta['arch']``
    rebuilds the model."""
    from mmdet.models.backbones import swin as mmdet_swin

    from mmswin.checkpoint import load_pretrained
    from mmswin.checkpoint.convert import convert_checkpoint
    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0, patch_norm=False)
    torch.manual_seed(0)
    theirs = mmdet_swin.SwinTransformer(**arch)
    theirs.init_weights()
    theirs.eval()  # (mmdet's train() returns None)
    ours = SwinTransformer(**arch)
    assert n_params(ours) == n_params(theirs)
    assert [type(stage.downsample.norm) for stage in ours.layers[:3]] == [nn.Identity] * 3
    path = tmp_path / 'mmdet.pth'
    torch.save(theirs.state_dict(), path)
    load_pretrained(ours, str(path))
    x = torch.randn(1, 3, 64, 96)
    rebuilt_from = convert_checkpoint(str(path))
    rebuilt = SwinTransformer(**rebuilt_from['meta']['arch'])
    rebuilt.load_state_dict(rebuilt_from['state_dict'])
    with torch.no_grad():
        for out, again, ref in zip(ours.eval()(x), rebuilt.eval()(x), theirs(x), strict=True):
            assert (out - ref).abs().max() <= 1e-5 and (again - ref).abs().max() <= 1e-5

def test_strides_longer_than_the_stages_are_taken_as_mmdet_takes_them():
    model = SwinTransformer(**dict(SMALL, depths=(2, 2), num_heads=(1, 2)), out_indices=(0, 1))
    assert len(model.layers) == 2
    assert [o.shape[1] for o in model.eval()(torch.randn(1, 3, 32, 32))] == [24, 48]


@pytest.mark.parametrize('kwargs', [
    dict(patch_size=(4, 4), strides=((4, 4), 2, 2, 2)),
    dict(patch_size=(2, 2), strides=(2, 2, 2, 2)),
    dict(use_abs_pos_embed=True, pretrain_img_size=(64,)),
], ids=['pair-patch', 'pair-patch-int-stride', 'one-entry-size'])
def test_argument_forms_mmdet_documents(kwargs):
    """``patch_size`` as a square pair and ``pretrain_img_size`` as ``(size,)``, as mmdet's Swin takes them:
    the same model, and with mmdet's weights its outputs."""
    from mmdet.models.backbones import swin as mmdet_swin
    arch = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    torch.manual_seed(0)
    if 'patch_size' in kwargs and kwargs['strides'][0] != kwargs['patch_size']:
        theirs = mmdet_swin.SwinTransformer(**arch, patch_size=kwargs['patch_size'][0], strides=kwargs['strides'])
    else:
        theirs = mmdet_swin.SwinTransformer(**arch, **kwargs)
    theirs.init_weights()
    theirs.eval()  # (mmdet's train() returns None)
    ours = SwinTransformer(**arch, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for out, ref in zip(ours.eval()(x), theirs(x), strict=True):
            assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r'patch_size must be a positive int or a square \(p, p\), got \(4, 2\)'):
        SwinTransformer(**arch, patch_size=(4, 2))


def test_pretrained_string_warns_visibly():
    """``pretrained=`` is deprecated with a warning Python shows by default (mmdet's and mmseg's show theirs)."""
    code = ('from mmswin.models import SwinTransformer\n'
            "m = SwinTransformer(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), pretrained='a.pth')\n"
            "assert m.init_cfg == dict(type='Pretrained', checkpoint='a.pth')\n")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert re.search(r'FutureWarning: pretrained is deprecated, use init_cfg=dict\(type="Pretrained"',
                     result.stderr), result.stderr
