"""Which kernels the backbones reach: inference attention must run in SDPA's fused CPU kernel (the math
fallback is several times slower), whatever the batch, the shift and the version."""
import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2

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
