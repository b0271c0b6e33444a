"""Both backbones under autocast: finite outputs and gradients, close to fp32; V2 safe in fp16."""
import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models.attention import CosineWindowAttention

TINY = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_outputs_and_gradients(cls, dtype):
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4)
    with torch.no_grad():  # off V2's zero-initialised post-norms, so every block matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast('cpu', dtype=dtype):
        outs = model(x)
    for out, r in zip(outs, ref):
        assert torch.isfinite(out).all()
        assert F.cosine_similarity(out.float().flatten(), r.flatten(), dim=0) > 0.99
    sum(o.float().square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_v2_cosine_attention_does_not_overflow_in_fp16():
    """Large activations: |q|^2 exceeds fp16's range, the normalised logits must not."""
    attn = CosineWindowAttention(8, 2, 4)
    q = torch.full((1, 2, 16, 4), 300.0, dtype=torch.float16)
    k = torch.full((1, 2, 16, 4), -300.0, dtype=torch.float16)
    q_scaled, k_unit, scale = attn.scaled_qk(q, k)
    logits = (q_scaled @ k_unit.transpose(-2, -1)).float() * scale
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, torch.full_like(logits, -10.0), atol=0.05)  # cos = -1, scale = 10
