"""Stochastic depth in CPU training computes a block's branch only for the samples that keep it: the same
random numbers, outputs and gradients as computing every branch and multiplying the dropped ones by zero."""
from typing import List

import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models import cpu_kernels, layers
from mmswin.models.blocks import SwinBlock

from .conftest import with_visible_bias

TINY = dict(embed_dims=32, depths=(2, 2), num_heads=(2, 4), strides=(4, 2), out_indices=(0, 1), window_size=4)


def training_step(model: torch.nn.Module, x: torch.Tensor, seed: int, autocast: bool) -> tuple:
    """Outputs, input gradient, parameter gradients of one step from ``seed``, and the next random number."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        outs = model(x)
    sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    return outs, x.grad, {name: p.grad for name, p in model.named_parameters()}, torch.rand(1)


def norm_parameters(model: torch.nn.Module) -> set:
    """The names of the parameters of ``model``'s layer norms."""
    return {f'{prefix}.{name}' for prefix, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
            for name, _ in m.named_parameters(recurse=False)}


def every_branch(monkeypatch) -> None:
    """Makes every residual compute its branch for all samples (the plain path)."""
    monkeypatch.setattr(layers, 'skips_dropped_branches', lambda *args: False)


def kept_per_branch(model: torch.nn.Module, batch: int, seed: int) -> List[int]:
    """How many samples keep each branch (attention, MLP, block after block) with ``seed``, drawn as the
    blocks draw them when nothing else in a step takes random numbers."""
    torch.manual_seed(seed)
    kept = []
    for stage in model.layers:
        for blk in stage.blocks:
            for _ in range(2):
                p = blk.drop_path.p
                kept.append(batch if p == 0 else int(torch.empty(batch).bernoulli_(1 - p).sum()))
    return kept


