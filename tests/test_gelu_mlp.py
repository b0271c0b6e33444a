"""The MLP: in training, same values and gradients as layer-by-layer autograd, one hidden tensor saved; in CPU
bf16 inference, the kernels' in-place pass with the values of the chunk-by-chunk one."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from mmswin.models import cpu_kernels
from mmswin.models import gelu_mlp as gelu_mlp_module
from mmswin.models import layers
from mmswin.models.chunk_sums import add_chunk
from mmswin.models.layers import Mlp

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                   reason='the compiled kernels need Linux on x86 with AVX512-BF16')


def run(mlp: Mlp, x: torch.Tensor, grad: torch.Tensor, layer_by_layer: bool, dtype=None):
    """The MLP's output and gradients, fused or layer by layer (each layer's product as the backbones take it,
    the fp32 kernels' with ``MMSWIN_BF16_MATMUL=fp32``)."""
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        if layer_by_layer:
            out = layers.call_linear(mlp.fc2, mlp.act(layers.call_linear(mlp.fc1, x)))
        else:
            out = mlp(x)
    out.backward(grad.to(out.dtype))
    return out, x.grad, [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_fp32_values_and_gradients_are_bitwise_those_of_autograd(approximate):
    torch.manual_seed(0)
    mlp = Mlp(16, 64, act_cfg=dict(type='GELU', approximate=approximate))
    x, grad = torch.randn(2, 5, 7, 16), torch.randn(2, 5, 7, 16)
    fused = run(mlp, x, grad, layer_by_layer=False)
    reference = run(copy.deepcopy(mlp), x, grad, layer_by_layer=True)
    assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])
    assert all(torch.equal(a, b) for a, b in zip(fused[2], reference[2]))


