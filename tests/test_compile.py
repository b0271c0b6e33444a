"""torch.compile: one graph without breaks, and compiled outputs equal to eager ones."""
import os
import warnings

import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2

TINY = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('training', [False, True])
def test_no_graph_breaks(cls, precision, training):
    """One graph in inference and training, also under CPU bf16 autocast (where the products choose their
    kernels from the CPU's capabilities and ``MMSWIN_BF16_MATMUL``)."""
    model = cls(**TINY).train(training)
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch.set_grad_enabled(training), torch.autocast(
            'cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
        warnings.simplefilter('ignore')
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 61, 75))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def perturbed_and_compiled(cls, training: bool) -> tuple:
    """A tiny model with non-trivial weights, its compiled form and an input of odd size."""
    torch.manual_seed(0)
    model = cls(**TINY).train(training)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch._dynamo.reset()
    return model, torch.compile(model, dynamic=False), torch.randn(1, 3, 61, 75)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_compiled_equals_eager(cls):
    model, compiled, x = perturbed_and_compiled(cls, training=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected, got = model(x), compiled(x)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_compiled_training_equals_eager(cls):
    """Outputs and parameter gradients of a compiled training step equal the eager ones."""
    model, compiled, x = perturbed_and_compiled(cls, training=True)
    results = []
    for fn in (model, compiled):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            outs = fn(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
        results.append(([o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (eager_outs, eager_grads), (outs, grads) = results
    for a, b in zip(eager_outs, outs, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
    assert eager_grads.keys() == grads.keys()
    for name, g in eager_grads.items():
        assert (g - grads[name]).abs().max() <= 1e-4 * max(1.0, g.abs().max().item()), name


def test_inductor_tail_loops_are_scalar_unless_kept():
    """Importing mmswin turns off inductor's vectorized loop tails (their faulty store broke compiled
    training, see mmswin.compile_workarounds); MMSWIN_INDUCTOR_TAIL_VEC=1 keeps inductor's default."""
    import subprocess
    import sys

    from torch._inductor import config
    assert config.cpp.enable_loop_tail_vec is False
    code = 'import mmswin; from torch._inductor import config; print(config.cpp.enable_loop_tail_vec)'
    kept = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                          env={**os.environ, 'MMSWIN_INDUCTOR_TAIL_VEC': '1'})
    assert kept.stdout.strip() == 'True'
