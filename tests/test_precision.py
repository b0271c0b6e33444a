"""Both backbones under autocast: finite outputs and gradients, close to fp32; V2 safe in fp16."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models.attention import CosineWindowAttention, unit_vectors
from mmswin.models import cpu_kernels, matmul
from mmswin.models.matmul import Conv2d, attention, bf16_products_in_fp32, linear, softmax

TINY = dict(embed_dims=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


def perturbed_model_and_input(cls: type) -> tuple:
    """A small seeded backbone with every parameter moved off its initial value (off V2's zero-initialised
    post-norms, so that every block matters), and a ``(2, 3, 61, 75)`` input (padded, shifted windows)."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, torch.randn(2, 3, 61, 75)


# fp16 training scales the loss (mmengine's AmpOptimWrapper, torch's GradScaler): without it, the first
# stage's small gradients fall below fp16's range. The gradients are compared after unscaling.
LOSS_SCALE = {torch.bfloat16: 1.0, torch.float16: 1024.0}
# Bounds of the lowest and the median per-parameter cosine of the gradients of a model in bf16 or fp16 to
# fp32's (measured on these models: bf16 >= 0.9950, medians >= 0.99938; fp16 >= 0.99949, medians >= 0.999993).
GRADIENT_COSINE = {torch.bfloat16: (0.99, 0.999), torch.float16: (0.999, 0.99999)}


def loss_of(outs) -> torch.Tensor:
    return sum(o.float().square().mean() for o in outs)


def assert_gradients_near(model: torch.nn.Module, reference: dict, grad_dtype: torch.dtype, dtype: torch.dtype,
                          lowest: float, median: float) -> None:
    """Every parameter of ``model`` has a finite gradient of dtype ``grad_dtype`` (from a loss scaled by
    :data:`LOSS_SCALE` of the precision ``dtype``, unscaled here) whose cosine to the fp32 one in ``reference``
    is at least ``lowest``, and the median of the cosines is at least ``median``. Scalars (one head's logit
    scale) are left out, as their cosine is only a sign."""
    cosines = []
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == grad_dtype and torch.isfinite(p.grad).all(), name
        got, ref = p.grad.double().flatten() / LOSS_SCALE[dtype], reference[name].double().flatten()
        assert ref.abs().sum() > 0, name
        if ref.numel() > 1:
            cosines.append(F.cosine_similarity(got, ref, dim=0).item())
            assert cosines[-1] >= lowest, (name, cosines[-1])
    assert len(cosines) > 50 and torch.tensor(cosines).median() >= median, sorted(cosines)[:5]


def fp32_gradients(model: torch.nn.Module, x: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss_of(model(x)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype,bf16_matmul', [(torch.bfloat16, 'native'), (torch.bfloat16, 'fp32'),
                                               (torch.float16, 'auto')])
def test_autocast_outputs_and_gradients(cls, dtype, bf16_matmul, monkeypatch):
    """Both ways of multiplying under CPU bf16 autocast (PyTorch's bf16 kernels, or bf16 values through
    the fp32 kernels as on CPUs without bf16 instructions) and fp16: outputs and every parameter's gradient
    close to fp32's (fp32 parameters, so their gradients are fp32)."""
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', bf16_matmul)
    model, x = perturbed_model_and_input(cls)
    reference = fp32_gradients(model, x)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast('cpu', dtype=dtype):
        outs = model(x)
    for out, r in zip(outs, ref, strict=True):
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        cosine = F.cosine_similarity(out.float().flatten(), r.flatten(), dim=0)
        assert cosine > (0.9999 if dtype == torch.bfloat16 else 0.99999), cosine  # measured >= 0.99996, 0.9999994
    (LOSS_SCALE[dtype] * loss_of(outs)).backward()
    # measured: bf16 >= 0.99789 (V2's last logit scale, PyTorch's kernels), median 0.99992; fp16 >= 0.99998
    lowest, median = (0.995, 0.9999) if dtype == torch.bfloat16 else (0.9999, 0.99999)
    assert_gradients_near(model, reference, torch.float32, dtype, lowest, median)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_weights(cls, dtype):
    """A backbone converted to bf16 or fp16 (``model.to(dtype)``, ``model.half()``), without autocast: every
    part runs in the parameters' dtype (V2's position-bias MLP takes its coordinates in that dtype, as the
    official model's buffer is converted with it), outputs and gradients close to fp32's."""
    model, x = perturbed_model_and_input(cls)
    reference = fp32_gradients(model, x)
    low = cls(**TINY, window_size=4)
    low.load_state_dict(model.state_dict())
    low.to(dtype)
    with torch.no_grad():
        ref = model.eval()(x)
        outs = low.eval()(x.to(dtype))
    for out, r in zip(outs, ref, strict=True):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert F.cosine_similarity(out.float().flatten(), r.flatten(), dim=0) > 0.999
    (LOSS_SCALE[dtype] * loss_of(low.train()(x.to(dtype)))).backward()
    lowest, median = GRADIENT_COSINE[dtype]
    if dtype == torch.bfloat16 and not cpu_kernels.use_kernels():
        # PyTorch's bf16 operators: its layer norm sums the weight and bias gradients with errors of bf16's
        # size, and the attention's bias gradients come from bf16 logits. Measured: median 0.99894 for V1, as
        # with every layer one after the other (forward hooks); 0.99937 with the kernels.
        median = 0.998
    assert_gradients_near(low, reference, dtype, dtype, lowest, median)