@pytest.mark.parametrize('bf16_matmul', ['native', 'fp32'])
def test_bf16_autocast_values_and_gradients(bf16_matmul, monkeypatch):
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', bf16_matmul)
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x, grad = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    fused = run(mlp, x, grad, layer_by_layer=False, dtype=torch.bfloat16)
    reference = run(copy.deepcopy(mlp), x, grad, layer_by_layer=True, dtype=torch.bfloat16)
    assert fused[0].dtype == reference[0].dtype == torch.bfloat16
    assert torch.equal(fused[0], reference[0])
    for a, b in zip([fused[1], *fused[2]], [reference[1], *reference[2]], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_kernels
def test_bf16_tanh_gelu_is_never_the_kernels_exact_one(monkeypatch):
    """The kernels' one-call forward computes the exact GELU: a tanh-GELU MLP in bf16 training, with enough
    chunks for every thread to take whole ones, gives the values of the chunk-by-chunk pass."""
    monkeypatch.setattr(layers, 'MLP_CHUNK_ELEMENTS', 8 * 64)  # chunks of 8 tokens: 75 of them
    torch.manual_seed(0)
    mlp = Mlp(16, 64, act_cfg=dict(type='GELU', approximate='tanh'))
    x, grad = torch.randn(3, 200, 16), torch.randn(3, 200, 16)
    assert cpu_kernels.threads_share(75)
    shared = run(mlp, x, grad, layer_by_layer=False, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, 'threads_share', lambda chunks: False)
    chunked = run(copy.deepcopy(mlp), x, grad, layer_by_layer=False, dtype=torch.bfloat16)
    for a, b in zip([shared[0], shared[1], *shared[2]], [chunked[0], chunked[1], *chunked[2]], strict=True):
        assert torch.equal(a, b)


def saved_activations(mlp: Mlp, x: torch.Tensor) -> list:
    """The tensors autograd keeps for the backward of ``mlp(x)``, parameters left out."""
    params = {p.data_ptr() for p in mlp.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    return list({t.data_ptr(): t for t in saved if t.data_ptr() not in params}.values())


def saved_activation_elements(mlp: Mlp, x: torch.Tensor) -> int:
    return sum(t.numel() for t in saved_activations(mlp, x))


def test_training_saves_the_input_and_one_hidden_tensor():
    x = torch.randn(4, 10, 16, requires_grad=True)
    assert saved_activation_elements(Mlp(16, 64), x) == 4 * 10 * (16 + 64)
    # with dropout the layer-by-layer path keeps the GELU output too
    assert saved_activation_elements(Mlp(16, 64, drop=0.1).train(), x) > 4 * 10 * (16 + 2 * 64)


@pytest.mark.parametrize('dtype,gelu_kernel', [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_chunked_values_and_gradients(dtype, gelu_kernel, monkeypatch):
    """Token chunks that do not divide the tokens: the values and gradients of layer-by-layer autograd
    (the weight gradients summed over chunks in fp32). In bf16 the backward's GELU is PyTorch's, or the
    compiled kernels' where they are used (one call per chunk)."""
    if gelu_kernel and not cpu_kernels.kernels_available():
        pytest.skip('the compiled kernels need Linux on x86 with AVX512-BF16')
    if not gelu_kernel:
        monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
    monkeypatch.setattr(cpu_kernels, 'threads_share', lambda chunks: False)  # chunk by chunk,
    monkeypatch.setattr(cpu_kernels, 'shared_chunk', lambda tokens, chunk: chunk)  # in unequal chunks
    monkeypatch.setattr(layers, 'MLP_CHUNK_ELEMENTS', 32 * 64 + 63)  # 32 tokens of the 64-wide hidden
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x, grad = torch.randn(3, 50, 16), torch.randn(3, 50, 16)
    calls, kernel_calls = [], []
    gelu = torch.nn.functional.gelu
    monkeypatch.setattr(gelu_mlp_module.F, 'gelu', lambda t, **k: calls.append(t.shape[0]) or gelu(t, **k))
    kernels = cpu_kernels.kernels()

    class Recording:
        def __getattr__(self, name):  # the other kernels as they are
            return getattr(kernels, name)

        def gelu_backward(self, grad_act, h, column_sums):
            kernel_calls.append(h.shape[0])
            return kernels.gelu_backward(grad_act, h, column_sums)

    monkeypatch.setattr(cpu_kernels, 'kernels', Recording)
    chunked = run(mlp, x, grad, layer_by_layer=False, dtype=dtype)
    chunks = [32, 32, 32, 32, 22]
    # forward, then the recomputation in the backward (in one pass with the gradient in the kernels)
    assert calls == chunks * (1 if gelu_kernel else 2)
    assert kernel_calls == (chunks if gelu_kernel else [])
    # fc1's output is kept as its chunks, never whole
    hidden = [t for t in saved_activations(mlp, x.clone().requires_grad_()) if t.shape[-1] == 64]
    assert [t.shape for t in hidden] == [(32, 64)] * 4 + [(22, 64)]
    reference = run(copy.deepcopy(mlp), x, grad, layer_by_layer=True, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip([chunked[0], chunked[1], *chunked[2]], [reference[0], reference[1], *reference[2]]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunk_by_chunk(grad_out, x, hidden, w1, w2):
    """The MLP's backward chunk by chunk in PyTorch's products and the kernels' GELU: the gradient of ``x``
    and fc1's weight and bias and fc2's weight gradients, each the fp32 sum of its chunks in order."""
    grad_x, parts, start = [], ([], [], []), 0
    for h in hidden:
        g, rows = grad_out[start:start + len(h)], x[start:start + len(h)]
        start += len(h)
        act, grad_h, sum_h = cpu_kernels.kernels().gelu_backward(g @ w2, h, True)
        grad_x.append(grad_h @ w1)
        for part, value in zip(parts, (grad_h.t() @ rows, sum_h, g.t() @ act)):
            part.append(value.float())
    sums = []
    for part in parts:
        total = part[0]
        for value in part[1:]:
            total = total + value
        sums.append(total)
    return (torch.cat(grad_x), *sums)


def mlp_backward_inputs(chunks, c=16, width=64):
    g = torch.Generator().manual_seed(0)
    tokens = sum(chunks)
    grad_out, x = (torch.randn(tokens, c, generator=g).bfloat16() for _ in range(2))
    hidden = [(torch.randn(n, width, generator=g) * 2).bfloat16() for n in chunks]
    w1, w2 = (torch.randn(*shape, generator=g).div(8).bfloat16() for shape in ((width, c), (c, width)))
    return grad_out, x, hidden, w1, w2


@needs_kernels
@pytest.mark.parametrize('n', [1, 2, 3])
def test_threads_sharing_the_chunks_give_the_chunk_by_chunk_gradients(n):
    """The kernels' backward with whole chunks per thread: the gradients of the chunk-by-chunk pass bit for
    bit, on any number of threads, ragged chunks included."""
    inputs = mlp_backward_inputs([7, 30, 1, 22, 64])
    expected = chunk_by_chunk(*inputs)
    with threads(n):
        grads = cpu_kernels.kernels().gelu_mlp_backward(*inputs, True, True, True, True)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


@needs_kernels
@pytest.mark.parametrize('need', [(True, False, False, False), (False, True, False, True), (False, False, True, False)])
def test_threads_sharing_the_chunks_give_only_what_is_needed(need):
    inputs = mlp_backward_inputs([5, 9])
    expected = chunk_by_chunk(*inputs)
    grads = cpu_kernels.kernels().gelu_mlp_backward(*inputs, *need)
    for wanted, grad, value in zip(need, grads, expected):
        assert torch.equal(grad, value) if wanted else grad is None


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('grad_out', torch.zeros(14, 16), "grad_out must be a contiguous bf16 CPU tensor of x's shape"),
    ('grad_out', torch.zeros(14, 8, dtype=torch.bfloat16), "grad_out must be .* of x's shape"),
    ('x', torch.zeros(14, 16), r'x must be a contiguous \(tokens, C\) bf16'),
    ('hidden', [torch.zeros(5, 64, dtype=torch.bfloat16), torch.zeros(9, 32, dtype=torch.bfloat16)],
     r'hidden\[1\] must be a contiguous \(rows, 64\) bf16'),
    ('hidden', [torch.zeros(5, 64, dtype=torch.bfloat16)], 'the hidden chunks hold 5 rows, x has 14'),
    ('w1', torch.zeros(64, 8, dtype=torch.bfloat16), r'w1 must be a contiguous \(H, 16\) bf16'),
    ('w2', torch.zeros(64, 16, dtype=torch.bfloat16), r'w2 must be a contiguous \(16, 64\) bf16'),
])
def test_bad_mlp_backward_input_is_named(arg, value, message):
    inputs = dict(zip(('grad_out', 'x', 'hidden', 'w1', 'w2'), mlp_backward_inputs([5, 9])))
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'gelu_mlp_backward: {message}'):
        cpu_kernels.kernels().gelu_mlp_backward(**inputs, need_x=True, need_w1=True, need_b1=True, need_w2=True)


def mlp_forward_by_chunks(x, w1, b1, w2, b2, chunk, fused_bias):
    """The training MLP's forward chunk by chunk in PyTorch's operators: the output and fc1's chunks."""
    out, hidden = [], []
    for part in x.split(chunk):
        if b1 is not None and fused_bias:
            h = torch.ops.mkldnn._linear_pointwise(part, w1, b1, 'none', [], '')
        else:
            h = F.linear(part, w1, b1)
        act = F.gelu(h)
        out.append(act @ w2.t() if b2 is None else torch.addmm(b2, act, w2.t()))
        hidden.append(h)
    return torch.cat(out), hidden


def mlp_forward_inputs(tokens=150, c=16, width=64, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, c, generator=g).bfloat16()
    w1, w2 = (torch.randn(*shape, generator=g).div(4).bfloat16() for shape in ((width, c), (c, width)))
    b1, b2 = ((torch.randn(n, generator=g).bfloat16() if bias else None) for n in (width, c))
    return x, w1, b1, w2, b2


@needs_kernels
@pytest.mark.parametrize('n', [1, 2, 3])
@pytest.mark.parametrize('bias,fused_bias', [(True, True), (True, False), (False, False)])
def test_threads_sharing_the_chunks_give_the_chunk_by_chunk_forward(n, bias, fused_bias):
    """The kernels' forward with whole chunks per thread: the output and fc1's chunks of the chunk-by-chunk
    pass bit for bit, on any number of threads, the last chunk shorter; fc1 with its bias fused in oneDNN or
    as F.linear."""
    inputs = mlp_forward_inputs(bias=bias)
    expected_out, expected_hidden = mlp_forward_by_chunks(*inputs, 19, fused_bias)
    with threads(n):
        out, hidden = cpu_kernels.kernels().gelu_mlp_forward(*inputs, 19, fused_bias)
    assert out.dtype == torch.bfloat16 and out.shape == (150, 16)
    assert [len(h) for h in hidden] == [19] * 7 + [17]
    assert torch.equal(out, expected_out)
    assert all(torch.equal(a, b) for a, b in zip(hidden, expected_hidden))


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('x', torch.zeros(14, 16), r'x must be a contiguous \(tokens, C\) bf16'),
    ('w1', torch.zeros(64, 8, dtype=torch.bfloat16), r'w1 must be a contiguous \(H, 16\) bf16'),
    ('b1', torch.zeros(32, dtype=torch.bfloat16), r'b1 must be None or a contiguous \(64,\) bf16'),
    ('w2', torch.zeros(16, 32, dtype=torch.bfloat16), r'w2 must be a contiguous \(C_out, 64\) bf16'),
    ('b2', torch.zeros(16), r'b2 must be None or a contiguous \(16,\) bf16'),
    ('chunk', 0, 'chunk must be positive, got 0'),
])
def test_bad_mlp_forward_input_is_named(arg, value, message):
    inputs = dict(zip(('x', 'w1', 'b1', 'w2', 'b2'), mlp_forward_inputs(tokens=14)), chunk=5, fused_bias=True)
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'gelu_mlp_forward: {message}'):
        cpu_kernels.kernels().gelu_mlp_forward(**inputs)


