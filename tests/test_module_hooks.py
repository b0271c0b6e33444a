"""Tools that work through the layers as modules see mmswin's layers as they see mmdet's: forward hooks and
pre-hooks (feature extraction, pruning) and TorchScript tracing (mmengine's FLOP counter)."""
import pytest
import torch
from mmengine.analysis import get_model_complexity_info
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from mmswin.checkpoint import load_pretrained
from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import SMALL, with_visible_bias


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
    model = with_visible_bias(cls(**SMALL)).train()
    fc1 = model.layers[0].blocks[0].mlp.fc1
    prune.l1_unstructured(fc1, 'weight', amount=0.5)
    x = torch.randn(1, 3, 64, 96)
    weights = [torch.randn_like(o) for o in model(x)]
    for _ in range(2):
        model.zero_grad()
        sum((o * w).sum() for o, w in zip(model(x), weights)).backward()
        assert fc1.weight_orig.grad is not None and torch.isfinite(fc1.weight_orig.grad).all()
        assert (fc1.weight_orig.grad[fc1.weight_mask == 0] == 0).all()
        assert (fc1.weight_orig.grad[fc1.weight_mask == 1] != 0).float().mean() > 0.9
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
        model = with_visible_bias(cls(**SMALL)).eval()
        x = torch.randn(2, 3, 96, 128)
        with torch.no_grad():
            fused = model(x)
            handle = model.layers[1].blocks[1].mlp.act.register_forward_pre_hook(lambda m, args: None)
            hooked = model(x)
            handle.remove()
            traced = torch.jit.trace(model, x, check_trace=False)(x)
        for a, b, c in zip(fused, hooked, traced, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
        assert isinstance(model.layers[1].blocks[1].mlp.act, nn.GELU)


class _Adapter(nn.Module):
    """A layer wrapped as adapter libraries (LoRA) wrap it: ``base(x) + shift``, with the base layer's
    ``weight`` and ``bias`` still reachable as attributes of the wrapper."""

    def __init__(self, base: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer('shift', shift)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.shift.to(y.dtype)


@pytest.fixture(scope='module')
def swin_t_pair():
    """Swin-T V1 and V2 with drop path off and random norm parameters (V2's start at zero)."""
    torch.manual_seed(0)
    models = {}
    for cls in (SwinTransformer, SwinTransformerV2):
        model = cls(drop_path_rate=0.0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if 'norm' in name:
                    param.normal_(0.5, 0.2)
        models[cls] = model
    return models


@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('layer', ['attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2', 'norm1', 'norm2'])
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_replaced_layers_are_called(swin_t_pair, cls, layer, precision, training):
    """A layer replaced by a wrapper that adds to its output (an adapter) is called, as in mmdet's Swin, by every
    path, fused ones included: the outputs are those of the plain model with that shift in the layer's bias, and
    the wrapped layer's weight gets the gradient it gets there. V2's qkv layer has no bias of its own (``q_bias``
    and ``v_bias`` are added to its output): the shift of the queries and values goes into those."""
    import copy
    plain = swin_t_pair[cls]
    wrapped, shifted = copy.deepcopy(plain), copy.deepcopy(plain)
    owner, attr = f'layers.1.blocks.0.{layer}'.rsplit('.', 1)
    base = getattr(wrapped.get_submodule(owner), attr)
    shift = torch.linspace(-1.5, 1.5, base.weight.shape[0])
    if cls is SwinTransformerV2 and layer == 'attn.qkv':  # keys without a shift, as without a bias
        q_shift, k_shift, v_shift = shift.chunk(3)
        k_shift.zero_()
        with torch.no_grad():
            shifted.get_submodule(owner).q_bias.add_(q_shift)
            shifted.get_submodule(owner).v_bias.add_(v_shift)
    else:
        with torch.no_grad():
            getattr(shifted.get_submodule(owner), attr).bias.add_(shift)
    setattr(wrapped.get_submodule(owner), attr, _Adapter(base, shift))
    expected = shifted
    x = torch.randn(1, 3, 64, 96)
    results = {}
    for model in (wrapped, shifted, plain):
        model.train(training)
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'), torch.set_grad_enabled(training):
            outs = model(x)
        if training:
            sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
        results[model] = torch.cat([o.detach().float().reshape(-1) for o in outs])
    out, ref = results[wrapped], results[expected]
    effect = (results[shifted] - results[plain]).norm()
    assert effect > 0.01 * ref.norm()
    if precision == 'fp32':
        assert (out - ref).abs().max() <= 1e-4
    else:  # bf16 roundings of paths that differ: far below the shift's effect
        assert (out - ref).norm() <= 0.1 * effect
    if training:
        grad = base.weight.grad
        ref_grad = getattr(expected.get_submodule(owner), attr).weight.grad
        cosine = F.cosine_similarity(grad.reshape(1, -1), ref_grad.reshape(1, -1)).item()
        assert cosine >= (0.99999 if precision == 'fp32' else 0.999)


@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_output_norm_hooks_run_in_every_precision(swin_t_pair, precision, training):
    """A forward hook on an output norm (``norm{i}``) runs once per forward, in the compiled kernels' precision
    (bf16) too, and what it returns becomes that output."""
    model = swin_t_pair[SwinTransformer].train(training)
    calls = []

    def zero(module, args, output):
        calls.append(module)
        return torch.zeros_like(output)

    handle = model.norm2.register_forward_hook(zero)
    try:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'), torch.set_grad_enabled(training):
            outs = model(torch.randn(1, 3, 64, 96))
    finally:
        handle.remove()
    assert calls == [model.norm2]
    assert outs[2].shape == (1, 384, 4, 6) and not outs[2].any()
    assert all(out.abs().sum() > 0 for i, out in enumerate(outs) if i != 2)


def test_hooks_on_chunked_layers_see_whole_tensors():
    """Layers whose inference runs in chunks on the CPU (the patch embedding's norm, the merges, the output norms)
    are called once per forward with the whole tensor where a hook sees them, as in mmdet's Swin."""
    torch.manual_seed(0)
    model = SwinTransformer(**SMALL).eval()
    names = ['patch_embed.norm', 'layers.0.downsample.norm', 'layers.0.downsample.reduction', 'norm0', 'norm1']
    calls = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: calls[name].append(tuple(args[0].shape))) for name in names]
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 512, 512))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {'patch_embed.norm': [(2, 128, 128, 24)], 'layers.0.downsample.norm': [(2, 64, 64, 96)],
                     'layers.0.downsample.reduction': [(2, 64, 64, 96)], 'norm0': [(2, 128, 128, 24)],
                     'norm1': [(2, 64, 64, 48)]}


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('layer', ['attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'])
def test_layers_replaced_by_containers_are_called(swin_t_pair, layer, precision):
    """A linear layer replaced by a low-rank pair in an ``nn.Sequential`` (no ``weight`` of its own) is called, in
    inference and training: the outputs are those of the model with the product of the pair as the weight."""
    import copy
    model, merged = copy.deepcopy(swin_t_pair[SwinTransformer]), copy.deepcopy(swin_t_pair[SwinTransformer])
    owner, attr = f'layers.1.blocks.0.{layer}'.rsplit('.', 1)
    base = getattr(model.get_submodule(owner), attr)
    down, up = nn.Linear(base.in_features, 8, bias=False), nn.Linear(8, base.out_features)
    setattr(model.get_submodule(owner), attr, nn.Sequential(down, up))
    with torch.no_grad():
        target = getattr(merged.get_submodule(owner), attr)
        target.weight.copy_(up.weight @ down.weight)
        target.bias.copy_(up.bias)
    x = torch.randn(1, 3, 64, 96)
    for training in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'), torch.set_grad_enabled(training):
            outs, refs = model.train(training)(x), merged.train(training)(x)
        for out, ref in zip(outs, refs, strict=True):
            if precision == 'fp32':
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            else:
                assert F.cosine_similarity(out.float().reshape(1, -1), ref.float().reshape(1, -1)).item() >= 0.999


