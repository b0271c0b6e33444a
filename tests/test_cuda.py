"""On a CUDA device: the official outputs, the CPU's values and gradients in fp32, and finite, close
results under fp16 and bf16 autocast. These tests need a GPU and are skipped without one."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models.attention import CosineWindowAttention

from .conftest import DATA, SMALL, golden_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')
TINY = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 products in fp32: TF32 would round the inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pretrained(name: str) -> dict:
    return dict(type='Pretrained', checkpoint=str(DATA / name))


def _perturbed(cls, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny model with every parameter off its initialisation (V2's post-norms start at zero)."""
    torch.manual_seed(seed)
    model = cls(**TINY, window_size=4, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('case', ['224x224', '150x190', '352x352_window12'])
def test_v1_matches_official_on_cuda(v1_expected, case, use_sdpa):
    window = 12 if case.endswith('window12') else 7
    model = SwinTransformer(**SMALL, window_size=window, use_sdpa=use_sdpa,
                            init_cfg=_pretrained('v1_official_cls.pth'))
    model.init_weights()
    model.to(CUDA).eval()
    with torch.no_grad():
        outs = model(golden_input(v1_expected['cases'][case]).to(CUDA))
    for out, ref in zip(outs, v1_expected['cases'][case]['outs'], strict=True):
        assert out.shape == ref.shape
        assert (out.cpu() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('case', ['512x512', '768x768_window12_from8'])
def test_v2_matches_official_on_cuda(v2_expected, case, use_sdpa):
    kwargs = dict(window_size=12, pretrained_window_sizes=[8, 8, 8, 8]) if 'window12' in case else {}
    model = SwinTransformerV2(**SMALL, use_sdpa=use_sdpa, **kwargs, init_cfg=_pretrained('v2_official_cls.pth'))
    model.init_weights()
    model.to(CUDA).eval()
    with torch.no_grad():
        outs = model(golden_input(v2_expected['cases'][case]).to(CUDA))
    for out, stage in zip(outs, v2_expected['cases'][case]['stages'], strict=True):
        # the output norms are at their initialisation (weight 1, bias 0): a plain layer norm of the stage
        ref = F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2]).permute(0, 3, 1, 2)
        assert out.shape == ref.shape
        assert (out.cpu() - ref).abs().max() <= 1e-4


def _step(model: torch.nn.Module, x: torch.Tensor):
    """Outputs, input gradient and parameter gradients of one training step (a weighted sum of the
    outputs, so that every element's gradient differs)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    outs = model(x)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return [o.detach() for o in outs], x.grad, grads


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('with_cp', [False, True], ids=['plain', 'with_cp'])
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_training_step_on_cuda_equals_cpu(cls, with_cp, use_sdpa):
    """Outputs and every gradient (input, weights, position-bias table or CPB MLP) equal the CPU's in
    fp32, on a padded, shifted input of two images."""
    x = torch.randn(2, 3, 61, 75, generator=torch.Generator().manual_seed(1))
    cpu_model = _perturbed(cls, use_sdpa=use_sdpa).train()
    cuda_model = _perturbed(cls, use_sdpa=use_sdpa, with_cp=with_cp).to(CUDA).train()
    ref_outs, ref_dx, ref_grads = _step(cpu_model, x)
    outs, dx, grads = _step(cuda_model, x.to(CUDA))
    for out, ref in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx.cpu(), ref_dx, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].cpu(), ref, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize('use_sdpa', [True, False], ids=['sdpa', 'eager'])
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_inference_on_cuda_never_waits_for_the_device(cls, use_sdpa):
    """An inference forward only queues kernels: no copy to the host and no synchronisation (the host
    would wait for the device, and CUDA graph capture fails on one)."""
    model = _perturbed(cls, use_sdpa=use_sdpa).to(CUDA).eval()
    x = torch.randn(2, 3, 61, 75, device=CUDA)  # padded and shifted
    with torch.no_grad():
        expected = model(x)  # builds the per-size window indices and masks (copied to the GPU once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            outs = model(x)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_autocast_on_cuda(cls, dtype):
    """Inference and a training step under CUDA autocast: outputs finite and close to the fp32 outputs
    (cosine >= 0.999 per output), every gradient finite."""
    model = _perturbed(cls).to(CUDA)
    x = torch.randn(2, 3, 61, 75, generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        ref = model.eval()(x)
        with torch.autocast('cuda', dtype=dtype):
            outs = model(x)
    for out, r in zip(outs, ref, strict=True):
        # CUDA autocast runs the output layer norms in fp32 (CPU autocast leaves them in bf16)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert F.cosine_similarity(out.float().flatten(), r.flatten(), dim=0) >= 0.999
    model.train()
    with torch.autocast('cuda', dtype=dtype):
        outs = model(x)
    for out, r in zip(outs, ref, strict=True):
        assert F.cosine_similarity(out.float().flatten(), r.flatten(), dim=0) >= 0.999
    sum(o.float().square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_v2_cosine_attention_is_finite_in_fp16_with_large_activations():
    """Tokens of norm ~1e4: their squared lengths overflow fp16, V2's normalised logits must not."""
    torch.manual_seed(0)
    attn = CosineWindowAttention(32, 4, 4).to(CUDA)
    x = (torch.randn(3, 16, 32) * 2000).to(CUDA)
    with torch.no_grad():
        queries = F.linear(x, attn.qkv.weight[:32]).view(3, 16, 4, 8)
        assert queries.square().sum(-1).max() > torch.finfo(torch.float16).max  # the case it is about
        ref = attn(x, (4, 4))
        with torch.autocast('cuda', dtype=torch.float16):
            out = attn(x, (4, 4))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) >= 0.999
    assert math.isfinite(ref.abs().max().item())