@needs_kernels
@pytest.mark.parametrize('n', [1, 2, 3, 5])
def test_threads_share_equal_chunks_in_training(n, monkeypatch):
    """From four chunks on, the forward makes the chunks equal and their number a multiple of four, on
    any number of threads; with at least two per thread, the forward and the backward are one call of the
    kernels each, with the outputs and gradients that the chunk-by-chunk passes give over the same chunks,
    bit for bit."""
    chunks = [19] * 7 + [17]
    monkeypatch.setattr(layers, 'MLP_CHUNK_ELEMENTS', 32 * 64)  # 150 tokens: 5 chunks of at most 32
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x, grad = torch.randn(3, 50, 16), torch.randn(3, 50, 16)
    kernels, calls = cpu_kernels.kernels(), []

    class Recording:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def gelu_mlp_forward(self, *args):
            out, hidden = kernels.gelu_mlp_forward(*args)
            forward_calls.append([len(h) for h in hidden])
            return out, hidden

        def gelu_mlp_backward(self, grad_out, x, hidden, *args):
            calls.append([len(h) for h in hidden])
            return kernels.gelu_mlp_backward(grad_out, x, hidden, *args)

    forward_calls = []
    monkeypatch.setattr(cpu_kernels, 'kernels', Recording)
    with threads(n), torch.autocast('cpu', dtype=torch.bfloat16):
        saved = saved_activations(mlp, x.clone().requires_grad_())
    hidden = [t for t in saved if t.shape[-1] == 64 and t.shape != mlp.fc2.weight.shape]  # not fc2's bf16 weight
    with threads(n):
        assert [len(t) for t in hidden] == chunks
        forward_calls.clear()
        shared = run(mlp, x, grad, layer_by_layer=False, dtype=torch.bfloat16)
        assert calls == ([chunks] if len(chunks) >= 2 * n else [])
        assert forward_calls == calls
        monkeypatch.setattr(cpu_kernels, 'shared_chunk', lambda tokens, chunk: chunks[0])
        monkeypatch.setattr(cpu_kernels, 'threads_share', lambda count: False)
        one_by_one = run(copy.deepcopy(mlp), x, grad, layer_by_layer=False, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip([shared[0], shared[1], *shared[2]],
                                                 [one_by_one[0], one_by_one[1], *one_by_one[2]]))