def test_stochastic_depth_replaced_by_identity_trains():
    """Blocks whose ``drop_path`` a user replaced (``nn.Identity``, as the official models have at rate 0) train
    and infer with the values of rate 0."""
    import copy
    torch.manual_seed(0)
    model = SwinTransformer(**SMALL)
    reference = copy.deepcopy(model)
    for stage in model.layers:
        for block in stage.blocks:
            block.drop_path = nn.Identity()
    x = torch.randn(1, 3, 64, 96)
    for training in (False, True):
        with torch.set_grad_enabled(training):
            for out, ref in zip(model.train(training)(x), reference.train(training)(x), strict=True):
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_v2_position_bias_follows_its_layers_in_inference(swin_t_pair):
    """V2's position bias, kept between inference calls, is computed again where a hook sees ``cpb_mlp`` and where
    one of its layers was replaced: the outputs are those of a model that kept nothing."""
    import copy
    model = copy.deepcopy(swin_t_pair[SwinTransformerV2]).eval()
    attn = model.layers[1].blocks[0].attn
    x = torch.randn(1, 3, 64, 96)

    def fresh_outputs():
        other = copy.deepcopy(model)
        for block in (b for stage in other.layers for b in stage.blocks):
            block.attn._bias_cache = None
        return other(x)

    with torch.no_grad():
        plain = model(x)
        handle = attn.cpb_mlp.register_forward_hook(lambda m, args, out: out * 2)
        hooked = model(x)
        handle.remove()
        assert not torch.equal(hooked[1], plain[1])
        for out, ref in zip(model(x), plain, strict=True):
            assert torch.equal(out, ref)
        attn.cpb_mlp[1] = nn.GELU()
        swapped = model(x)
        assert not torch.equal(swapped[1], plain[1])
        for out, ref in zip(swapped, fresh_outputs(), strict=True):
            assert torch.equal(out, ref)


