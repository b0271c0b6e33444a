"""The qkv projection split into heads: values and gradients of the plain projection, chunked in training."""
import pytest
import torch
import torch.nn.functional as F

from mmswin.models import qkv_projection
from mmswin.models.qkv_projection import qkv_heads

from .test_gelu_mlp import NO_ACCUMULATORS, ops_inside

WINDOWS, TOKENS, DIM, HEADS = 7, 16, 8, 2


def reference(x: torch.Tensor, weight: torch.Tensor, bias, scale: float) -> tuple:
    qkv = F.linear(x, weight, bias).view(WINDOWS, TOKENS, 3, HEADS, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q * scale, k, v


def inputs(dtype=torch.float64, bias=True) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(WINDOWS, TOKENS, DIM, dtype=dtype, requires_grad=True)
    weight = torch.randn(3 * DIM, DIM, dtype=dtype, requires_grad=True)
    b = torch.randn(3 * DIM, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b


def grads_of(outputs: tuple, weights: list, unused, *tensors) -> list:
    loss = sum((o * w).sum() for i, (o, w) in enumerate(zip(outputs, weights)) if i != unused)
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


@pytest.mark.parametrize('scale', [1.0, 0.25])
@pytest.mark.parametrize('unused', [None, 1])
@pytest.mark.parametrize('bias', [True, False])
def test_chunked_values_and_gradients_are_those_of_the_plain_projection(scale, unused, bias, monkeypatch):
    """Chunks of 3 windows (7 windows: the last chunk is short); an output without gradient."""
    x, weight, b = inputs(bias=bias)
    rows = []
    chunk_linear = qkv_projection.chunk_linear
    monkeypatch.setattr(qkv_projection, 'chunk_linear', lambda t, *a: rows.append(t.shape[0]) or chunk_linear(t, *a))
    out = qkv_heads(x, weight, b, HEADS, scale, chunk_tokens=3 * TOKENS + 5)
    assert rows == [3, 3, 1]
    expected = reference(x, weight, b, scale)
    for o, e in zip(out, expected, strict=True):
        assert o.shape == (WINDOWS, HEADS, TOKENS, DIM // HEADS) and o.is_contiguous()
        torch.testing.assert_close(o, e, rtol=0, atol=1e-12)
    weights = [torch.randn_like(e) for e in expected]
    got = grads_of(out, weights, unused, x, weight, b)
    want = grads_of(expected, weights, unused, x, weight, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize('bias', [True, False])
def test_gradcheck(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *t: qkv_heads(*t, 2, 0.5, chunk_tokens=8), (x, weight, b))


def test_backward_builds_the_projection_gradient_one_chunk_at_a_time(monkeypatch):
    x, weight, b = inputs()
    products = []
    chunk_mm = qkv_projection.chunk_mm
    monkeypatch.setattr(qkv_projection, 'chunk_mm',
                        lambda p, m, f, out=None: products.append(tuple(p.shape)) or chunk_mm(p, m, f, out=out))
    sum(t.sum() for t in qkv_heads(x, weight, b, HEADS, chunk_tokens=4 * TOKENS)).backward()
    # grad_x and grad_weight of each chunk of 4 and 3 windows, never all 7 at once
    assert products == [(4 * TOKENS, 3 * DIM), (3 * DIM, 4 * TOKENS), (3 * TOKENS, 3 * DIM), (3 * DIM, 3 * TOKENS)]


def test_frozen_projection_gives_only_the_input_gradient():
    x, weight, b = inputs()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    out = qkv_heads(x, weight, b, HEADS, 0.5, chunk_tokens=TOKENS)
    sum(t.sum() for t in out).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    sum(t.sum() for t in reference(x_ref, weight, b, 0.5)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert weight.grad is None and b.grad is None


@pytest.mark.parametrize('bf16_matmul', ['native', 'fp32'])
def test_bf16_parameter_gradients_are_the_fp32_sums_of_the_chunk_products(bf16_matmul, monkeypatch):
    """Under bf16 autocast: bf16 outputs equal to autocast's projection, fp32 parameter gradients that are
    the exact fp32 sums of the chunks' bf16 products (not their bf16 rounding)."""
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', bf16_matmul)
    x, weight, b = inputs(dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = qkv_heads(x, weight, b, HEADS, chunk_tokens=2 * TOKENS)
    xb, wb, bb = (t.detach().bfloat16() for t in (x, weight, b))
    with torch.no_grad():
        expected = reference(xb, wb, bb, 1.0)
    for o, e in zip(out, expected, strict=True):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o, e)  # bf16: within about two units in the last place
    grads = [torch.randn(o.shape).bfloat16() for o in out]
    torch.autograd.backward(out, grads)
    assert x.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.float32
    g = torch.empty(WINDOWS, TOKENS, 3, HEADS, DIM // HEADS, dtype=torch.bfloat16)
    for part, grad in zip(g.permute(2, 0, 3, 1, 4), grads):
        part.copy_(grad)
    g = g.view(WINDOWS, TOKENS, 3 * DIM)
    expected_w = torch.zeros_like(weight)
    for rows in torch.arange(WINDOWS).split(2):
        expected_w += (g[rows].reshape(-1, 3 * DIM).t().float() @ xb[rows].reshape(-1, DIM).float()).bfloat16().float()
    assert torch.equal(weight.grad, expected_w)
    assert not torch.equal(weight.grad.bfloat16().float(), weight.grad)  # sums that bf16 cannot hold
    torch.testing.assert_close(x.grad, (g.float() @ wb.float()).bfloat16().float(), rtol=0, atol=0)


def test_one_chunk_gradients_are_the_products_themselves():
    """All windows in one chunk (a GPU's case): the weight and bias gradients are the products and sums
    themselves, with no zero-filled accumulator and no addition, equal to the plain projection's."""
    x, weight, b = inputs(dtype=torch.float32)
    loss = sum((t * t).sum() for t in qkv_heads(x, weight, b, HEADS, 0.5, chunk_tokens=WINDOWS * TOKENS))
    with torch.profiler.profile() as prof:
        got = torch.autograd.grad(loss, (x, weight, b))
    ops = ops_inside(prof, '_QkvHeadsBackward')
    assert 'aten::matmul' in ops and not ops & NO_ACCUMULATORS, ops
    expected = torch.autograd.grad(sum((t * t).sum() for t in reference(x, weight, b, 0.5)), (x, weight, b))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('record', [False, True])
def test_stacked_queries_and_keys_are_the_split_ones(record):
    """``stack_qk=True`` returns ``(qk, v)`` with ``qk[0], qk[1]`` the queries and keys of the split form:
    the same values, and (training, chunked) the same gradients."""
    x, weight, b = inputs()
    with torch.set_grad_enabled(record):
        qk, v = qkv_heads(x, weight, b, HEADS, 0.5, chunk_tokens=3 * TOKENS, stack_qk=True)
        split = qkv_heads(x, weight, b, HEADS, 0.5, chunk_tokens=3 * TOKENS)
    assert qk.shape == (2, WINDOWS, HEADS, TOKENS, DIM // HEADS) and qk.is_contiguous()
    for o, e in zip((*qk.unbind(0), v), split):
        assert torch.equal(o, e)
    if record:
        weights = [torch.randn_like(e) for e in split]
        got = grads_of((*qk.unbind(0), v), weights, None, x, weight, b)
        want = grads_of(split, weights, None, x, weight, b)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