def test_bf16_weight_gradients_are_the_fp32_sums_of_the_chunk_products(monkeypatch):
    """Under bf16 autocast the fp32 parameters get the fp32 sum of the chunks' bf16 products and bias sums,
    exactly, not that sum rounded to bf16; on one thread and on two (the kernels' backward)."""
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    monkeypatch.setattr(layers, 'MLP_CHUNK_ELEMENTS', 32 * 64)  # 32 tokens of the 64-wide hidden
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x, grad = torch.randn(256, 16), torch.randn(256, 16) * 4
    w1, b1, w2 = (p.detach().bfloat16() for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight))
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in mlp.parameters()]
    for rows in torch.arange(256).split(32):
        xs, gs = x[rows].bfloat16(), grad[rows].bfloat16()
        h = torch.nn.functional.linear(xs, w1, b1)
        grad_h = torch.ops.aten.gelu_backward(gs @ w2, h)
        for total, part in zip(expected, (grad_h.t() @ xs, grad_h.sum(0), gs.t() @ torch.nn.functional.gelu(h),
                                          gs.sum(0))):
            total += part.float()
    for n in (1, 2):
        with threads(n):
            _, _, grads = run(copy.deepcopy(mlp), x, grad, layer_by_layer=False, dtype=torch.bfloat16)
        for g, e in zip(grads, expected, strict=True):
            assert g.dtype == torch.float32 and torch.equal(g, e)
            assert not torch.equal(g.bfloat16().float(), g)  # sums that bf16 cannot hold


