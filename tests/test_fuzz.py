"""Property-based test over input sizes, batch sizes, both backbones and out_indices."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmswin.models import SwinTransformer, SwinTransformerV2

TINY = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)
MODELS = {}


def _model(cls, out_indices, window):
    key = (cls, out_indices, window)
    if key not in MODELS:
        torch.manual_seed(0)
        MODELS[key] = cls(**TINY, out_indices=out_indices, window_size=window).eval()
    return MODELS[key]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 300), w=st.integers(1, 300), batch=st.integers(1, 3),
       cls=st.sampled_from([SwinTransformer, SwinTransformerV2]),
       out_indices=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True).map(lambda v: tuple(sorted(v))),
       window=st.sampled_from([4, 7, 8]))
def test_any_input(h, w, batch, cls, out_indices, window):
    model = _model(cls, out_indices, window)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    with torch.no_grad():  # sizes under a patch too: zero-padded to one
        outs = model(x)
        again = model(x)
    assert len(outs) == len(out_indices)
    for i, out, rep in zip(out_indices, outs, again, strict=True):
        scale = 4 * 2 ** i
        assert out.shape == (batch, 16 * 2 ** i, -(-h // scale), -(-w // scale))
        assert torch.isfinite(out).all()
        assert torch.equal(out, rep)  # eval mode is deterministic (drop path off)
