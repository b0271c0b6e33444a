"""mmswin's compiled CPU kernels for bf16 inference (``mmswin/csrc``): the window attention against the
fp32 attention written out here from the official formulas and against PyTorch's bf16 path, the layer
norm against PyTorch's, both inside the backbones, where they apply, and their errors."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2, blocks, cpu_kernels, fused_attention
from mmswin.models.attention import WindowAttention
from mmswin.models.layer_norm import LayerNorm
from mmswin.models.layers import build_norm
from mmswin.models.matmul import attention

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                   reason='the compiled kernels need Linux on x86 with AVX512-BF16')
TINY = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), drop_path_rate=0.0)


def test_kernels_are_built_where_the_cpu_runs_them():
    """An install on Linux builds the kernels; where this CPU has AVX512-BF16 they must load, so that a
    failed build cannot hide behind the skips of the tests below."""
    if not sys.platform.startswith('linux') or os.environ.get('MMSWIN_WITH_OPS') == '0':
        pytest.skip('the kernels are built on Linux unless MMSWIN_WITH_OPS=0')
    if not torch._C._cpu._get_cpu_capability().get('avx512_bf16'):
        pytest.skip('this CPU has no AVX512-BF16')
    assert cpu_kernels.kernels_available()


def fp32_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor, mask, scale: torch.Tensor,
                   cosine: bool) -> torch.Tensor:
    """The official window attention in fp32 (fp64 for fp64 ``qkv``) from the same inputs: ``(B_, N, 3C)``
    to ``(B_, N, C)``."""
    bw, n, c3 = qkv.shape
    q, k, v = qkv.to(torch.promote_types(qkv.dtype, torch.float32)).view(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if cosine:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale.view(-1, 1, 1)
    else:
        logits = (q * scale.view(-1, 1, 1)) @ k.transpose(-2, -1)
    logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, heads, n, n) + mask.unsqueeze(1)).view(bw, heads, n, n)
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c3 // 3)


def pytorch_bf16_attention(qkv, heads, bias, mask, scale, cosine):
    """The same attention through PyTorch's bf16 operators, as mmswin computes it without the kernel."""
    bw, n, c3 = qkv.shape
    q, k, v = qkv.view(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    if cosine:
        q = F.normalize(q, dim=-1) * scale.view(-1, 1, 1).to(q.dtype)
        k = F.normalize(k, dim=-1)
    else:
        q = q * scale.view(-1, 1, 1).to(q.dtype)
    out = attention(q, k, v, bias.to(q.dtype).unsqueeze(0), mask, 0.0, 1.0)
    return out.transpose(1, 2).reshape(bw, n, c3 // 3)


def inputs(bw: int, heads: int, n: int, d: int, nw, cosine: bool, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(bw, n, 3 * heads * d, generator=g).bfloat16()
    bias = torch.randn(heads, n, n, generator=g)
    if cosine:
        scale = torch.rand(heads, generator=g) * 30 + 1
    else:
        scale = torch.full((heads,), d ** -0.5)
    mask = None
    if nw is not None:  # Swin's shift mask: 0 or -100
        mask = torch.where(torch.rand(nw, n, n, generator=g) < 0.3, -100.0, 0.0)
        mask.diagonal(dim1=1, dim2=2).zero_()
    return qkv, bias, mask, scale


# (windows, heads, tokens, head width, mask windows): Swin's 7x7 windows at three head counts, two images
# sharing a mask, V2's 12x12 and 16x16 windows, odd token counts, and head widths of 16 to 64. The token counts
# leave every remainder of the kernels' steps (4 and 2 query rows, 16-lane vectors; windows over 64 tokens take
# another softmax): 1, 5, 6, 7, 10, 17, 30, 49, 81 and 100 as well as 64, 144 and 256.
SHAPES = [(83, 3, 49, 32, 83), (12, 6, 49, 32, None), (24, 12, 49, 32, 12), (4, 2, 144, 32, 2),
          (2, 2, 256, 32, None), (3, 1, 5, 16, None), (2, 2, 64, 64, 1), (4, 3, 17, 48, 2), (2, 1, 1, 16, None),
          (4, 2, 100, 32, 2), (2, 1, 81, 16, None), (3, 2, 6, 16, None), (4, 2, 7, 16, 2), (2, 1, 10, 32, None),
          (2, 2, 30, 16, 1)]


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
@pytest.mark.parametrize('shape', SHAPES)
def test_equals_the_fp32_attention_to_bf16_rounding(shape, cosine):
    """Each output within the rounding of bf16 weights and output of the fp32 attention of the same
    inputs, and closer to it overall than PyTorch's bf16 path (which also rounds the logits)."""
    bw, heads, n, d, nw = shape
    qkv, bias, mask, scale = inputs(bw, heads, n, d, nw, cosine)
    out = fused_attention.window_attention(qkv, heads, bias, mask, scale, cosine)
    assert out.shape == (bw, n, heads * d) and out.dtype == torch.bfloat16
    ref = fp32_attention(qkv, heads, bias, mask, scale, cosine)
    # a bf16 output rounds by 2^-9 of itself; the bf16 weights move it by at most 2^-9 of max |v|
    v_max = qkv.float().view(bw, n, 3, -1)[:, :, 2].abs().max()
    assert ((out.float() - ref).abs() <= 2 ** -9 * ref.abs() + 2 ** -9 * v_max + 1e-6).all()
    plain = pytorch_bf16_attention(qkv, heads, bias, mask, scale, cosine)
    assert (out.float() - ref).norm() <= (plain.float() - ref).norm()


def cpu_flags() -> set:
    """The CPU's flags as Linux lists them."""
    with open('/proc/cpuinfo') as f:
        return next((set(line.split(':', 1)[1].split()) for line in f if line.startswith('flags')), set())


@needs_kernels
def test_amx_tiles_are_used_where_the_cpu_has_them(monkeypatch):
    """On Linux with AMX-BF16 the kernels multiply on the tiles (so that a build without them cannot hide
    behind the skips below), unless MMSWIN_AMX is 0; elsewhere never."""
    kernels = cpu_kernels.kernels()
    if sys.platform.startswith('linux'):
        assert kernels.amx_available() == ({'amx_tile', 'amx_bf16'} <= cpu_flags())
    monkeypatch.delenv('MMSWIN_AMX', raising=False)
    assert kernels.use_amx() == kernels.amx_available()
    monkeypatch.setenv('MMSWIN_AMX', '0')
    assert not kernels.use_amx()


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
@pytest.mark.parametrize('shape', SHAPES)
def test_attention_on_amx_tiles_is_that_of_the_instructions_to_bf16_rounding(shape, cosine, monkeypatch):
    """The inference's attention on AMX tiles, which sum the products in another order than AVX512-BF16's
    instructions: within the same bound of the fp32 attention, within two bf16 roundings of the
    instructions' outputs, and as close to the fp32 attention overall."""
    if not cpu_kernels.kernels().amx_available():
        pytest.skip('this CPU has no AMX tiles')
    bw, heads, n, d, nw = shape
    qkv, bias, mask, scale = inputs(bw, heads, n, d, nw, cosine)
    monkeypatch.delenv('MMSWIN_AMX', raising=False)
    tiles = fused_attention.window_attention(qkv, heads, bias, mask, scale, cosine).float()
    monkeypatch.setenv('MMSWIN_AMX', '0')
    plain = fused_attention.window_attention(qkv, heads, bias, mask, scale, cosine).float()
    ref = fp32_attention(qkv, heads, bias, mask, scale, cosine)
    v_max = qkv.float().view(bw, n, 3, -1)[:, :, 2].abs().max()
    assert ((tiles - ref).abs() <= 2 ** -9 * ref.abs() + 2 ** -9 * v_max + 1e-6).all()
    assert ((tiles - plain).abs() <= 2 ** -8 * plain.abs() + 2 ** -8 * v_max + 1e-6).all()
    assert (tiles - ref).norm() <= 1.05 * (plain - ref).norm()


@needs_kernels
def test_cosine_attention_of_zero_keys_is_f_normalize():
    """V2's padding tokens project to zero keys (k has no bias): F.normalize leaves them zero, so are
    their logits (not 0/0)."""
    qkv, bias, mask, scale = inputs(3, 2, 49, 32, None, cosine=True)
    qkv.view(3, 49, 3, 64)[:, 40:, 1] = 0
    qkv.view(3, 49, 3, 64)[0, 5, 0] = 0  # and a zero query
    out = fused_attention.window_attention(qkv, 2, bias, mask, scale, True)
    ref = fp32_attention(qkv, 2, bias, mask, scale, True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, rtol=2 ** -8, atol=2 ** -8 * qkv.float().abs().max())


@needs_kernels
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
def test_backbones_take_the_kernel_in_bf16_inference(cls, batch, monkeypatch):
    """Every block's attention takes the kernels in bf16 inference (padded, shifted windows, one and two
    images), and the outputs are as close to fp32's as those of PyTorch's bf16 operators."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4).eval()
    with torch.no_grad():  # off V2's zero-initialised post-norms, so every block matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(batch, 3, 70, 90)
    calls = []
    for name in ('window_attention', 'projected_window_attention_rows'):
        def counted(*args, kernel=getattr(fused_attention, name), **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(fused_attention, name, counted)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', torch.bfloat16):
            fused = model(x)
            assert len(calls) >= sum(TINY['depths'])
            calls.clear()
            monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
            plain = model(x)
            assert not calls
    for f, p, r in zip(fused, plain, ref):
        assert f.dtype == torch.bfloat16 and f.shape == r.shape
        cos_fused = F.cosine_similarity(f.float().flatten(), r.flatten(), dim=0)
        cos_plain = F.cosine_similarity(p.float().flatten(), r.flatten(), dim=0)
        assert cos_fused > 0.9999 and cos_fused >= cos_plain - 1e-5


@needs_kernels
def test_where_the_kernel_applies(monkeypatch):
    x = torch.randn(4, 49, 96)
    with torch.no_grad():
        assert not fused_attention.applies(x, 3, 0.0)  # fp32
        with torch.autocast('cpu', torch.bfloat16):
            assert fused_attention.applies(x, 3, 0.0)
            assert fused_attention.applies(x.bfloat16(), 3, 0.0)
            assert not fused_attention.applies(x, 4, 0.0)  # head width 24
            assert not fused_attention.applies(x, 3, 0.1)  # dropout
            assert not fused_attention.applies(torch.randn(1, 1025, 96), 3, 0.0)
            for setting in ('native', 'fp32'):
                monkeypatch.setenv('MMSWIN_BF16_MATMUL', setting)
                assert not fused_attention.applies(x, 3, 0.0)
            monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'auto')
    with torch.autocast('cpu', torch.bfloat16):  # gradients wanted: the kernels' backward
        assert fused_attention.applies(x.requires_grad_(), 3, 0.0)
    assert not fused_attention.applies(x.to('meta'), 3, 0.0)


@needs_kernels
@pytest.mark.parametrize('change,message', [
    (dict(qkv=torch.zeros(2, 49, 96)), 'qkv must be a contiguous'),
    (dict(qkv=torch.zeros(2, 49, 96, dtype=torch.bfloat16)[:, :, ::2]), 'qkv must be a contiguous'),
    (dict(heads=4), 'head width must be a multiple of 16'),
    (dict(heads=5), "qkv's last axis"),
    (dict(bias=torch.zeros(2, 49, 49)), 'bias must be'),
    (dict(bias=torch.zeros(1, 49, 49, dtype=torch.bfloat16)), 'bias must be'),
    (dict(mask=torch.zeros(2, 48, 48)), 'mask must be'),
    (dict(mask=torch.zeros(3, 49, 49)), 'not whole images'),
    (dict(scale=torch.ones(2)), 'scale must hold one'),
])
def test_bad_input_is_named(change, message):
    args = dict(qkv=torch.zeros(2, 49, 96, dtype=torch.bfloat16), heads=1, bias=torch.zeros(1, 49, 49),
                mask=None, scale=torch.ones(1))
    args.update(change)
    kernels = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match=message):
        kernels.window_attention(args['qkv'], args['heads'], args['bias'], args['mask'], args['scale'], False)


def fp64_attention_grads(qkv, heads, bias, mask, scale, cosine, grad) -> tuple:
    """Gradients of ``qkv``, ``bias`` and ``scale`` of :func:`fp32_attention` taken in fp64 at the same
    (bf16) inputs."""
    x, b, s = (t.double().requires_grad_() for t in (qkv, bias, scale))
    out = fp32_attention(x, heads, b, None if mask is None else mask.double(), s, cosine)
    out.backward(grad.double())
    return x.grad, b.grad, s.grad


def pytorch_bf16_attention_grads(qkv, heads, bias, mask, scale, cosine, grad) -> tuple:
    """The same gradients through PyTorch's bf16 operators (:func:`pytorch_bf16_attention`)."""
    x, b, s = qkv.clone().requires_grad_(), bias.clone().requires_grad_(), scale.clone().requires_grad_()
    pytorch_bf16_attention(x, heads, b, mask, s, cosine).backward(grad)
    return x.grad, b.grad, s.grad


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """``|value - ref| / |ref|``; ``|value|`` where ``ref`` is zero (one-token windows' q, k, bias)."""
    apart = (value.double() - ref).norm()
    return (apart / ref.norm() if ref.norm() > 0 else apart).item()


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
@pytest.mark.parametrize('shape', SHAPES)
def test_gradients_equal_the_fp64_ones_to_bf16_rounding(shape, cosine, monkeypatch):
    """The backward's gradients against the fp64 gradients of the same inputs: those of q, k and v (bf16)
    within bf16's rounding (0.24 % relative at 49 tokens, where PyTorch's bf16 operators are 0.55 % off,
    and 1.5 % for V2), those of the position bias and V2's logit scales (fp32 sums of fp32 terms) to
    1e-3, 1e-6 at 49 tokens (PyTorch's: 0.5-1.4 %)."""
    bw, heads, n, d, nw = shape
    qkv, bias, mask, scale = inputs(bw, heads, n, d, nw, cosine)
    grad = torch.randn(bw, n, heads * d, generator=torch.Generator().manual_seed(1)).bfloat16()
    x, b, s = qkv.clone().requires_grad_(), bias.clone().requires_grad_(), scale.clone().requires_grad_()
    out = fused_attention.window_attention(x, heads, b, mask, s, cosine)
    monkeypatch.setenv('MMSWIN_AMX', '0')  # the inference's outputs without AMX tiles: those of training
    assert torch.equal(out, fused_attention.window_attention(qkv, heads, bias, mask, scale, cosine))
    out.backward(grad)
    assert x.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32 and x.grad.shape == qkv.shape
    refs = fp64_attention_grads(qkv, heads, bias, mask, scale, cosine, grad)
    plain = pytorch_bf16_attention_grads(qkv, heads, bias, mask, scale, cosine, grad)
    c = heads * d
    parts = [(x.grad[..., i * c:(i + 1) * c], refs[0][..., i * c:(i + 1) * c],
              plain[0][..., i * c:(i + 1) * c]) for i in range(3)]
    parts.append((b.grad, refs[1], plain[1]))
    if cosine:
        parts.append((s.grad, refs[2], plain[2]))
    else:
        assert s.grad is None or not s.grad.any()
    for i, (value, ref, other) in enumerate(parts):
        error = relative_error(value, ref)
        assert error < (5e-3 if i < 3 else 1e-3)
        assert error <= 1.1 * relative_error(other, ref) + 1e-4


@needs_kernels
def test_gradients_of_zero_keys_are_f_normalizes():
    """V2's padding tokens have zero keys: F.normalize's gradient there is the input's gradient over eps,
    with no projection term; the kernel's is the same, finite where the scale makes it so."""
    qkv, bias, mask, scale = inputs(2, 2, 49, 32, None, cosine=True)
    qkv.view(2, 49, 3, 64)[:, 40:, 1] = 0
    grad = torch.randn(2, 49, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    x, s = qkv.clone().requires_grad_(), scale.clone().requires_grad_()
    fused_attention.window_attention(x, 2, bias, mask, s, True).backward(grad)
    ref_x, _, ref_s = fp64_attention_grads(qkv, 2, bias, mask, scale, True, grad)
    assert relative_error(x.grad, ref_x) < 5e-3 and relative_error(s.grad, ref_s) < 1e-5


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
def test_weights_below_fp32s_normal_numbers_are_zero(cosine):
    """A softmax weight under fp32's smallest normal number (2^-126 of its row's largest), as at the shift
    mask's -100, is 0 in the forward and the backward, never a denormal (Intel's CPUs take a microcode assist
    for each instruction that makes or reads one): the bias gradient is exactly 0 where every window masks
    the position, and neither the output nor a gradient holds a denormal."""
    qkv, bias, mask, scale = inputs(12, 3, 49, 32, 1, cosine)
    scale = scale.clamp(max=4.0)  # V2's logits stay within a few units of each other: e^-100 underflows
    grad = torch.randn(12, 49, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    x, b, s = qkv.clone().requires_grad_(), bias.clone().requires_grad_(), scale.clone().requires_grad_()
    out = fused_attention.window_attention(x, 3, b, mask, s, cosine)
    out.backward(grad)
    masked = (mask[0] == -100).expand(3, 49, 49)
    assert masked.sum() > 1000 and not b.grad[masked].any() and b.grad[~masked].all()
    tiny = torch.finfo(torch.float32).tiny
    for t in (out, x.grad, b.grad, s.grad if cosine else b.grad):
        assert not ((t.float().abs() < tiny) & (t != 0)).any()


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
def test_gradient_sums_do_not_depend_on_the_threads(cosine):
    """The bias and scale gradients are sums over windows in a fixed order: the same bits on one thread
    and on several, as every other gradient."""
    qkv, bias, mask, scale = inputs(150, 3, 49, 32, 75, cosine)
    grad = torch.randn(150, 49, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    kernels = cpu_kernels.kernels()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _, lse = kernels.window_attention_with_lse(qkv, 3, bias, mask, scale, cosine)
            results.append(kernels.window_attention_backward(grad, qkv, lse, 3, bias, mask, scale, cosine,
                                                             True, True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or torch.equal(a, b)
    grad_qkv, grad_bias, grad_scale = results[0]
    assert grad_bias.shape == (3, 49, 49) and (grad_scale.shape == (3,) if cosine else grad_scale is None)


@needs_kernels
@pytest.mark.parametrize('change,message', [
    (dict(grad=torch.zeros(2, 49, 64, dtype=torch.bfloat16)), 'grad must be a contiguous'),
    (dict(grad=torch.zeros(2, 49, 32)), 'grad must be a contiguous'),
    (dict(lse=torch.zeros(2, 1, 48)), 'lse must be'),
    (dict(lse=torch.zeros(2, 1, 49, dtype=torch.float64)), 'lse must be'),
    (dict(bias=torch.zeros(2, 49, 49)), 'window_attention_backward: bias must be'),
])
def test_bad_backward_input_is_named(change, message):
    args = dict(grad=torch.zeros(2, 49, 32, dtype=torch.bfloat16), qkv=torch.zeros(2, 49, 96, dtype=torch.bfloat16),
                lse=torch.zeros(2, 1, 49), bias=torch.zeros(1, 49, 49), scale=torch.ones(1))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.kernels().window_attention_backward(args['grad'], args['qkv'], args['lse'], 1, args['bias'],
                                                        None, args['scale'], False, True, False)


@needs_kernels
@pytest.mark.parametrize('cosine', [False, True])
def test_projected_attention_in_chunks_equals_one_piece(cosine):
    """Where autograd records, the projection and the attention run in chunks of windows inside one image
    (the shift mask's rows follow them): the same outputs and input gradients as in one piece, the
    projection's weight and bias gradients to bf16's rounding of each chunk's share, the other sums to
    fp32's rounding, and all of them the fp64 ones to bf16's rounding."""
    g = torch.Generator().manual_seed(0)
    heads, n, c, nw = 2, 49, 64, 5
    x = torch.randn(2 * nw, n, c, generator=g).bfloat16()
    weight, qkv_bias = torch.randn(3 * c, c, generator=g) * c ** -0.5, torch.randn(3 * c, generator=g)
    _, bias, mask, scale = inputs(2 * nw, heads, n, c // heads, nw, cosine)
    grad = torch.randn(2 * nw, n, c, generator=g).bfloat16()
    results = []
    wanted = (x, weight, qkv_bias, bias, scale) if cosine else (x, weight, qkv_bias, bias)  # V1's scale is fixed
    for chunk_tokens in (2 * n, 10 ** 6):
        leaves = [t.clone().requires_grad_() for t in wanted] + [scale][len(wanted) - 4:]
        out = fused_attention.projected_window_attention(leaves[0], leaves[1], leaves[2], heads, leaves[3], mask,
                                                         leaves[4], cosine, chunk_tokens)
        out.backward(grad)
        results.append([out] + [t.grad for t in leaves[:len(wanted)]])
    (out, *grads), (whole, *whole_grads) = results
    assert out.dtype == torch.bfloat16 and torch.equal(out, whole)
    assert torch.equal(grads[0], whole_grads[0])
    for i, (part, one) in enumerate(zip(grads[1:], whole_grads[1:])):
        # the projection's are sums of the chunks' bf16 products and sums (one rounding each), the position
        # bias's and the scales' fp32 sums
        assert part.dtype == torch.float32 and relative_error(part, one.double()) < (4e-3 if i < 2 else 1e-5)
    leaves = [t.double().requires_grad_() for t in wanted] + [scale.double()][len(wanted) - 4:]
    ref = fp32_attention(F.linear(leaves[0], leaves[1].bfloat16().double(), leaves[2].bfloat16().double()), heads,
                         leaves[3], mask.double(), leaves[4], cosine)
    ref.backward(grad.double())
    assert relative_error(out, ref.detach()) < 5e-3
    for value, leaf in zip(grads, leaves):
        assert relative_error(value, leaf.grad) < 1e-2


def record_kernel_calls(monkeypatch) -> list:
    """The names of the kernels the models call from now on, in order (a list that grows)."""
    calls = []
    kernels = cpu_kernels.kernels()

    class Recording:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(kernels, name)(*args)
            return call

    monkeypatch.setattr(cpu_kernels, 'kernels', lambda: Recording())
    return calls


def parameter_grads(model, x: torch.Tensor) -> dict:
    model.zero_grad()
    with torch.autocast('cpu', torch.bfloat16):
        outs = model(x)
    sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tiny_backbone(cls) -> torch.nn.Module:
    """A small backbone of ``cls`` in training mode, its parameters moved off their initialisation (V2's
    zero-initialised post-norms) so that every block matters."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@needs_kernels
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
def test_backbones_take_the_kernels_in_bf16_training(cls, batch, monkeypatch):
    """Every block's attention takes the kernels' forward and backward in bf16 training (of the map's own
    tokens: padded and shifted windows, one and two images), and the parameters' gradients (the position
    bias tables, V2's CPB MLP and logit scales included) are closer to the fp32 ones than with PyTorch's
    bf16 operators."""
    model = tiny_backbone(cls)
    x = torch.randn(batch, 3, 70, 90)
    model.zero_grad()
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in model(x)).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    calls = record_kernel_calls(monkeypatch)
    fused = parameter_grads(model, x)
    depth = sum(TINY['depths'])
    # one call per block, image and chunk
    assert calls.count('window_attention_rows_with_lse') == calls.count('window_attention_rows_backward')
    assert calls.count('window_attention_rows_with_lse') >= depth * batch
    assert not {'window_attention', 'window_attention_with_lse', 'window_attention_rows'} & set(calls)
    monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
    plain = parameter_grads(model, x)
    assert set(fused) == set(plain) == set(ref)
    names = [n for n in ref if 'relative_position_bias_table' in n or 'logit_scale' in n or 'cpb_mlp' in n]
    assert len(names) >= depth
    # Per parameter, the relative error of its gradient against fp32's: the kernels' are about 0.4 % in the
    # median (PyTorch's bf16 operators 0.55-0.75 %), at most 6 % (PyTorch's up to 36 %) for the few-number
    # gradients of V2's logit scales, moved by the bf16 rounding of every gradient above them.
    errors = torch.tensor([[relative_error(grads[name], ref[name].double()) for name in ref]
                           for grads in (fused, plain)])
    # Measured: at most 1.5 %, 6.3 %, 1.4 % and 3.3 % (PyTorch's 10 %, 10 %, 36 % and 36 %); medians 0.36-0.42 %.
    assert errors[0].max() < 0.1 and errors[0].max() < errors[1].max()
    assert errors[0].median() < 0.006
    assert errors[0].median() <= errors[1].median() and errors[0].mean() <= errors[1].mean()


@needs_kernels
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
def test_training_of_the_map_tokens_equals_the_padded_windows(cls, batch, monkeypatch):
    """bf16 training with the attention of the map's own tokens against that of the padded windows: the same
    outputs and image gradient bit for bit, and parameter gradients within bf16's rounding (the GEMMs over
    fewer rows may sum in another order, and the padding tokens' share of the qkv bias is summed in fp32)."""
    model = tiny_backbone(cls)
    x = torch.randn(batch, 3, 70, 90)

    def run():
        model.zero_grad()
        image = x.clone().requires_grad_()
        with torch.autocast('cpu', torch.bfloat16):
            outs = model(image)
        sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
        return outs, image.grad, {name: p.grad.clone() for name, p in model.named_parameters()}

    calls = record_kernel_calls(monkeypatch)
    tokens = run()
    assert 'window_attention_rows_backward' in calls and 'window_attention_backward' not in calls
    monkeypatch.setattr(WindowAttention, 'attends_rows', lambda self, x, window: False)
    padded = run()
    assert 'window_attention_backward' in calls
    assert all(torch.equal(a, b) for a, b in zip(tokens[0], padded[0]))
    assert torch.equal(tokens[1], padded[1])
    for name, grad in padded[2].items():
        assert (tokens[2][name] - grad).norm() <= 2 ** -8 * grad.norm(), name


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of bf16 at ``x`` (fp32)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)


@needs_kernels
@pytest.mark.parametrize('rows,channels', [(4096, 96), (4067, 384), (7, 3072), (5, 16), (3, 17), (1, 40)])
@pytest.mark.parametrize('affine', [True, False])
def test_layer_norm_equals_pytorchs(rows, channels, affine):
    """Rounded once from the fp32 normalisation, as PyTorch's bf16 layer norm: at most one bf16 ulp from
    it, in a few values per ten thousand, and within bf16's rounding of the fp32 layer norm."""
    torch.manual_seed(0)
    norm = LayerNorm(channels, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = (torch.randn(rows, channels) * 3 + 2).bfloat16()
    with torch.no_grad():
        out = norm(x)
        torchs = F.layer_norm(x, (channels,), norm.weight, norm.bias, norm.eps)
        ref = F.layer_norm(x.float(), (channels,), norm.weight, norm.bias, norm.eps)
        # fp32's rounding of the terms x * rstd, mean * rstd (and bias), where they cancel
        var, mean = torch.var_mean(x.float(), -1, keepdim=True, correction=0)
        terms = (x.float().abs() + mean.abs()) * (var + norm.eps).rsqrt()
        if affine:
            terms = terms * norm.weight.abs() + norm.bias.abs()
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    apart = (out.float() - torchs.float()).abs()
    assert (apart <= bf16_ulp(torchs.float().abs()) + 2 ** -19 * terms).all()  # both sides round
    assert (apart > 0).float().mean() < 1e-3
    assert ((out.float() - ref).abs() <= bf16_ulp(ref.abs()) / 2 + 2 ** -20 * terms).all()


@needs_kernels
def test_layer_norm_takes_the_kernels_for_bf16_only(monkeypatch):
    norm = build_norm(dict(type='LN', eps=1e-6), 32)
    assert isinstance(norm, LayerNorm) and isinstance(norm, torch.nn.LayerNorm)
    assert set(norm.state_dict()) == {'weight', 'bias'}
    calls = record_kernel_calls(monkeypatch)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        norm(x)  # fp32
        norm(x.bfloat16().transpose(0, 1))  # not contiguous: made so
        assert calls == ['layer_norm']
    out = norm(x.bfloat16().requires_grad_())  # gradients wanted
    out.float().sum().backward()
    assert norm.weight.grad is not None
    assert calls == ['layer_norm', 'layer_norm_with_stats', 'layer_norm_backward']
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    with torch.no_grad():
        norm(x.bfloat16())
    assert len(calls) == 3


@needs_kernels
@pytest.mark.parametrize('rows,channels', [(20000, 96), (4067, 384), (7, 3072), (3, 17)])
@pytest.mark.parametrize('wanted', ['all', 'x', 'params'])
def test_layer_norm_gradients_are_the_exact_ones_to_bf16(rows, channels, wanted):
    """The backward of the kernels' layer norm against the fp64 gradients of the same bf16 values: the
    input's within half a bf16 ulp (rounded once, to nearest, from fp32 sums), the weight's and bias's (fp32
    sums over all rows) to 1e-5 relative, where PyTorch's bf16 backward loses several percent over ten thousand
    rows."""
    torch.manual_seed(0)
    norm = LayerNorm(channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm.requires_grad_(wanted != 'x')
    x = (torch.randn(rows, channels) * 3 + 2).bfloat16().requires_grad_(wanted != 'params')
    grad = torch.randn(rows, channels).bfloat16()
    out = norm(x)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    F.layer_norm(x64, (channels,), w64, b64, norm.eps).backward(grad.double())
    assert out.dtype == torch.bfloat16
    if wanted != 'params':
        assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
        scale = x64.grad.abs().max()
        ulp = bf16_ulp(x64.grad.abs().float()).double()
        assert ((x.grad.double() - x64.grad).abs() <= ulp / 2 + 1e-6 * scale).all()
    else:
        assert x.grad is None
    if wanted != 'x':
        for p, ref in ((norm.weight, w64), (norm.bias, b64)):
            assert p.grad.dtype == torch.float32
            assert (p.grad.double() - ref.grad).norm() <= 1e-5 * ref.grad.norm()
    else:
        assert norm.weight.grad is None and norm.bias.grad is None


@needs_kernels
def test_layer_norm_backward_bad_input_is_named():
    kernels = cpu_kernels.kernels()
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    out, stats = kernels.layer_norm_with_stats(x, None, None, 1e-5)
    assert out.shape == x.shape and stats.shape == (4, 2) and stats.dtype == torch.float32
    with pytest.raises(RuntimeError, match="grad must be a contiguous bf16 CPU tensor of x's shape"):
        kernels.layer_norm_backward(torch.zeros(4, 7, dtype=torch.bfloat16), x, stats, None, True, True, True)
    with pytest.raises(RuntimeError, match='stats must be the contiguous'):
        kernels.layer_norm_backward(x, x, stats[:3], None, True, True, True)
    with pytest.raises(RuntimeError, match='weight must be'):
        kernels.layer_norm_backward(x, x, stats, torch.ones(8, dtype=torch.bfloat16), True, True, True)


@needs_kernels
@pytest.mark.parametrize('change,message', [
    (dict(x=torch.zeros(4, 8)), 'x must be a contiguous'),
    (dict(weight=torch.ones(7)), 'weight must be'),
    (dict(bias=torch.zeros(8, dtype=torch.bfloat16)), 'bias must be'),
    (dict(eps=-1.0), 'eps must not be negative'),
])
def test_layer_norm_bad_input_is_named(change, message):
    args = dict(x=torch.zeros(4, 8, dtype=torch.bfloat16), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.kernels().layer_norm(args['x'], args['weight'], args['bias'], args['eps'])


@needs_kernels
@pytest.mark.parametrize('batch,length,channels', [
    (1, 64, 96),  # whole tiles of 32 tokens on cache lines (non-temporal stores)
    (2, 96, 48),  # two images, each a whole number of tiles
    (1, 1634, 16),  # a last tile of 2 tokens, rows not on cache lines
    (3, 40, 17),  # a channel tail
    (1, 7, 40),  # less than one tile
    (2, 32, 1),
])
@pytest.mark.parametrize('affine', [True, False])
def test_layer_norm_channels_first_is_the_transposed_norm(batch, length, channels, affine):
    """The norm of tokens ``(B, L, C)`` written as ``(B, C, L)``: the kernels' layer norm, transposed, bit for
    bit."""
    x, _, weight, bias = rows_inputs(batch, length, channels)
    kernels = cpu_kernels.kernels()
    args = (weight, bias) if affine else (None, None)
    out = kernels.layer_norm_channels_first(x, *args, 1e-5)
    expected = kernels.layer_norm(x, *args, 1e-5).transpose(1, 2)
    assert out.shape == (batch, channels, length) and out.is_contiguous() and torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize('batch,hw,channels', [(1, (8, 12), 96), (2, (5, 7), 48), (1, (3, 11), 17)])
def test_output_norm_in_training_equals_the_plain_layers(batch, hw, channels, monkeypatch):
    """A backbone output's norm where autograd records, through the kernels (the norm written as (B, C, H, W),
    its gradient laid out by token): the values and gradients of the norm, permute and copy, bit for bit."""
    from mmswin.models.layers import norm_channels_first
    g = torch.Generator().manual_seed(0)
    norm = LayerNorm(channels)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = (torch.randn(batch, *hw, channels, generator=g) * 2 + 1).bfloat16()
    grad = torch.randn(batch, channels, *hw, generator=g).bfloat16()

    def run(fused):
        norm.zero_grad()
        tokens = x.clone().requires_grad_()
        out = norm_channels_first(norm, tokens) if fused else norm(tokens).permute(0, 3, 1, 2).contiguous()
        out.backward(grad)
        return out.detach(), tokens.grad, norm.weight.grad.clone(), norm.bias.grad.clone()

    calls = record_kernel_calls(monkeypatch)
    fused = run(True)
    assert calls == ['layer_norm_channels_first_with_stats', 'channels_last_bf16', 'layer_norm_backward']
    plain = run(False)
    assert fused[0].is_contiguous() and fused[0].shape == (batch, channels, *hw)
    for f, p in zip(fused, plain):
        assert f.dtype == p.dtype and torch.equal(f, p)


@needs_kernels
@pytest.mark.parametrize('change,message', [
    (dict(x=torch.zeros(4, 8, dtype=torch.bfloat16)), 'x must be a contiguous'),
    (dict(x=torch.zeros(1, 8, 4, dtype=torch.bfloat16).transpose(1, 2)), 'x must be a contiguous'),
    (dict(weight=torch.ones(7)), 'weight must be'),
    (dict(bias=torch.zeros(8, dtype=torch.bfloat16)), 'bias must be'),
    (dict(eps=-1.0), 'eps must not be negative'),
])
def test_layer_norm_channels_first_bad_input_is_named(change, message):
    args = dict(x=torch.zeros(1, 4, 8, dtype=torch.bfloat16), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.kernels().layer_norm_channels_first(args['x'], args['weight'], args['bias'], args['eps'])


@needs_kernels
@pytest.mark.parametrize('shape', [(1, 3, 40, 36), (2, 3, 37, 29), (1, 1, 5, 7), (1, 16, 9, 9), (2, 17, 6, 11),
                                   (1, 40, 3, 3), (1, 5, 1, 1)])
def test_channels_last_bf16_is_pytorchs_cast(shape):
    """The image rounded to bf16 and laid out channels-last, bit for bit as PyTorch's copy: 3 channels, one,
    a group of 16, groups and tails, pixels that end mid-tile."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 100
    out = cpu_kernels.kernels().channels_last_bf16(x)
    expected = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride() == expected.stride()
    assert torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize('shape', [(1, 96, 13, 17), (2, 17, 6, 11), (1, 3, 5, 7)])
def test_channels_last_bf16_of_bf16_is_pytorchs_copy(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = cpu_kernels.kernels().channels_last_bf16(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, x)


@needs_kernels
@pytest.mark.parametrize('x', [torch.zeros(1, 3, 4, 4, dtype=torch.float16), torch.zeros(3, 4, 4),
                               torch.zeros(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)])
def test_channels_last_bf16_bad_input_is_named(x):
    with pytest.raises(RuntimeError, match=r'x must be a contiguous \(B, C, H, W\) fp32 or bf16'):
        cpu_kernels.kernels().channels_last_bf16(x)


@needs_kernels
def test_patch_embedding_takes_the_image_kernel_in_bf16_inference(monkeypatch):
    """The bf16 patch embedding of an fp32 image reads it through the kernel, with the values of PyTorch's
    copy; where autograd records, PyTorch's copy."""
    torch.manual_seed(0)
    embed = blocks.PatchEmbed(3, 16, 4).eval()
    x = torch.randn(2, 3, 30, 41)
    kernels = cpu_kernels.kernels()
    calls = []

    class Counted:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def channels_last_bf16(self, image):
            calls.append(image.shape)
            return kernels.channels_last_bf16(image)

    monkeypatch.setattr(cpu_kernels, 'kernels', lambda: Counted())
    with torch.autocast('cpu', torch.bfloat16):
        with torch.no_grad():
            out = embed(x)
        assert calls == [(2, 3, 32, 44)]  # padded to whole patches first
        recorded = embed(x.requires_grad_())
    assert calls == [(2, 3, 32, 44)]
    assert torch.equal(out, recorded.detach())
    recorded.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def rows_inputs(batch: int, length: int, channels: int, seed: int = 0) -> tuple:
    """Tokens ``(B, L, C)``, a permutation of a chunk of their rows with padding positions (-1), and affine
    parameters."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, channels, generator=g) * 2 + 1).bfloat16()
    index = torch.randperm(length, generator=g)[:length // 2 + 1]
    index[torch.rand(index.shape, generator=g) < 0.2] = -1
    weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    return x, index, weight, bias


@needs_kernels
@pytest.mark.parametrize('batch,length,channels', [(1, 300, 96), (2, 257, 384), (3, 40, 17), (1, 9, 3072)])
def test_gather_rows_is_select_norm_and_zero_fill(batch, length, channels):
    x, index, weight, bias = rows_inputs(batch, length, channels)
    kernels = cpu_kernels.kernels()
    padding = (index < 0).nonzero().view(-1)
    selected = x.index_select(1, index.clamp(min=0)).index_fill_(1, padding, 0)
    assert torch.equal(kernels.gather_rows(x, index, None, None, 0.0, False), selected)
    normed = kernels.layer_norm(x.index_select(1, index.clamp(min=0)).contiguous(), weight, bias, 1e-5)
    out = kernels.gather_rows(x, index, weight, bias, 1e-5, True)
    assert torch.equal(out, normed.index_fill_(1, padding, 0))


@needs_kernels
@pytest.mark.parametrize('batch,length,channels', [(1, 300, 96), (2, 257, 384), (3, 40, 17), (1, 9, 3072)])
def test_add_rows_is_index_add_of_the_real_rows(batch, length, channels):
    x, index, weight, bias = rows_inputs(batch, length, channels)
    src = torch.randn(batch, index.numel(), channels).bfloat16()
    kernels = cpu_kernels.kernels()
    real = (index >= 0).nonzero().view(-1)
    expected = x.clone().index_add_(1, index[real], src[:, real])
    out = x.clone()
    assert kernels.add_rows_(out, index, src, None, None, 0.0, False) is not None
    assert torch.equal(out, expected)
    normed = kernels.layer_norm(src, weight, bias, 1e-5)  # the branch rounded to bf16, then added
    expected = x.clone().index_add_(1, index[real], normed[:, real])
    out = x.clone()
    kernels.add_rows_(out, index, src, weight, bias, 1e-5, True)
    assert torch.equal(out, expected)


@needs_kernels
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('compact', [True, False])
def test_window_chunks_in_kernels_equal_the_operators(cls, batch, compact, monkeypatch):
    """The blocks' bf16 inference through the row kernels gives the same numbers, bit for bit, as with
    PyTorch's gather, fill and index_add (padded and shifted windows, one and two images): with the
    attention in the kernels, from the projection of the real tokens only (compact), or of every window
    position."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(batch, 3, 70, 90)
    calls, projected = [], []
    block = blocks.SwinBlock if cls is SwinTransformer else blocks.SwinBlockV2
    step = block.window_chunk_in_kernels_

    def counted(self, tokens, chunk, *args):
        calls.append(chunk.rows.shape)
        return step(self, tokens, chunk, *args)

    attend_rows = WindowAttention.attend_rows

    def attend_real_rows(self, rows, slots, *args):
        projected.append((rows.shape[:2], (batch, int((slots >= 0).sum())), bool((slots < 0).any())))
        return attend_rows(self, rows, slots, *args)

    monkeypatch.setattr(block, 'window_chunk_in_kernels_', counted)
    monkeypatch.setattr(WindowAttention, 'attend_rows', attend_real_rows)
    if not compact:
        monkeypatch.setattr(WindowAttention, 'attends_rows', lambda self, tokens, window: False)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        fused = model(x)
        assert len(calls) >= sum(TINY['depths'])
        if compact:  # every chunk, of the real tokens only; at this size some windows are padded
            assert len(projected) == len(calls) and all(shape == real for shape, real, _ in projected)
            assert any(padded for _, _, padded in projected)
        else:
            assert not projected
        calls.clear()
        monkeypatch.setattr(blocks.SwinBlock, 'chunks_in_kernels', lambda self, tokens: False)
        plain = model(x)
        assert not calls
    for f, p in zip(fused, plain):
        assert f.dtype == torch.bfloat16 and torch.equal(f, p)


def rows_attention_inputs(batch: int, windows: int, n: int, heads: int, d: int, seed: int = 0,
                          in_order: bool = False) -> tuple:
    """The projection ``(B, R, 3C)`` of the real tokens of ``windows`` windows of ``n`` positions per image,
    about a quarter of them padding, in shuffled rows; their slots; the projection of a zero token; and the
    same windows as the ``(B * nW, N, 3C)`` projection of every position. ``in_order``: the models' layout
    instead, the rows in window order and padding only in the last window (the others are read in place)."""
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    if in_order:
        is_pad = torch.zeros(windows * n, dtype=torch.bool)
        is_pad[-n:] = torch.rand(n, generator=g) < 0.4
    else:
        is_pad = torch.rand(windows * n, generator=g) < 0.25
    real = int((~is_pad).sum())
    order = torch.arange(real) if in_order else torch.randperm(real, generator=g)
    slots = torch.full((windows * n,), -1, dtype=torch.long)
    slots[~is_pad] = order
    qkv = torch.randn(batch, real, 3 * c, generator=g).bfloat16()
    pad = torch.randn(3 * c, generator=g).bfloat16()
    every = pad.expand(batch, windows * n, 3 * c).clone()
    every[:, ~is_pad] = qkv[:, order]
    return qkv, slots, pad, every.view(batch * windows, n, 3 * c)


@needs_kernels
@pytest.mark.parametrize('batch,windows,n,heads,d', [(1, 4, 49, 3, 32), (2, 3, 49, 2, 16), (1, 2, 17, 1, 48),
                                                     (2, 5, 64, 4, 32)])
@pytest.mark.parametrize('cosine', [False, True])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('in_order', [False, True])
def test_window_attention_rows_is_that_of_the_padded_windows(batch, windows, n, heads, d, cosine, masked, in_order,
                                                            monkeypatch):
    """The attention of windows given by their real tokens' rows and the projection of padding, against the
    window attention of every position (whose padding positions get no output gradient): the outputs
    (inference, on AMX tiles where the CPU has them, and training) and lse of the real tokens in their rows,
    without the tiles the inference's outputs those of training, the gradients of their q, k and v,
    of the bias and of the scales bit for bit; the gradient of pad is the fp32 sum of the padding
    positions' k and v gradients (zero for q). In shuffled rows every window is gathered; in window order
    the full windows are read and written in place."""
    qkv, slots, pad, every = rows_attention_inputs(batch, windows, n, heads, d, in_order=in_order)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(heads, n, n, generator=g)
    mask = (torch.randn(windows, n, n, generator=g) * 10).clamp(max=0) if masked else None
    scale = torch.rand(heads, generator=g) + 0.5
    grad = torch.randn(batch, qkv.shape[1], heads * d, generator=g).bfloat16()
    kernels = cpu_kernels.kernels()
    real = slots >= 0
    order = slots[real]
    out, lse = kernels.window_attention_rows_with_lse(qkv, slots, pad, heads, bias, mask, scale, cosine)
    assert out.shape == (batch, qkv.shape[1], heads * d)
    infer = kernels.window_attention_rows(qkv, slots, pad, heads, bias, mask, scale, cosine)
    full_infer = kernels.window_attention(every, heads, bias, mask, scale, cosine)
    assert torch.equal(infer[:, order], full_infer.view(batch, windows * n, -1)[:, real])
    monkeypatch.setenv('MMSWIN_AMX', '0')
    assert torch.equal(kernels.window_attention_rows(qkv, slots, pad, heads, bias, mask, scale, cosine), out)
    into = torch.full_like(out, float('nan'))  # the outputs written into a given tensor, every row of it
    into_out, into_lse = kernels.window_attention_rows_with_lse(qkv, slots, pad, heads, bias, mask, scale, cosine, into)
    assert into_out.data_ptr() == into.data_ptr() and torch.equal(into, out) and torch.equal(into_lse, lse)
    full_out, full_lse = kernels.window_attention_with_lse(every, heads, bias, mask, scale, cosine)
    assert torch.equal(out[:, order], full_out.view(batch, windows * n, -1)[:, real])
    by_token = full_lse.view(batch, windows, heads, n).transpose(2, 3).reshape(batch, windows * n, heads)
    assert lse.shape == (batch, qkv.shape[1], heads) and torch.equal(lse[:, order], by_token[:, real])
    full_grad = torch.zeros(batch, windows * n, heads * d, dtype=torch.bfloat16)
    full_grad[:, real] = grad[:, order]
    grad_qkv, grad_pad, grad_bias, grad_scale = kernels.window_attention_rows_backward(
        grad, qkv, lse, slots, pad, heads, bias, mask, scale, cosine, True, True)
    full_qkv, full_bias, full_scale = kernels.window_attention_backward(
        full_grad.view(batch * windows, n, -1), every, full_lse, heads, bias, mask, scale, cosine, True, True)
    full_qkv = full_qkv.view(batch, windows * n, -1)
    assert torch.equal(grad_qkv[:, order], full_qkv[:, real])
    assert torch.equal(grad_bias, full_bias)
    if cosine:
        assert torch.equal(grad_scale, full_scale)
    padding = full_qkv[:, ~real].float().sum((0, 1))
    assert grad_pad.dtype == torch.float32 and (grad_pad[:heads * d] == 0).all()
    torch.testing.assert_close(grad_pad, padding, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize('change,message', [
    (dict(qkv=torch.zeros(5, 96, dtype=torch.bfloat16)), r'qkv must be a contiguous \(B, R, 3C\)'),
    (dict(slots=torch.tensor([0, 1, -1, 2], dtype=torch.int32)), 'slots must be a contiguous'),
    (dict(slots=torch.tensor([0, 1, -1])), 'slots must be a contiguous'),
    (dict(slots=torch.tensor([0, 1, -1, 3])), r'slots\[3\] = 3 is neither -1 nor a row'),
    (dict(slots=torch.tensor([0, 1, 1, 2])), 'slots name row 1 twice'),
    (dict(slots=torch.tensor([0, 1, -1, -1])), 'slots name 2 of qkv.s 3 rows'),
    (dict(pad=torch.zeros(95, dtype=torch.bfloat16)), 'pad must be a contiguous'),
    (dict(pad=torch.zeros(96)), 'pad must be a contiguous'),
    (dict(bias=torch.zeros(2, 4, 4)), 'bias must be'),
    (dict(mask=torch.zeros(2, 4, 4)), 'are not whole images of 2 mask windows'),
])
def test_window_attention_rows_bad_input_is_named(change, message):
    args = dict(qkv=torch.zeros(1, 3, 96, dtype=torch.bfloat16), slots=torch.tensor([0, 1, -1, 2]),
                pad=torch.zeros(96, dtype=torch.bfloat16), bias=torch.zeros(2, 4, 4), mask=None, scale=torch.ones(2))
    if 'bias' in change:
        args['heads'] = 1
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.kernels().window_attention_rows(args['qkv'], args['slots'], args['pad'], args.get('heads', 2),
                                                    args['bias'], args['mask'], args['scale'], False)


@needs_kernels
@pytest.mark.parametrize('out', [torch.zeros(1, 3, 95, dtype=torch.bfloat16), torch.zeros(1, 3, 96),
                                 torch.zeros(1, 96, 3, dtype=torch.bfloat16).transpose(1, 2)])
def test_window_attention_rows_bad_out_is_named(out):
    qkv, slots = torch.zeros(1, 3, 3 * 96, dtype=torch.bfloat16), torch.tensor([0, 1, -1, 2])
    pad = torch.zeros(3 * 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r'out must be a contiguous \(B, R, C\) = \(1, 3, 96\) bf16'):
        cpu_kernels.kernels().window_attention_rows_with_lse(qkv, slots, pad, 2, torch.zeros(2, 4, 4), None,
                                                             torch.ones(2), False, out)


@needs_kernels
@pytest.mark.parametrize('fn,change,message', [
    ('gather_rows', dict(x=torch.zeros(4, 8, dtype=torch.bfloat16)), 'x must be a contiguous'),
    ('gather_rows', dict(index=torch.zeros(3, dtype=torch.int32)), 'index must be a contiguous'),
    ('gather_rows', dict(index=torch.tensor([0, 4])), r'index\[1\] = 4 is not a row'),
    ('gather_rows', dict(weight=torch.ones(7)), 'weight must be'),
    ('add_rows_', dict(src=torch.zeros(1, 3, 8, dtype=torch.bfloat16)), 'src must be a contiguous'),
    ('add_rows_', dict(eps=-1.0), 'eps must not be negative'),
])
def test_row_kernels_bad_input_is_named(fn, change, message):
    args = dict(x=torch.zeros(1, 4, 8, dtype=torch.bfloat16), index=torch.tensor([1, -1]), weight=torch.ones(8),
                bias=torch.zeros(8), eps=1e-5, src=torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    args.update(change)
    kernels = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match=message):
        if fn == 'gather_rows':
            kernels.gather_rows(args['x'], args['index'], args['weight'], args['bias'], args['eps'], True)
        else:
            kernels.add_rows_(args['x'], args['index'], args['src'], args['weight'], args['bias'], args['eps'], True)


@needs_kernels
@pytest.mark.parametrize('rows,width', [(4096, 384), (300, 1536), (7, 3072), (5, 40), (1, 16)])
def test_gelu_backward_equals_the_exact_gelu_to_bf16_rounding(rows, width):
    """The training MLP's activation and its gradient in one pass: both within half a bf16 ulp (and the
    erf approximation's 1.5e-7, as PyTorch's) of the fp64 values, at most one ulp from PyTorch's bf16
    operators; the fp32 column sums of the bf16 gradient to fp32's rounding."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, width, generator=g) * 3).bfloat16()
    grad = torch.randn(rows, width, generator=g).bfloat16()
    act, grad_h, sums = cpu_kernels.kernels().gelu_backward(grad, h, True)
    assert act.dtype == grad_h.dtype == torch.bfloat16 and act.shape == grad_h.shape == h.shape
    x = h.double().requires_grad_()
    ref_act = F.gelu(x)
    ref_act.backward(grad.double())
    for value, ref, theirs in ((act, ref_act.detach(), F.gelu(h)),
                               (grad_h, x.grad, torch.ops.aten.gelu_backward(grad, h))):
        apart = (value.double() - ref).abs()
        assert (apart <= bf16_ulp(ref.abs().float()).double() / 2 + 1e-6 * (1 + h.double().abs())).all()
        assert ((value.float() - theirs.float()).abs() <= bf16_ulp(theirs.float().abs()) + 1e-6).all()
    assert sums.dtype == torch.float32 and sums.shape == (width,)
    assert relative_error(sums, grad_h.double().sum(0)) < 1e-6
    _, _, no_sums = cpu_kernels.kernels().gelu_backward(grad, h, False)
    assert no_sums is None


@needs_kernels
def test_gelu_backward_sums_do_not_depend_on_the_threads():
    g = torch.Generator().manual_seed(0)
    h, grad = (torch.randn(5000, 96, generator=g).bfloat16() for _ in range(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cpu_kernels.kernels().gelu_backward(grad, h, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


@needs_kernels
@pytest.mark.parametrize('h,grad,message', [
    (torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.bfloat16), 'h must be a contiguous'),
    (torch.zeros(2, 4, 16, dtype=torch.bfloat16), torch.zeros(2, 4, 16, dtype=torch.bfloat16), 'h must be'),
    (torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(4, 32, dtype=torch.bfloat16), 'grad must be'),
    (torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(4, 16), 'grad must be'),
])
def test_bad_gelu_backward_input_is_named(h, grad, message):
    with pytest.raises(RuntimeError, match=f'gelu_backward: {message}'):
        cpu_kernels.kernels().gelu_backward(grad, h, True)


@needs_kernels
@pytest.mark.parametrize('shape', [(1,), (15,), (17,), (96, 288), (3072, 768), (3, 5, 7)])
def test_accumulate_adds_bf16_to_fp32_as_pytorch_does(shape):
    """The chunk sums of the weight gradients: total += part in one pass, the values of PyTorch's mixed-dtype
    add_ bit for bit (a bf16 value is exact in fp32), tails of fewer than 16 values included, in place."""
    g = torch.Generator().manual_seed(0)
    total = torch.randn(shape, generator=g)
    part = torch.randn(shape, generator=g).bfloat16()
    expected = total.clone().add_(part)
    out = cpu_kernels.kernels().accumulate_(total, part)
    assert out.data_ptr() == total.data_ptr() and torch.equal(total, expected)


@needs_kernels
@pytest.mark.parametrize('total,part,message', [
    (torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16), 'total must be'),
    (torch.zeros(16, 4).t(), torch.zeros(4, 16, dtype=torch.bfloat16), r'total must be .*\(not contiguous\)'),
    (torch.zeros(4, 16), torch.zeros(4, 16), 'part must be a contiguous bf16'),
    (torch.zeros(4, 16), torch.zeros(4, 32, dtype=torch.bfloat16), r"part must be .* of total's shape \[4, 16\]"),
    (torch.zeros(4, 16), torch.zeros(16, 4, dtype=torch.bfloat16).t(), r'part must be .*\(not contiguous\)'),
])
def test_bad_accumulate_input_is_named(total, part, message):
    before = total.clone()
    with pytest.raises(RuntimeError, match=f'accumulate_: {message}'):
        cpu_kernels.kernels().accumulate_(total, part)
    assert torch.equal(total, before)