def ops_inside(prof, name: str) -> set:
    """Names of the operators that the profiled calls named ``name`` issue themselves."""
    calls = [e for e in prof.events() if e.name == name]
    assert calls, name
    return {c.name for e in calls for c in e.cpu_children}


NO_ACCUMULATORS = {'aten::zeros', 'aten::new_zeros', 'aten::zeros_like', 'aten::zero_', 'aten::fill_',
                   'aten::add_'}


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_one_chunk_gradients_are_the_products_themselves(dtype):
    """In one chunk (a GPU's case) the weight and bias gradients are that chunk's products and sums: no
    zero-filled accumulators and no additions; in fp32 they are autograd's bit for bit."""
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    reference = copy.deepcopy(mlp)
    x = torch.randn(3, 9, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype is not None):
        out = gelu_mlp_module.gelu_mlp(x, mlp.fc1, mlp.fc2, chunk_elements=27 * 64)
    with torch.profiler.profile() as prof:
        out.float().square().sum().backward()
    ops = ops_inside(prof, '_GeluMlpBackward')
    assert 'aten::matmul' in ops and not ops & NO_ACCUMULATORS, ops
    assert all(p.grad.dtype == torch.float32 for p in mlp.parameters())
    if dtype is None:
        expected = run(reference, x.detach(), 2 * out.detach(), layer_by_layer=True)
        assert all(torch.equal(a.grad, b) for a, b in zip(mlp.parameters(), expected[2]))


@pytest.mark.parametrize('fp32_products', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_chunk_products_write_into_out_the_values_they_return(fp32_products, dtype):
    """The chunked passes' products written into a chunk of rows of a larger result: the values of the
    products returned fresh, bit for bit, and the other rows untouched."""
    from mmswin.models.matmul import chunk_linear, chunk_mm
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((5, 8), (6, 8), (6,)))
    for bias in (b, None):
        result = torch.full((9, 6), 7.0, dtype=dtype)
        written = chunk_linear(x, w, bias, fp32_products, out=result[2:7])
        assert written.data_ptr() == result[2:7].data_ptr()
        assert torch.equal(result[2:7], chunk_linear(x, w, bias, fp32_products))
        assert (result[:2] == 7).all() and (result[7:] == 7).all()
    result = torch.full((9, 6), 7.0, dtype=dtype)
    chunk_mm(x, w.t(), fp32_products, out=result[4:9])
    assert torch.equal(result[4:9], chunk_mm(x, w.t(), fp32_products)) and (result[:4] == 7).all()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason='oneDNN has no bf16 linear on this CPU')