def branch_batches(model: torch.nn.Module, monkeypatch) -> List[int]:
    """Records the batch of every attention and MLP branch computed, in order."""
    batches = []
    attention, mlp = SwinBlock.window_attention, type(model.layers[0].blocks[0].mlp).forward

    def record_attention(self, x, *args):
        batches.append(x.shape[0])
        return attention(self, x, *args)

    def record_mlp(self, x):
        batches.append(x.shape[0])
        return mlp(self, x)

    record_mlp.__module__ = mlp.__module__  # mmswin's forward still: the fused passes take the block as before

    monkeypatch.setattr(SwinBlock, 'window_attention', record_attention)
    monkeypatch.setattr(type(model.layers[0].blocks[0].mlp), 'forward', record_mlp)
    return batches


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('autocast', [False, True])
def test_dropped_branches_are_skipped_with_the_plain_values(cls, batch, autocast, monkeypatch):
    """Each branch runs on exactly the samples that keep it (none for a branch dropped by all), with the
    random numbers that the plain path draws after it; the outputs equal the plain path's bit for bit, and
    so do all gradients at batch 1 (a branch kept or dropped whole). With some samples dropped, a branch
    runs on fewer rows, and the gradients of its parameters are those sums in another grouping."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, drop_path_rate=0.9)).train()
    x = torch.randn(batch, 3, 40, 52)
    for seed in range(3):
        expected_kept = kept_per_branch(model, batch, seed)
        with monkeypatch.context() as patch:
            batches = branch_batches(model, patch)
            skipping = training_step(model, x, seed, autocast)
        assert batches == [k for k in expected_kept if k > 0]
        with monkeypatch.context() as patch:
            every_branch(patch)
            plain = training_step(model, x, seed, autocast)
        assert all(torch.equal(a, b) for a, b in zip(skipping[0], plain[0]))
        assert torch.equal(skipping[3], plain[3])  # the same random numbers taken
        for name, grad in skipping[2].items():
            assert grad is not None and grad.shape == plain[2][name].shape, name
        if batch == 1:
            assert torch.equal(skipping[1], plain[1])
            assert all(torch.equal(grad, plain[2][name]) for name, grad in skipping[2].items())
        else:
            torch.testing.assert_close(skipping[1], plain[1], rtol=1e-6, atol=1e-9)
            # Without the compiled kernels, PyTorch's CPU layer norm sums its weight and bias gradients from bf16
            # inputs with errors of bf16's size (about 10 % of a bias gradient of 4000 rows), which another
            # grouping of the rows changes: those are compared where the kernels take the norms.
            inexact = set() if not autocast or cpu_kernels.use_kernels() else norm_parameters(model)
            for name, grad in skipping[2].items():  # to the rounding of the largest entry
                if name not in inexact:
                    ref = plain[2][name]
                    tolerance = 1e-5 * ref.abs().max()
                    if autocast:  # the bf16 weight's gradient: the two sums may round to neighbouring bf16 values
                        tolerance = torch.maximum(tolerance, ref.abs() * 2 ** -7)
                    assert ((grad - ref).abs() <= tolerance).all(), name
    # the seeds above met all three cases: branches kept whole, dropped whole and (batch 3) dropped in part
    counts = {k for seed in range(3) for k in kept_per_branch(model, batch, seed)}
    assert {0, batch} <= counts and (batch == 1 or counts - {0, batch})


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_a_branch_dropped_by_every_sample_gives_its_parameters_zero_gradients(cls):
    """As multiplying the branch by zero does: optimisers treat them as any other parameter (weight decay,
    moments), and distributed data parallel finds none unused."""
    torch.manual_seed(0)
    model = cls(**TINY, drop_path_rate=0.9).train()
    seed = next(s for s in range(20) if kept_per_branch(model, 2, s)[-1] == 0)  # the last MLP dropped by both
    _, _, grads, _ = training_step(model, torch.randn(2, 3, 40, 52), seed, False)
    last = model.layers[-1].blocks[-1]
    for name, p in list(last.mlp.named_parameters()) + list(last.norm2.named_parameters()):
        assert grads_of(model, p, grads) is not None, name
        assert torch.equal(grads_of(model, p, grads), torch.zeros_like(p)), name


def grads_of(model: torch.nn.Module, param: torch.Tensor, grads: dict) -> torch.Tensor:
    return next(grads[name] for name, p in model.named_parameters() if p is param)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_skipping_under_checkpointing(cls, monkeypatch):
    """with_cp recomputes each block with the random numbers of its forward, so it skips the same branches:
    the outputs and gradients of the blocks without checkpointing."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, drop_path_rate=0.9)).train()
    checkpointed = cls(**TINY, drop_path_rate=0.9, with_cp=True).train()
    checkpointed.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 40, 52)
    for seed in range(2):
        expected, got = training_step(model, x, seed, True), training_step(checkpointed, x, seed, True)
        assert all(torch.equal(a, b) for a, b in zip(expected[0], got[0]))
        assert torch.equal(expected[1], got[1]) and torch.equal(expected[3], got[3])
        assert all(torch.equal(grad, got[2][name]) for name, grad in expected[2].items())


@pytest.mark.parametrize('rates', [dict(drop_rate=0.1), dict(attn_drop_rate=0.1)])
def test_branches_with_dropout_keep_the_plain_order_of_random_numbers(rates, monkeypatch):
    """A branch with dropout draws random numbers of its own, so the samples are drawn after it, as in the
    official models: every branch runs on the whole batch, with the plain path's values."""
    torch.manual_seed(0)
    model = SwinTransformer(**TINY, drop_path_rate=0.9, **rates).train()
    x = torch.randn(2, 3, 40, 52)
    with monkeypatch.context() as patch:
        batches = branch_batches(model, patch)
        got = training_step(model, x, 0, False)
    assert batches == [2] * 8
    with monkeypatch.context() as patch:
        every_branch(patch)
        expected = training_step(model, x, 0, False)
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0])) and torch.equal(got[3], expected[3])


def test_only_cpu_training_outside_torch_compile_skips():
    drop = layers.DropPath(0.2).train()
    cpu, meta = torch.zeros(2, 3), torch.zeros(2, 3, device='meta')
    assert layers.skips_dropped_branches(cpu, drop, False)
    assert not layers.skips_dropped_branches(cpu, drop, True)  # the branch draws random numbers itself
    assert not layers.skips_dropped_branches(meta, drop, False)
    assert not layers.skips_dropped_branches(cpu, layers.DropPath(0.0).train(), False)
    assert not layers.skips_dropped_branches(cpu, drop.eval(), False)