def test_v2_cosine_attention_does_not_overflow_in_fp16():
    """Large activations: |q|^2 exceeds fp16's range, the normalised logits must not."""
    attn = CosineWindowAttention(8, 2, 4)
    q = torch.full((1, 2, 16, 4), 300.0, dtype=torch.float16)
    k = torch.full((1, 2, 16, 4), -300.0, dtype=torch.float16)
    scale = torch.clamp(attn.logit_scale, max=math.log(100)).exp()
    logits = (unit_vectors(q, scale) @ unit_vectors(k).transpose(-2, -1)).float()
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, torch.full_like(logits, -10.0), atol=0.05)  # cos = -1, scale = 10


def bf16_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of two bf16 tensors in units of the last place of ``b``."""
    ulp = torch.ldexp(torch.ones_like(b.float()), torch.frexp(b.float()).exponent - 8)
    return (a.float() - b.float()).abs() / ulp


def test_bf16_products_through_fp32_kernels_are_bf16_gemms(monkeypatch):
    """bf16 values multiplied in fp32 and rounded: within one bf16 ulp of the exact product of the
    bf16-rounded operands (what a bf16 GEMM with fp32 accumulation computes)."""
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'fp32')
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 96), torch.randn(40, 96), torch.randn(40)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = linear(x, w, b)
    assert out.dtype == torch.bfloat16
    exact = (x.bfloat16().double() @ w.bfloat16().double().T + b.bfloat16().double()).to(torch.bfloat16)
    assert bf16_ulps_apart(out, exact).max() <= 1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native = torch.nn.functional.linear(x, w, b)
    assert bf16_ulps_apart(native, exact).max() <= 1

    conv = Conv2d(3, 8, kernel_size=4, stride=4)
    image = torch.randn(2, 3, 16, 12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        patches = conv(image)
    exact = torch.nn.functional.conv2d(image.bfloat16().double(), conv.weight.bfloat16().double(),
                                       conv.bias.bfloat16().double(), stride=4).to(torch.bfloat16)
    assert patches.dtype == torch.bfloat16 and bf16_ulps_apart(patches, exact).max() <= 1

    q, k, v = (torch.randn(3, 2, 16, 8).bfloat16() for _ in range(3))
    bias = torch.randn(1, 2, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        att = attention(q, k, v, bias, None, 0.0, 8 ** -0.5)
    logits = q.double() @ k.double().transpose(-2, -1) * 8 ** -0.5 + bias.double()
    exact = (logits.softmax(-1) @ v.double()).to(torch.bfloat16)
    assert att.dtype == torch.bfloat16 and bf16_ulps_apart(att, exact).max() <= 1


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of two tensors of one floating dtype in units of the last place of ``b`` (subnormals
    included)."""
    info = torch.finfo(b.dtype)
    ulp = torch.ldexp(torch.full_like(b.double(), info.eps), torch.frexp(b.double()).exponent - 1)
    return (a.double() - b.double()).abs() / ulp.clamp_min(info.smallest_normal * info.eps)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_reduced_precision_softmax_is_the_fp32_one_rounded_in_pieces(dtype, monkeypatch):
    """bf16/fp16 on the CPU: the fp32 softmax rounded once, computed in pieces (several and a remainder
    here), within one ulp of the exact softmax and of PyTorch's kernel, with large and masked logits.
    Where autograd records, the same values, and the gradient of PyTorch's softmax backward from them."""
    monkeypatch.setattr(matmul, 'SOFTMAX_CHUNK_ELEMENTS', 8 * 49)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 49, 49) * 8
    x[:, :, :20, 30:] -= 100.0  # a shift mask's entries
    x[0, 0, 0, 0] += 60.0
    x = x.to(dtype)
    with torch.profiler.profile() as prof:
        out = softmax(x)
    assert {e.key: e.count for e in prof.key_averages()}['aten::_softmax'] == math.ceil(5 * 3 * 49 / 8)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, torch.softmax(x, -1, dtype=torch.float32).to(dtype))
    assert ulps_apart(out, torch.softmax(x.double(), -1).to(dtype)).max() <= 1
    assert ulps_apart(out, x.softmax(-1)).max() <= 1

    leaf = x.clone().requires_grad_()
    weights = softmax(leaf)
    assert weights.grad_fn is not None and torch.equal(weights, out)
    grad = torch.randn_like(x)
    weights.backward(grad)
    assert leaf.grad.dtype == dtype and torch.equal(leaf.grad, torch._softmax_backward_data(grad, out, -1, dtype))
    # against PyTorch's softmax and backward, in fp64 from the same logits: as close as bf16/fp16 rounding
    reference = x.double().requires_grad_()
    reference.softmax(-1).backward(grad.double())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=tolerance, atol=tolerance)