@pytest.mark.parametrize('setting,fused', [('auto', True), ('onednn', True), ('native', False)])
def test_bf16_chunk_products_with_a_bias_fuse_it(setting, fused, monkeypatch):
    """A bf16 product with a bias returned fresh takes oneDNN's linear with the bias fused (unless
    ``MMSWIN_BF16_MATMUL=native``), to the values of ``F.linear`` bit for bit, rows of any count."""
    from mmswin.models.matmul import chunk_linear
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', setting)
    g = torch.Generator().manual_seed(0)
    for rows in (1, 37, 4096):
        x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((rows, 96), (288, 96), (288,)))
        with torch.profiler.profile() as prof:
            out = chunk_linear(x, w, b, False)
        assert ('mkldnn::_linear_pointwise' in {e.key for e in prof.key_averages()}) == fused
        assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize('use_kernels', [False, True])
def test_chunk_sums_take_the_kernels_for_bf16_parts_of_fp32_sums(use_kernels, monkeypatch):
    """add_chunk: the first chunk becomes the sum in the sum's dtype, later ones are added in place; a bf16
    part of an fp32 sum goes through the kernels where they are used (no fp32 copy of it), to PyTorch's
    values bit for bit."""
    if use_kernels and not cpu_kernels.kernels_available():
        pytest.skip('the compiled kernels need Linux on x86 with AVX512-BF16')
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'auto' if use_kernels else 'native')
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(300, 96, generator=g).bfloat16() for _ in range(3)]
    total = add_chunk(None, parts[0], torch.float32)
    assert total.dtype == torch.float32 and torch.equal(total, parts[0].float())
    with torch.profiler.profile() as prof:
        for part in parts[1:]:
            assert add_chunk(total, part, torch.float32) is total
    names = {e.name for e in prof.events()}
    assert ('aten::_to_copy' not in names) == use_kernels and ('aten::add_' in names) != use_kernels
    assert torch.equal(total, parts[0].float() + parts[1].float() + parts[2].float())


def mlp_rows_by_chunks(x, w1, b1, w2, b2, norm_weight, norm_bias, eps, post_norm, chunk):
    """Inference's in-place MLP half of a block, chunk by chunk in oneDNN's fused linear and the norm kernel: x
    plus the branch, as a new tensor."""
    out = x.clone()
    norm = cpu_kernels.kernels().layer_norm
    for part in out.split(chunk):
        h = torch.ops.mkldnn._linear_pointwise(part if post_norm else norm(part, norm_weight, norm_bias, eps),
                                               w1, b1, 'gelu', [], 'none')
        branch = torch.ops.mkldnn._linear_pointwise(h, w2, b2, 'none', [], '')
        part.add_(norm(branch, norm_weight, norm_bias, eps) if post_norm else branch)
    return out


def mlp_rows_inputs(tokens=150, affine=True):
    x, w1, b1, w2, b2 = mlp_forward_inputs(tokens=tokens)
    g = torch.Generator().manual_seed(1)
    norm = (torch.randn(16, generator=g), torch.randn(16, generator=g)) if affine else (None, None)
    return x, w1, b1, w2, b2, *norm, 1e-5


