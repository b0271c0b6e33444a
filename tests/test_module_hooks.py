"""Tools that work through the layers as modules see mmswin's layers as they see mmdet's: forward hooks and
pre-hooks (feature extraction, pruning) and TorchScript tracing (mmengine's FLOP counter)."""
import pytest
import torch
from mmengine.analysis import get_model_complexity_info
from torch import nn
from torch.nn.utils import prune

from mmswin.checkpoint import load_pretrained
from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import SMALL


def _mmdet_pair(tmp_path):
    """mmdet's Swin and mmswin's with mmdet's weights, both in eval mode."""
    from mmdet.models.backbones import swin as mmdet_swin
    torch.manual_seed(0)
    theirs = mmdet_swin.SwinTransformer(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                        drop_path_rate=0.0)
    theirs.init_weights()
    theirs.eval()  # (mmdet's train() returns None)
    torch.save(theirs.state_dict(), tmp_path / 'mmdet.pth')
    ours = SwinTransformer(**SMALL)
    load_pretrained(ours, str(tmp_path / 'mmdet.pth'))
    return theirs, ours.eval()


# mmswin's layer and mmdet's of the same place in the first block
LAYERS = {'qkv': ('layers.0.blocks.0.attn.qkv', 'stages.0.blocks.0.attn.w_msa.qkv'),
          'proj': ('layers.0.blocks.0.attn.proj', 'stages.0.blocks.0.attn.w_msa.proj'),
          'fc1': ('layers.0.blocks.0.mlp.fc1', 'stages.0.blocks.0.ffn.layers.0.0'),
          'act': ('layers.0.blocks.0.mlp.act', 'stages.0.blocks.0.ffn.layers.0.1'),
          'fc2': ('layers.0.blocks.0.mlp.fc2', 'stages.0.blocks.0.ffn.layers.1'),
          'norm1': ('layers.0.blocks.0.norm1', 'stages.0.blocks.0.norm1'),
          'norm2': ('layers.0.blocks.0.norm2', 'stages.0.blocks.0.norm2')}


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_forward_hooks_see_and_change_the_layers_as_in_mmdet(tmp_path, grad):
    """Each layer's hook runs once per forward with the input mmdet's layer gets, and what a hook returns is
    what the model uses: halving fc1's and qkv's outputs changes both models' outputs alike."""
    theirs, ours = _mmdet_pair(tmp_path)
    x = torch.randn(1, 3, 64, 96)
    seen = {'ours': {}, 'theirs': {}}

    def record(side, name, halve):
        def hook(module, args, output):
            seen[side].setdefault(name, []).append(args[0].detach().clone())
            return output / 2 if halve else None
        return hook

    for side, model, index in (('ours', ours, 0), ('theirs', theirs, 1)):
        modules = dict(model.named_modules())
        for name, paths in LAYERS.items():
            modules[paths[index]].register_forward_hook(record(side, name, name in ('qkv', 'fc1')))
    with torch.set_grad_enabled(grad):
        if grad:
            ours.train()
            theirs.train()
        outs, refs = ours(x), theirs(x)
    for name in LAYERS:
        assert len(seen['ours'][name]) == len(seen['theirs'][name]) == 1, name
        mine, theirs_in = seen['ours'][name][0], seen['theirs'][name][0]
        assert (mine.reshape(theirs_in.shape) - theirs_in).abs().max() <= 1e-5, name
    for out, ref in zip(outs, refs, strict=True):
        assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_pre_hooks_and_pruning_train(cls):
    """``torch.nn.utils.prune`` recomputes a weight in a forward pre-hook: pruned layers train step after step,
    their masked weights stay zero in the outputs, and the gradients reach ``weight_orig``."""
    torch.manual_seed(0)
    model = cls(**SMALL).train()
    fc1 = model.layers[0].blocks[0].mlp.fc1
    prune.l1_unstructured(fc1, 'weight', amount=0.5)
    x = torch.randn(1, 3, 64, 96)
    for _ in range(2):
        model.zero_grad()
        sum(o.sum() for o in model(x)).backward()
        assert fc1.weight_orig.grad is not None and torch.isfinite(fc1.weight_orig.grad).all()
        assert (fc1.weight_orig.grad[fc1.weight_mask == 0] == 0).all()
    dense = cls(**SMALL).train()
    dense.load_state_dict({k.replace('weight_orig', 'weight'): v for k, v in model.state_dict().items()
                           if not k.endswith('weight_mask')})
    dense.layers[0].blocks[0].mlp.fc1.weight.data.mul_(fc1.weight_mask)
    with torch.no_grad():
        for out, ref in zip(model.eval()(x), dense.eval()(x), strict=True):
            assert (out - ref).abs().max() <= 1e-5


def test_mmengines_flop_count_equals_mmdets(tmp_path):
    """mmengine's ``get_model_complexity_info`` (mmdet's and mmseg's ``get_flops`` tools) traces the model with
    TorchScript: it counts the same FLOPs and parameters for mmswin's backbone as for mmdet's."""
    theirs, ours = _mmdet_pair(tmp_path)
    counts = [get_model_complexity_info(model, input_shape=(3, 64, 96), show_table=False, show_arch=False)
              for model in (ours, theirs)]
    assert counts[0]['flops'] == counts[1]['flops'] > 0
    assert counts[0]['params'] == counts[1]['params']


def test_hooked_and_traced_models_give_the_fused_outputs():
    """The module-by-module path that hooks and tracing take computes the fused path's values."""
    torch.manual_seed(0)
    for cls in (SwinTransformer, SwinTransformerV2):
        model = cls(**SMALL).eval()
        x = torch.randn(2, 3, 96, 128)
        with torch.no_grad():
            fused = model(x)
            handle = model.layers[1].blocks[1].mlp.act.register_forward_pre_hook(lambda m, args: None)
            hooked = model(x)
            handle.remove()
            traced = torch.jit.trace(model, x, check_trace=False)(x)
        for a, b, c in zip(fused, hooked, traced, strict=True):
            assert (a - b).abs().max() <= 1e-5 and (a - c).abs().max() <= 1e-5
        assert isinstance(model.layers[1].blocks[1].mlp.act, nn.GELU)
