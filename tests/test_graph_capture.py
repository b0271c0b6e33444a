"""Graph capture (torch.export, TorchScript tracing) records the model's values and leaves nothing behind: the
index and mask caches stay real tensors, and mmswin's kernels and oneDNN calls, which tracers do not record, do
not run while a graph is recorded."""
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import SMALL, with_visible_bias
from .test_fast_paths import clear_geometry_caches


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().reshape(1, -1), b.float().reshape(1, -1)).item()


def test_export_leaves_the_caches_real():
    """A ``torch.export`` that is the first call after the caches were emptied records the model's outputs, and
    eager forwards after it, of that model and of a new one, give the outputs they gave before."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    for cls in (SwinTransformer, SwinTransformerV2):
        model = with_visible_bias(cls(**SMALL)).eval()
        with torch.no_grad():
            before = model(x)
        clear_geometry_caches()
        for block in (b for stage in model.layers for b in stage.blocks):
            block.attn._bias_cache = None
        exported = torch.export.export(model, (x,))
        with torch.no_grad():
            after, recorded = model(x), exported.module()(x)
            fresh = cls(**SMALL).eval()
            fresh.load_state_dict(model.state_dict())
            new = fresh(x)
        for a, b, c, d in zip(before, after, recorded, new, strict=True):
            assert torch.equal(a, b) and torch.equal(a, d)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_tracing_checks_pass_with_empty_caches():
    """``torch.jit.trace``'s own check (a second trace compared with the first) passes where the caches start empty:
    while tracing, the indices and masks are built in the graph on every call, not taken from the caches."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    for cls in (SwinTransformer, SwinTransformerV2):
        model = with_visible_bias(cls(**SMALL)).eval()
        clear_geometry_caches()
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
            for a, b in zip(model(x), traced(x), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_tracing_under_bf16_autocast_records_the_model():
    """``torch.jit.trace`` under CPU bf16 autocast records PyTorch's operators (not mmswin's kernels, which it
    cannot record): the traced model runs, first call or later, and gives the model's outputs to bf16's rounding,
    as the eager bf16 forward does (V2's operators in bf16 round more than its kernels)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    for cls, least in ((SwinTransformer, 0.9999), (SwinTransformerV2, 0.998)):
        model = with_visible_bias(cls(embed_dims=96, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                                      drop_path_rate=0.0)).eval()
        with torch.no_grad():
            reference = model(x)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                traced = torch.jit.trace(model, x, check_trace=False)
                eager, replayed = model(x), traced(x)
        for a, b, ref in zip(eager, replayed, reference, strict=True):
            assert a.shape == b.shape == ref.shape and torch.isfinite(b).all()
            assert _cosine(a, ref) >= least and _cosine(b, ref) >= least
