"""torch.compile: one graph without breaks, and compiled outputs equal to eager ones."""
import warnings

import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2

TINY = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_no_graph_breaks(cls):
    model = cls(**TINY).eval()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 61, 75))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_compiled_equals_eager(cls):
    torch.manual_seed(0)
    model = cls(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 3, 61, 75)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected, got = model(x), compiled(x)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4