def test_fp32_and_cuda_products_are_untouched(monkeypatch):
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'fp32')
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    assert not bf16_products_in_fp32(x)  # no autocast
    with torch.autocast('cpu', dtype=torch.float16):
        assert not bf16_products_in_fp32(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert bf16_products_in_fp32(x)
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not bf16_products_in_fp32(x)
    assert torch.equal(linear(x, w, None), x @ w.T)


def test_bad_bf16_matmul_setting_is_named(monkeypatch):
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'fast')
    with torch.autocast('cpu', dtype=torch.bfloat16), pytest.raises(ValueError, match='MMSWIN_BF16_MATMUL'):
        bf16_products_in_fp32(torch.zeros(1))


def onednn_bf16_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not onednn_bf16_linear_available(), reason='oneDNN has no bf16 linear on this CPU')
@pytest.mark.parametrize('gelu', [None, 'none', 'tanh'])
def test_onednn_fused_linear_rounds_the_exact_result_once(gelu, monkeypatch):
    """bf16 inference through oneDNN's linear with fused bias and GELU: the exact result of the bf16
    operands rounded once (within one ulp); PyTorch's kernels round the product before the GELU."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 33, 96), torch.randn(40, 96) * 0.2, torch.randn(40)
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'onednn')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), torch.profiler.profile() as prof:
        out = linear(x, w, b, gelu=gelu)
    assert 'mkldnn::_linear_pointwise' in {e.key for e in prof.key_averages()}
    exact = x.bfloat16().double() @ w.bfloat16().double().T + b.bfloat16().double()
    if gelu is not None:
        exact = F.gelu(exact, approximate=gelu)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 33, 40)
    # One ulp, or 1e-6 where the GELU's tail is tiny (oneDNN's rounds it to zero).
    far = bf16_ulps_apart(out, exact.to(torch.bfloat16)) > 1
    assert ((out.double() - exact).abs() * far).max() < 1e-6
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        plain = linear(x, w, b, gelu=gelu)
    torch.testing.assert_close(plain.float(), out.float(), rtol=2 ** -6, atol=2e-3)


@pytest.mark.skipif(not onednn_bf16_linear_available(), reason='oneDNN has no bf16 linear on this CPU')
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_onednn_fused_linear_in_inference_and_training_passes(cls, monkeypatch):
    """Every linear layer of bf16 inference takes the fused op, whose outputs match those of PyTorch's
    kernels (the same products; the GELU is fused, one rounding instead of two). It has no backward:
    in training only the forward products with a bias inside mmswin's own autograd functions (the qkv
    projection and fc1) take it, with the bias alone fused, to the values and gradients of PyTorch's
    kernels bit for bit. (Where the CPU has AMX, inference's patch mergings, and the blocks' products where the
    blocks share chunks out among the threads, multiply on its tiles instead: MMSWIN_AMX=0 here.)"""
    model, x = perturbed_model_and_input(cls)
    monkeypatch.setenv('MMSWIN_AMX', '0')

    def run(mode: str, grad: bool) -> tuple:
        monkeypatch.setenv('MMSWIN_BF16_MATMUL', mode)
        model.zero_grad()
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                outs = model(x)
            if grad:
                sum(o.float().square().mean() for o in outs).backward()
        counts = {e.key: e.count for e in prof.key_averages()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return outs, grads, counts.get('mkldnn::_linear_pointwise', 0)

    linears = 4 * sum(TINY['depths']) + 3  # qkv, proj, fc1, fc2 per block; 3 patch mergings
    fused, _, count = run('onednn', False)
    assert count == linears
    plain, _, count = run('native', False)
    assert count == 0
    for a, b in zip(fused, plain):
        assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.9999
    # Training with the setting 'native' turns the compiled layer norm off as well: off for both here, so
    # that the runs differ in the setting of the linear layers only.
    monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
    trained, trained_grads, count = run('onednn', True)
    assert count == 2 * sum(TINY['depths'])  # qkv and fc1 of each block, in one chunk each
    reference, reference_grads, count = run('native', True)
    assert count == 0
    for a, b in zip(trained, reference):
        assert torch.equal(a, b)
    assert trained_grads.keys() == reference_grads.keys()
    for name, g in trained_grads.items():
        assert torch.equal(g, reference_grads[name]), name
