"""The fast paths: inference attention runs in SDPA's fused CPU kernel (the math
fallback is several times slower), whatever the batch, the shift and the version."""
import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models.attention import unit_vectors

TINY = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
FUSED = 'aten::_scaled_dot_product_flash_attention_for_cpu'
MATH = 'aten::_scaled_dot_product_attention_math'


def attention_kernels(model: torch.nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    return {e.key: e.count for e in prof.key_averages() if e.key in (FUSED, MATH)}


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
def test_inference_attention_is_fused(cls, batch):
    model = cls(**TINY, window_size=4).eval()
    # 70x90: padded, several windows per stage, so every block of the first stages shifts.
    kernels = attention_kernels(model, torch.randn(batch, 3, 70, 90))
    assert kernels == {FUSED: sum(TINY['depths'])}


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_no_grad_inference_equals_recorded_forward(cls):
    """Without autograd the blocks write GELU and residual sums in place; the result must be bit for bit
    the out-of-place forward's, and the caller's input must stay untouched. (The matmul attention path:
    with a bias that needs gradients SDPA picks a different kernel, which differs in the last bits.)"""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4, use_sdpa=False).eval()
    x = torch.randn(2, 3, 70, 90)
    x_copy = x.clone()
    recorded = model(x)
    assert all(out.requires_grad for out in recorded)
    with torch.no_grad():
        fast = model(x)
    for a, b in zip(recorded, fast):
        assert torch.equal(a, b)
    assert torch.equal(x, x_copy)


def test_v2_unit_vectors_gradients():
    """V2's scaled normalisation has a hand-written backward: gradcheck in fp64, and the same gradients
    as autograd through F.normalize for a batch holding a zero vector (a padding key)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: unit_vectors(a, s), (x, scale))
    assert torch.autograd.gradcheck(lambda a: unit_vectors(a), (x,))

    x = torch.randn(3, 2, 5, 4)
    x[1, 0, 2] = 0
    grad = torch.randn(3, 2, 5, 4)
    scale = torch.rand(2, 1, 1) * 10
    ours = [t.clone().requires_grad_() for t in (x, scale)]
    theirs = [t.clone().requires_grad_() for t in (x, scale)]
    unit_vectors(*ours).backward(grad)
    (torch.nn.functional.normalize(theirs[0], dim=-1) * theirs[1]).backward(grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