@needs_kernels
@pytest.mark.parametrize('n', [1, 2, 3])
@pytest.mark.parametrize('post_norm', [False, True])
@pytest.mark.parametrize('affine', [True, False])
def test_inference_mlp_rows_sharing_the_chunks_give_the_chunk_by_chunk_values(n, post_norm, affine):
    """The kernels' in-place inference MLP with whole chunks per thread: x plus the branch of the chunk-by-chunk
    pass bit for bit, the norm before fc1 (V1) or after fc2 (V2), on any number of threads, the last chunk
    shorter."""
    x, *args = mlp_rows_inputs(affine=affine)
    expected = mlp_rows_by_chunks(x, *args, post_norm, 19)
    assert not torch.equal(expected, x)
    with threads(n):
        out = cpu_kernels.kernels().gelu_mlp_rows_(x, *args, post_norm, 19)
    assert out is x
    assert torch.equal(x, expected)


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('x', torch.zeros(14, 16), r'x must be a contiguous \(tokens, C\) bf16'),
    ('w1', torch.zeros(64, 8, dtype=torch.bfloat16), r'w1 must be a contiguous \(H, 16\) bf16'),
    ('b1', torch.zeros(64), r'b1 must be None or a contiguous \(64,\) bf16'),
    ('w2', torch.zeros(8, 64, dtype=torch.bfloat16), r"w2 must have x's 16 rows \(the output is added to x\)"),
    ('b2', torch.zeros(8, dtype=torch.bfloat16), r'b2 must be None or a contiguous \(16,\) bf16'),
    ('norm_weight', torch.zeros(16, dtype=torch.bfloat16), r'norm_weight must be None or a contiguous \(16,\) fp32'),
    ('norm_bias', torch.zeros(8), r'norm_bias must be None or a contiguous \(16,\) fp32'),
    ('eps', -1.0, 'eps must not be negative, got -1'),
    ('chunk', 0, 'chunk must be positive, got 0'),
])
def test_bad_inference_mlp_rows_input_is_named(arg, value, message):
    names = ('x', 'w1', 'b1', 'w2', 'b2', 'norm_weight', 'norm_bias', 'eps')
    inputs = dict(zip(names, mlp_rows_inputs(tokens=14)), post_norm=False, chunk=5)
    before = inputs['x'].clone()
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'gelu_mlp_rows_: {message}'):
        cpu_kernels.kernels().gelu_mlp_rows_(**inputs)
    if arg != 'x':
        assert torch.equal(inputs['x'], before)  # nothing written


@pytest.mark.parametrize('total,chunk,n,expected', [
    (60800, 4096, 2, 3800),  # 15 chunks of at most 4096: 16, a multiple of two
    (60800, 4096, 3, 4054),  # 15, a multiple of three
    (60800, 4096, 4, 3800),
    (3800, 4096, 2, 950),  # at least two chunks per thread
    (3800, 4096, 4, 475),
    (400, 4096, 2, 200),  # chunks of at least 128 tokens: two
    (400, 4096, 3, 134),
    (100, 4096, 2, 100),  # one chunk
])
def test_inference_chunks_are_equal_and_shared_out_evenly(total, chunk, n, expected):
    with threads(n):
        assert cpu_kernels.inference_chunk(total, chunk, 128) == expected


@pytest.mark.parametrize('device', ['cpu', 'meta'])
@pytest.mark.parametrize('with_cp', [False, True])
def test_checkpointed_blocks_off_the_cpu_run_the_mlp_layer_by_layer(device, with_cp, monkeypatch):
    """Training runs the MLP through :func:`gelu_mlp` (one hidden tensor kept), except in a checkpointed block
    off the CPU (``meta`` standing in for a GPU), in the forward and in the recomputation: there the
    recomputation brings the layers' saved tensors back anyway, and PyTorch's layers leave less alive at the
    backward's peak than :func:`gelu_mlp`'s temporaries on top of the recomputed block."""
    from mmswin.models import SwinTransformer
    calls = []
    original = layers.gelu_mlp
    monkeypatch.setattr(layers, 'gelu_mlp', lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    depths = (1, 2, 1, 1)
    model = SwinTransformer(embed_dims=16, depths=depths, num_heads=(1, 2, 4, 8), window_size=4,
                            drop_path_rate=0.0, with_cp=with_cp).to(device).train()
    outs = model(torch.randn(1, 3, 40, 40, device=device))
    forward_calls = len(calls)
    sum(o.float().sum() for o in outs).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    if with_cp and device == 'meta':
        assert len(calls) == 0
    else:
        assert forward_calls == sum(depths)
        assert (len(calls) > forward_calls) == with_cp  # recomputed in the backward