def test_dynamic_quantisation_replaces_every_linear_layer_and_matches_mmdet(tmp_path):
    """``quantize_dynamic(model, {nn.Linear})`` replaces every linear layer of both backbones (V2's position bias
    MLP included), and the int8 layers are what the forward runs. With the layers that mmdet's Swin builds as
    ``nn.Linear`` quantised in both, mmswin gives mmdet's quantised outputs."""
    import copy

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    for cls in (SwinTransformer, SwinTransformerV2):
        model = with_visible_bias(cls(**SMALL)).eval()
        with torch.no_grad():  # V2's q_bias and v_bias, added to the int8 qkv layer's output, start at zero
            for name, p in model.named_parameters():
                if name.endswith(('q_bias', 'v_bias')):
                    p.normal_(0.0, 0.5)
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        quantised = quantize_dynamic(copy.deepcopy(model), {nn.Linear})
        assert [name for name, m in quantised.named_modules() if isinstance(m, DynamicLinear)] == linears
        assert not any(isinstance(m, nn.Linear) for m in quantised.modules())
        with torch.no_grad():
            for ref, out in zip(model(x), quantised(x), strict=True):
                cosine = F.cosine_similarity(out.reshape(1, -1), ref.reshape(1, -1)).item()
                assert (out - ref).abs().max() > 1e-3 and cosine >= 0.98
    theirs, ours = _mmdet_pair(tmp_path)
    names = [name for name, m in theirs.named_modules() if type(m) is nn.Linear]
    assert len(names) == 19  # qkv and proj of 8 blocks, 3 merges' reductions; its MLPs hold mmcv's Linear
    theirs_q = quantize_dynamic(copy.deepcopy(theirs), {name: default_dynamic_qconfig for name in names})
    ours_q = quantize_dynamic(copy.deepcopy(ours), {name.replace('stages.', 'layers.').replace('attn.w_msa.', 'attn.'):
                                                    default_dynamic_qconfig for name in names})
    assert sum(isinstance(m, DynamicLinear) for m in ours_q.modules()) == len(names)
    with torch.no_grad():
        outs, plain = ours_q(x), ours(x)
        for out, ref in zip(outs, theirs_q(x), strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (outs[-1] - plain[-1]).abs().max() > 1e-2  # the int8 layers ran


def test_a_patched_and_restored_forward_leaves_the_fused_passes(monkeypatch):
    """A layer class whose forward a tool patches (a profiler, an adapter library) is called while patched, and
    once the forward is restored the model takes the fused passes again."""
    from mmswin.models.layers import Mlp, observed
    model = SwinTransformer(**SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    assert not observed(model)
    calls, original = [], Mlp.forward
    with monkeypatch.context() as patch:
        patch.setattr(Mlp, 'forward', lambda self, t: calls.append(t.shape) or original(self, t))
        assert observed(model)
        with torch.no_grad():
            model(x)
    assert len(calls) == sum(SMALL['depths'])
    assert not observed(model)
