"""The fast paths: inference attention runs in SDPA's fused CPU kernel (the math
fallback is several times slower), whatever the batch, the shift and the version."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmswin.models import SwinTransformer, SwinTransformerV2
from mmswin.models import cpu_kernels, layers, windows
from mmswin.models.attention import CosineWindowAttention, WindowAttention, unit_vectors
from mmswin.models.blocks import PatchEmbed
from mmswin.models.layer_norm import LayerNorm
from mmswin.models.layers import DropPath, add_residual
from mmswin.models.windows import (add_tokens_, gather_windows, log_spaced_coords_on, relative_position_index,
                                   scatter_windows, select_tokens, window_indices)

from .conftest import position_bias_parameters, with_visible_bias

TINY = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
FUSED = 'aten::_scaled_dot_product_flash_attention_for_cpu'
MATH = 'aten::_scaled_dot_product_attention_math'


def attention_kernels(model: torch.nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    return {e.key: e.count for e in prof.key_averages() if e.key in (FUSED, MATH)}


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('batch', [1, 2])
def test_inference_attention_is_fused(cls, batch):
    model = cls(**TINY, window_size=4).eval()
    # 70x90: padded, several windows per stage, so every block of the first stages shifts.
    kernels = attention_kernels(model, torch.randn(batch, 3, 70, 90))
    assert kernels == {FUSED: sum(TINY['depths'])}


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_cpu_training_attention_avoids_the_math_kernel(cls):
    """With gradients SDPA's CPU kernel for an additive mask is its math fallback (slower than the plain
    matmul/softmax path, which training takes there); the outputs are the fused inference ones, to the rounding
    of two fp32 softmax implementations carried through six blocks (up to 1.2e-5 on one CPU)."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).train()
    x = torch.randn(2, 3, 70, 90)
    with torch.profiler.profile() as prof:
        outs = model(x)
    names = {e.key for e in prof.key_averages()}
    assert FUSED not in names and MATH not in names
    with torch.no_grad():
        for a, b in zip(outs, model(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_training_backward_copies_no_logit_gradient(cls, dtype, monkeypatch):
    """The shift mask is added in place to logits that are not a view: an in-place add on a view would
    make autograd copy the whole logit gradient (CopySlices) in the backward of every shifted block.
    (PyTorch's operators, which bf16 takes where the compiled kernels are not used.)"""
    monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4).train()
    x = torch.randn(2, 3, 70, 90)
    with torch.profiler.profile() as prof:
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            outs = model(x)
        sum(o.float().sum() for o in outs).backward()
    names = {e.key for e in prof.key_averages()}
    assert 'aten::bmm' in names
    assert not [name for name in names if 'CopySlices' in name]


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_no_grad_inference_equals_recorded_forward(cls):
    """Without autograd the blocks write GELU and residual sums in place; the result must be bit for bit
    the out-of-place forward's, and the caller's input must stay untouched. (The matmul attention path:
    with a bias that needs gradients SDPA picks a different kernel, which differs in the last bits.)"""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4, use_sdpa=False)).eval()
    x = torch.randn(2, 3, 70, 90)
    x_copy = x.clone()
    recorded = model(x)
    assert all(out.requires_grad for out in recorded)
    with torch.no_grad():
        fast = model(x)
    for a, b in zip(recorded, fast):
        assert torch.equal(a, b)
    assert torch.equal(x, x_copy)


def test_v2_unit_vectors_gradients():
    """V2's scaled normalisation has a hand-written backward: gradcheck in fp64, and the same gradients
    as autograd through F.normalize for a batch holding a zero vector (a padding key)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: unit_vectors(a, s), (x, scale))
    assert torch.autograd.gradcheck(lambda a: unit_vectors(a), (x,))

    x = torch.randn(3, 2, 5, 4)
    x[1, 0, 2] = 0
    grad = torch.randn(3, 2, 5, 4)
    scale = torch.rand(2, 1, 1) * 10
    ours = [t.clone().requires_grad_() for t in (x, scale)]
    theirs = [t.clone().requires_grad_() for t in (x, scale)]
    unit_vectors(*ours).backward(grad)
    (torch.nn.functional.normalize(theirs[0], dim=-1) * theirs[1]).backward(grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)



def test_v2_attention_in_fp64_passes_gradcheck():
    """A float64 V2 attention keeps float64 throughout, its continuous position bias included: gradcheck of the
    output against the inputs and every parameter, the position-bias MLP's among them."""
    from torch.func import functional_call

    from mmswin.models.attention import CosineWindowAttention
    torch.manual_seed(0)
    attn = CosineWindowAttention(16, 2, 3, use_sdpa=False).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    assert attn.position_bias((3, 3)).dtype == torch.float64
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in attn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in attn.parameters()]

    def run(inputs, *values):
        return functional_call(attn, dict(zip(names, values)), (inputs, (3, 3)))

    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)

def test_v2_unit_vectors_keep_their_output_not_their_input():
    """The backward works from the output: the input (V2's raw queries and keys) is not kept, and a
    scale whose exponential underflows to zero gives the exponent the zero gradient autograd gives."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 4, requires_grad=True)
    log_scale = torch.tensor([[[1.5]], [[-200.0]]], requires_grad=True)  # exp: 4.48 and 0
    y = unit_vectors(x, log_scale.exp())
    saved = {t.data_ptr() for t in y.grad_fn.saved_tensors}
    assert y.data_ptr() in saved and x.data_ptr() not in saved
    grad = torch.randn_like(y)
    y.backward(grad)
    x2, s2 = x.detach().clone().requires_grad_(), log_scale.detach().clone().requires_grad_()
    (F.normalize(x2, dim=-1) * s2.exp()).backward(grad)
    assert torch.isfinite(x.grad).all() and log_scale.grad[1].item() == 0.0
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_scale.grad, s2.grad, rtol=1e-5, atol=1e-5)


def count_bias_computations(model: torch.nn.Module, monkeypatch) -> list:
    calls = []
    for module in {type(m) for m in model.modules() if hasattr(m, 'position_bias')}:
        original = module.position_bias

        def counted(self, window, _original=original):
            calls.append(window)
            return _original(self, window)

        monkeypatch.setattr(module, 'position_bias', counted)
    return calls


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_inference_reuses_position_bias_until_parameters_change(cls, monkeypatch):
    """In inference the position bias (V2: the CPB MLP's output) is computed once per block; a write to
    its parameters, even through ``.data`` as EMA hooks do (no version bump), recomputes it."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).eval()
    fresh = cls(**TINY, window_size=4).eval()
    x = torch.randn(1, 3, 70, 90)
    calls = count_bias_computations(model, monkeypatch)
    blocks = sum(TINY['depths'])
    with torch.no_grad():
        first = model(x)
        assert len(calls) == blocks
        again = model(x)
        assert len(calls) == blocks
        for a, b in zip(first, again):
            assert torch.equal(a, b)

        for p in position_bias_parameters(model):
            p.data.copy_(torch.randn_like(p))
        fresh.load_state_dict(model.state_dict())
        changed = model(x)
        assert len(calls) == 2 * blocks
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)  # the fused bf16 kernels take the fp32 bias: reused; PyTorch's bf16 path computes a bf16 one
            assert len(calls) == (2 if cpu_kernels.use_kernels() else 3) * blocks
            monkeypatch.setattr(cpu_kernels, 'use_kernels', lambda: False)
            model(x)  # PyTorch's bf16 path: another dtype, another bias, the fp32 one is not reused for it
        assert len(calls) == 3 * blocks
        assert model.layers[0].blocks[0].attn._bias_cache[3].dtype == torch.bfloat16
        expected = fresh(x)
    for a, b in zip(changed, expected):
        assert torch.equal(a, b)
    assert not torch.equal(changed[0], first[0])


@pytest.mark.parametrize('cls', [WindowAttention, CosineWindowAttention])
def test_position_bias_is_recomputed_when_the_parameters_change_dtype(cls, monkeypatch):
    """``model.bfloat16()`` then ``.float()``: the parameters hold the same (bf16-representable) values in
    another dtype, and the bias kept from the bf16 ones is not the fp32 one."""
    torch.manual_seed(0)
    attn = cls(32, 2, 4).eval()
    calls = count_bias_computations(attn, monkeypatch)
    with torch.no_grad():
        attn.bfloat16()
        attn.attention_bias((4, 4), torch.float32)
        attn.float()
        bias = attn.attention_bias((4, 4), torch.float32)
        assert len(calls) == 2
        torch.testing.assert_close(bias, attn.position_bias((4, 4)).unsqueeze(0), rtol=0, atol=0)


@pytest.mark.parametrize('cls', [WindowAttention, CosineWindowAttention])
def test_position_bias_is_kept_on_the_cpu_only(cls, monkeypatch):
    """Off the CPU the bias is computed on every call and never compared with a kept copy: the comparison
    would wait for the device once per block (and break CUDA graph capture). ``meta`` stands in for a
    GPU here; tests/test_cuda.py checks a CUDA forward for synchronisations."""
    torch.manual_seed(0)
    cpu = cls(32, 2, 4).eval()
    meta = cls(32, 2, 4).to('meta').eval()
    calls = count_bias_computations(cpu, monkeypatch)
    with torch.no_grad():
        kept = cpu.attention_bias((4, 4), torch.float32)
        assert cpu.attention_bias((4, 4), torch.float32) is kept and len(calls) == 1

        def no_comparison(*args):
            raise AssertionError('a bias off the CPU was compared with a kept copy')

        monkeypatch.setattr(torch, 'equal', no_comparison)
        for _ in range(2):
            bias = meta.attention_bias((4, 4), torch.float32)
            assert bias.device.type == 'meta' and bias.shape == (1, 2, 16, 16)
        assert len(calls) == 3 and meta._bias_cache is None


@pytest.mark.parametrize('cls', [WindowAttention, CosineWindowAttention])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('training', [False, True])
def test_position_bias_is_the_official_lookup_laid_out_contiguously(cls, dtype, training):
    """The bias added to the logits is contiguous in every dtype (a permuted view adds several times
    slower) and holds the official values: the table looked up per offset pair, permuted to heads first
    (V2: then ``16 * sigmoid``)."""
    torch.manual_seed(0)
    attn = cls(32, 2, 4).train(training)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    with torch.set_grad_enabled(training):
        bias = attn.attention_bias((4, 4), dtype)
    assert bias.shape == (1, 2, 16, 16) and bias.dtype == dtype and bias.is_contiguous()
    index = relative_position_index((4, 4)).view(-1)
    with torch.no_grad():
        if cls is WindowAttention:
            expected = attn.relative_position_bias_table[index].view(16, 16, -1).permute(2, 0, 1)
        else:
            table = attn.cpb_mlp(log_spaced_coords_on(4, 4, 0, 'cpu'))
            expected = 16 * torch.sigmoid(table[index].view(16, 16, -1).permute(2, 0, 1).contiguous())
    torch.testing.assert_close(bias[0].float(), expected.to(dtype).float(), rtol=1.3e-6, atol=1e-5)


def test_v2_normalises_queries_and_keys_in_one_pass():
    """V2's cosine attention takes the lengths of queries and keys in one reduction and normalises both
    in one autograd node (one pass forward, one backward: half the kernels of doing each apart), with the
    gradients of the official ``F.normalize`` form."""
    torch.manual_seed(0)
    attn = CosineWindowAttention(32, 2, 4)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(6, 16, 32, requires_grad=True)
    with torch.profiler.profile() as prof:
        q, k, v, scale = attn.queries_keys_values(x)
    assert [e.count for e in prof.key_averages() if e.key == 'aten::linalg_vector_norm'] == [1]
    assert q.grad_fn is k.grad_fn  # the unbind of one output
    assert type(q.grad_fn.next_functions[0][0]).__name__ == '_ScaledUnitVectorsBackward'

    reference = CosineWindowAttention(32, 2, 4)
    reference.load_state_dict(attn.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    qkv = torch.nn.functional.linear(x_ref, reference.qkv.weight, reference.qkv_bias())
    q_ref, k_ref, v_ref = qkv.view(6, 16, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    log_scale = torch.clamp(reference.logit_scale, max=math.log(100.0))
    q_ref = torch.nn.functional.normalize(q_ref, dim=-1) * log_scale.exp()
    k_ref = torch.nn.functional.normalize(k_ref, dim=-1)
    weights = [torch.randn_like(t) for t in (q, k, v)]
    for ours, theirs in zip((q, k, v), (q_ref, k_ref, v_ref)):
        torch.testing.assert_close(ours, theirs)
    sum((t * w).sum() for t, w in zip((q, k, v), weights)).backward()
    sum((t * w).sum() for t, w in zip((q_ref, k_ref, v_ref), weights)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    theirs = dict(reference.named_parameters())
    for name, p in attn.named_parameters():
        if 'cpb_mlp' not in name:
            torch.testing.assert_close(p.grad, theirs[name].grad, msg=name)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('with_cp', [False, True])
def test_training_step_on_the_meta_device(cls, dtype, with_cp, monkeypatch):
    """On ``meta`` (shapes without data, and a device without autocast), standing in for a GPU: the paths
    taken off the CPU give the CPU's output shapes in the parameters' dtype, in inference and in a training
    step with stochastic depth and checkpointing, a gradient of its shape for every parameter, and never call
    the compiled CPU kernels."""
    torch.manual_seed(0)
    arch = dict(TINY, drop_path_rate=0.2)
    cpu = cls(**arch, window_size=4)
    meta = cls(**arch, window_size=4, with_cp=with_cp).to('meta', dtype)
    x = torch.randn(2, 3, 70, 90)
    expected = [o.shape for o in cpu(x)]

    def no_kernels():
        raise AssertionError('the compiled CPU kernels were called off the CPU')

    monkeypatch.setattr(cpu_kernels, 'kernels', no_kernels)
    with torch.no_grad():
        outs = meta.eval()(x.to('meta', dtype))
    assert [o.shape for o in outs] == expected and all(o.dtype == dtype for o in outs)
    outs = meta.train()(x.to('meta', dtype))
    assert [o.shape for o in outs] == expected
    assert all(o.device.type == 'meta' and o.dtype == dtype for o in outs)
    sum(o.float().sum() for o in outs).backward()
    for name, p in meta.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == dtype, name


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_training_after_inference_gets_position_bias_gradients(cls):
    """A bias kept from inference is never used where its parameters want a gradient."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4))
    reference = cls(**TINY, window_size=4)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 70, 90)
    model.eval()
    with torch.no_grad():
        weights = [torch.randn_like(out) for out in model(x)]  # outputs ending in a norm sum to a constant
    for m in (model, reference):
        m.train()
        sum((out * w).sum() for out, w in zip(m(x), weights)).backward()
    assert all(p.grad is not None for p in model.parameters())
    for p in position_bias_parameters(model):
        assert p.grad is not None and p.grad.abs().sum() > 0
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_training_after_inference_mode(cls, dtype):
    """The window geometry cached by a forward under ``torch.inference_mode()`` (indices, shift masks, V2's
    coordinates) serves a later training step: plain tensors, which autograd may save, and the same
    gradients as a step with the caches filled in training."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4)
    x = torch.randn(2, 3, 70, 90)

    def gradients() -> dict:
        model.zero_grad()
        with torch.autocast('cpu', dtype or torch.bfloat16, enabled=dtype is not None):
            outs = model.train()(x)
        sum(out.float().square().mean() for out in outs).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    clear_geometry_caches()
    expected = gradients()
    clear_geometry_caches()
    with torch.inference_mode(), torch.autocast('cpu', dtype or torch.bfloat16, enabled=dtype is not None):
        model.eval()(x)
    assert windows.shift_mask((72, 92), (4, 4), (2, 2), torch.device('cpu')).is_inference() is False
    for name, grad in gradients().items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)


def clear_geometry_caches() -> None:
    for fn in vars(windows).values():
        if hasattr(fn, 'cache_clear'):
            fn.cache_clear()


def count_attend_calls(model, monkeypatch) -> list:
    """The windows of every call of the model's attention in one piece (``attend``), as they come."""
    calls = []
    attention_cls = type(model.layers[0].blocks[0].attn)
    attend = attention_cls.attend
    monkeypatch.setattr(attention_cls, 'attend',
                        lambda self, *a, **k: calls.append(a[0].shape[0]) or attend(self, *a, **k))
    return calls


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype,chunk', [(None, 16), (None, 50), (None, 200), (torch.bfloat16, 50),
                                         (torch.bfloat16, 200)])
def test_chunked_inference_equals_whole(cls, dtype, chunk, monkeypatch):
    """Inference in chunks of tokens (windows of attention, rows of the MLP) gives the values of one
    piece: chunks of 16 tokens (one window of each image), 50 and larger; two images,
    padding and shifted windows. The products are the same; only the GEMM kernel a library picks for a
    very small chunk may round differently."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).eval()
    x = torch.randn(2, 3, 70, 90)

    def run():
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x)

    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 10 ** 9)
    whole = run()
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', chunk)
    calls = count_attend_calls(model, monkeypatch)
    attention_cls = type(model.layers[0].blocks[0].attn)
    attend_rows = attention_cls.attend_rows  # windows given by their real tokens (bf16, compiled kernels)

    def count_windows(self, x, slots, window, *args):
        calls.append(x.shape[0] * slots.numel() // (window[0] * window[1]))
        return attend_rows(self, x, slots, window, *args)

    monkeypatch.setattr(attention_cls, 'attend_rows', count_windows)
    chunked = run()
    # the same windows of both images in a chunk: at least one of each
    assert max(calls) == 2 * max(1, chunk // (2 * 16)) and len(calls) > sum(TINY['depths'])
    for a, b in zip(chunked, whole, strict=True):
        assert a.dtype == b.dtype
        if dtype is None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(a, b)  # bf16: within about two units in the last place


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('chunk', [16, 50])
def test_chunked_training_attention_equals_whole(cls, chunk, monkeypatch):
    """CPU training outside the compiled kernels (fp32 here) attends chunks of windows of each image and
    joins their outputs: outputs and every gradient are those of one piece (the same products; weight
    gradients summed over the chunks), and the attention is called once per chunk."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).train()
    x = torch.randn(2, 3, 70, 90)
    grads = None

    def run():
        model.zero_grad(set_to_none=True)
        outs = model(x)
        torch.autograd.backward(outs, grads or [torch.ones_like(o) for o in outs])
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 10 ** 9)
    torch.manual_seed(1)
    grads = [torch.randn_like(o) for o in model(x)]
    whole, whole_grads = run()
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', chunk)
    calls = count_attend_calls(model, monkeypatch)
    chunked, chunked_grads = run()
    # windows of one image per chunk, at most chunk // 16 of them
    assert max(calls) == max(1, chunk // 16) and len(calls) > 2 * sum(TINY['depths'])
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert chunked_grads.keys() == whole_grads.keys()
    for name, grad in chunked_grads.items():
        # fp32 sums taken in another order: within a few units in the last place of the largest entry
        expected = whole_grads[name]
        assert (grad - expected).abs().max() <= 1e-5 * expected.abs().max(), name


@pytest.mark.parametrize('hw,window,shift', [((15, 22), (7, 7), (3, 3)), ((14, 14), (7, 7), (0, 0)),
                                             ((5, 9), (4, 4), (2, 2))])
def test_window_gather_scatter_gradients_of_gradients(hw, window, shift):
    """Gather and scatter are each other's adjoint, also in second derivatives (padded and not)."""
    gather, scatter, padding = window_indices(hw, window, shift, torch.device('cpu'))
    tokens = torch.randn(2, hw[0] * hw[1], 3, dtype=torch.float64, requires_grad=True)
    windows = torch.randn(2, gather.numel(), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: gather_windows(t, gather, scatter, padding), (tokens,))
    assert torch.autograd.gradgradcheck(lambda t: scatter_windows(t, gather, scatter, padding), (windows,))


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_token_gather_and_sum_equal_those_along_dim_1(batch, dtype):
    """The CPU's row-wise token gather and residual sum give PyTorch's dim-1 results bit for bit, with
    an index that repeats a row the way padding positions do (their rows add -0.0, after or before the
    real one), and leave the other rows alone."""
    torch.manual_seed(0)
    x = torch.randn(batch, 40, 24).to(dtype)
    real = torch.randperm(38)[:30]  # rows 38 and 39 untouched
    index = torch.cat((torch.tensor([real[3]]), real, torch.tensor([real[3], real[-1]])))
    src = torch.randn(batch, index.numel(), 24).to(dtype)
    src[:, [0, -2, -1]] = -0.0
    assert torch.equal(select_tokens(x, index), x.index_select(1, index))
    expected = x.clone().index_add_(1, index, src)
    out = x.clone()
    assert add_tokens_(out, index, src) is out
    assert torch.equal(out, expected)
    assert torch.equal(out[:, real], x[:, real] + src[:, 1:-2])
    untouched = sorted(set(range(40)) - set(real.tolist()))
    assert torch.equal(out[:, untouched], x[:, untouched])


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype,chunk', [(None, 4096), (None, 50), (torch.bfloat16, 50)])
def test_in_place_inference_equals_out_of_place(cls, dtype, chunk, monkeypatch):
    """CPU inference writes each block's output into its input, chunk by chunk, with the values of the
    out-of-place blocks, bit for bit (padded and shifted maps, two images, chunks across windows)."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).eval()
    x = torch.randn(2, 3, 70, 90)
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', chunk)

    def run():
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x)

    block_cls = type(model.layers[0].blocks[0])
    in_place = block_cls.forward_in_place
    calls = []
    monkeypatch.setattr(block_cls, 'forward_in_place', lambda self, *a: calls.append(self) or in_place(self, *a))
    updated = run()
    assert len(calls) == sum(TINY['depths'])
    monkeypatch.setattr(block_cls, 'can_update_in_place', lambda self, t: False)
    reference = run()
    for a, b in zip(updated, reference):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(not cpu_kernels.kernels_available(), reason='the compiled kernels need x86 with AVX512-BF16')
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('n', [1, 2, 3])
def test_in_place_inference_mlp_shares_chunks_among_the_threads(cls, n, monkeypatch):
    """In bf16 in-place inference, a block's MLP half with at least two chunks per thread is one call of the
    kernels that gives each thread whole chunks, with the values of the Python chunk by chunk pass, bit for
    bit."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).eval()
    x = torch.randn(2, 3, 70, 90)  # the first stage's 2 x 18 x 23 tokens: chunks of at least 128 tokens

    def run():
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return model(x)

    kernels, calls = cpu_kernels.kernels(), []

    class Recording:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def gelu_mlp_rows_(self, rows, *args):
            calls.append((rows.shape, args[-1]))
            return kernels.gelu_mlp_rows_(rows, *args)

    monkeypatch.setattr(cpu_kernels, 'kernels', Recording)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        shared = run()
        monkeypatch.setattr(type(model.layers[0].blocks[0]), 'mlp_in_kernels_', lambda self, rows: False)
        one_by_one = run()
    finally:
        torch.set_num_threads(before)
    chunk = {1: 414, 2: 207, 3: 138}[n]  # 828 tokens in two chunks per thread; later stages: too few tokens
    assert calls == [(torch.Size([828, 16]), chunk)] * 2
    for a, b in zip(shared, one_by_one):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_only_the_stages_own_tensors_are_overwritten(cls):
    """A stage called on the caller's tensor leaves it as it was; its later blocks and a block told to
    overwrite write into their input; training and recorded forwards never do."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4).eval()
    stage = model.layers[0]
    x = torch.randn(1, 9, 11, 16)
    kept = x.clone()
    with torch.no_grad():
        out, _ = stage(x)
        assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
        block = stage.blocks[0]
        y = x.clone()
        assert block(y, (4, 4), (0, 0), None, overwrite=True) is y
        torch.testing.assert_close(y, block(x, (4, 4), (0, 0), None), rtol=0, atol=0)
    z = x.clone().requires_grad_(True)
    assert block(z, (4, 4), (0, 0), None, overwrite=True) is not z
    stage.train()
    with torch.no_grad():
        assert block(x, (4, 4), (0, 0), None, overwrite=True) is not x
    assert torch.equal(x, kept)


def test_passes_are_chunked_on_the_cpu_only():
    """Cache-sized chunks on the CPU; one piece on other devices, where chunks only add kernel launches."""
    cpu, meta = torch.zeros(2, 3), torch.zeros(2, 3, device='meta')
    assert layers.chunk_tokens(cpu) == layers.CHUNK_TOKENS
    assert layers.mlp_chunk_elements(cpu) == layers.MLP_CHUNK_ELEMENTS
    assert layers.chunk_tokens(meta) >= 2 ** 62 and layers.mlp_chunk_elements(meta) >= 2 ** 62


@pytest.mark.parametrize('branch_dtype', [torch.float32, torch.bfloat16])
def test_stochastic_depth_adds_the_scaled_branch_in_one_pass(branch_dtype):
    """In training a residual with stochastic depth is ``x + branch * scales`` in one ``addcmul``: the
    samples' factors are 0 or ``1 / keep``, values and gradients those of ``x + drop_path(branch)`` with the
    same random draws, and no branch-sized product is written first."""
    drop = DropPath(0.5).train()
    x = torch.randn(8, 5, 6, requires_grad=True)
    branch = torch.randn(8, 5, 6).to(branch_dtype).requires_grad_(True)
    torch.manual_seed(3)
    with torch.profiler.profile() as prof:
        out = add_residual(x, branch, drop)
    ops = {e.key for e in prof.key_averages()}
    assert 'aten::addcmul' in ops and 'aten::mul' not in ops and 'aten::add' not in ops, ops
    torch.manual_seed(3)
    scales = drop.sample_scales(branch)
    assert scales.shape == (8, 1, 1) and scales.dtype == branch_dtype
    assert set(scales.flatten().tolist()) == {0.0, 2.0}  # both cases occur with this seed
    dropped = scales.flatten() == 0
    assert torch.equal(out[dropped], x[dropped])
    x_ref, branch_ref = (t.detach().clone().requires_grad_(True) for t in (x, branch))
    torch.manual_seed(3)
    expected = x_ref + drop(branch_ref).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(branch.grad, branch_ref.grad)

    drop.eval()  # nothing dropped: the plain sum (written into the branch, a block's own tensor)
    with torch.no_grad():
        expected = x + branch.float()
        torch.testing.assert_close(add_residual(x, branch.float().clone(), drop), expected, rtol=0, atol=0)


def test_inference_residuals_keep_the_wider_dtype_of_the_stream():
    """Under autocast a block's branch is half precision while its input can be fp32 (CUDA's layer norms, or an
    absolute position embedding on the CPU): without autograd the residual sum is still ``x + branch`` in fp32,
    as in training and in mmdet, not written into the half-precision branch."""
    x = torch.randn(4, 6, 8)
    branch = torch.randn(4, 6, 8).bfloat16()
    with torch.no_grad():
        out = add_residual(x, branch.clone())
    assert out.dtype == torch.float32 and torch.equal(out, x + branch)
    model = SwinTransformer(**TINY, window_size=4, use_abs_pos_embed=True, pretrain_img_size=64).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            block = model.layers[0].blocks[0]
            kept = block(torch.randn(1, 16, 16, 16), (4, 4), (0, 0), None, overwrite=True)
        recorded = block(torch.randn(1, 16, 16, 16).requires_grad_(), (4, 4), (0, 0), None)
    assert kept.dtype == recorded.dtype == torch.float32


def test_patch_embedding_writes_the_token_layout():
    """The patch convolution takes the image channels-last, so its output and gradient are in the tokens'
    ``(B, H, W, C)`` layout: no transposed copy of them in the forward or the backward, and the values and
    gradients of the convolution of the NCHW image."""
    torch.manual_seed(0)
    embed = PatchEmbed(3, 32, 4)
    x = torch.randn(2, 3, 30, 42)
    outputs = []
    embed.proj.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.profiler.profile(record_shapes=True) as prof:
        tokens = embed(x)
        grad = torch.randn_like(tokens)
        tokens.backward(grad)
    assert tokens.shape == (2, 8, 11, 32) and outputs[0].permute(0, 2, 3, 1).is_contiguous()
    big = [e for e in prof.events() if e.name in ('aten::copy_', 'aten::clone')
           and any(len(s) == 4 and s[0] * s[1] * s[2] * s[3] == tokens.numel() for s in e.input_shapes)]
    assert not big, [(e.name, e.input_shapes) for e in big]

    weight, bias = (p.detach().clone().requires_grad_(True) for p in (embed.proj.weight, embed.proj.bias))
    conv = F.conv2d(F.pad(x, (0, 2, 0, 2)), weight, bias, stride=4).permute(0, 2, 3, 1)
    expected = F.layer_norm(conv, (32,), embed.norm.weight.detach(), embed.norm.bias.detach())
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    expected.backward(grad)
    torch.testing.assert_close(embed.proj.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embed.proj.bias.grad, bias.grad, rtol=1e-5, atol=1e-5)


class _LargeAllocations(TorchDispatchMode):
    """Records the operators and shapes of new tensors (not views or in-place results) with at least
    ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.shapes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.shapes.append((func.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_inference_allocates_the_first_stage_map_twice(cls, dtype, monkeypatch):
    """CPU inference allocates two tensors of the first stage's size: the patch convolution's output,
    which the patch norm and every block of the stage update in place, and the first output. The norm
    output, the stage's copy of its input, the merged 4C map and the normalised map before its
    transposition are not allocated (at detection sizes each was mapped and faulted in afresh)."""
    torch.manual_seed(0)
    model = cls(**TINY, window_size=4).eval()
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 48)
    x = torch.randn(2, 3, 150, 170)
    big = _LargeAllocations(2 * 38 * 43 * 16)  # the (B, H/4, W/4, C) map
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
        with big:
            outs = model(x)
    # activations (weights cast to bf16 can be larger here); the image, padded and laid out channels-last
    # in the autocast dtype, is larger than the map at this size
    shapes = [s for s in big.shapes if len(s[1]) >= 3 and s[1] != (2, 3, 152, 172)]
    if dtype is not None and cpu_kernels.use_kernels():  # the kernels write the output as (B, C, H * W)
        output = ('empty.memory_format', (2, 16, 38 * 43))
    else:
        output = ('new_empty.default', (2, 16, 38, 43))
    assert shapes == [('convolution.default', (2, 16, 38, 43)), output], shapes
    assert outs[0].shape == (2, 16, 38, 43) and outs[0].is_contiguous()
    assert outs[0].dtype == (dtype or torch.float32)


@pytest.mark.parametrize('norm_cls', [torch.nn.LayerNorm, LayerNorm])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_chunked_norms_equal_whole(dtype, norm_cls, monkeypatch):
    """The patch norm written into the convolution's output and the output norms written band by band
    into the ``(B, C, H, W)`` output (mmswin's norm in bf16: by the kernels in one pass) give the norm's
    values bit for bit (two images, bands across rows, a last band of one row); with autograd, the plain
    layers."""
    torch.manual_seed(0)
    embed = PatchEmbed(3, 16, 4)
    norm = norm_cls(16)
    with torch.no_grad():
        for p in (*embed.norm.parameters(), *norm.parameters()):
            p.normal_(1.0, 0.5)
    x = torch.randn(2, 3, 52, 36)
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 2 * 9 * 3 + 5)  # bands of 3 of the 13 rows; rows of 41 tokens
    in_one_pass = []
    channels_first = LayerNorm.channels_first
    monkeypatch.setattr(LayerNorm, 'channels_first',
                        lambda self, t: in_one_pass.append(t.shape) or channels_first(self, t))

    def autocast():
        return torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None)

    with torch.no_grad(), autocast():
        tokens = embed(x)
        out = layers.norm_channels_first(norm, tokens)
    kernels = norm_cls is LayerNorm and dtype is not None and cpu_kernels.use_kernels()
    assert in_one_pass == ([tokens.shape] if kernels else [])
    with torch.no_grad(), autocast():
        conv = embed.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        expected_tokens = embed.norm(conv)
        expected_out = norm(tokens).permute(0, 3, 1, 2).contiguous()
    assert tokens.dtype == expected_tokens.dtype == (dtype or torch.float32)
    assert torch.equal(tokens, expected_tokens)
    assert out.is_contiguous() and out.dtype == expected_out.dtype and torch.equal(out, expected_out)

    recorded = tokens.detach().requires_grad_(True)
    with autocast():
        out = layers.norm_channels_first(norm, recorded)
    assert out.grad_fn is not None and torch.equal(out.detach(), expected_out)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
@pytest.mark.parametrize('hw', [(12, 16), (13, 15)])
def test_chunked_patch_merging_equals_whole(cls, dtype, hw, monkeypatch):
    """Patch merging without autograd on the CPU runs over bands of output rows with the values of the
    whole merge (odd sizes padded, two images); only the GEMM kernel picked for a band may round
    differently. With autograd, the whole merge and its gradients."""
    torch.manual_seed(0)
    merge = with_visible_bias(cls(**TINY, window_size=4)).layers[0].downsample.eval()
    x = torch.randn(2, *hw, 16)
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 2 * 8 * 2)  # two output rows per band
    bands = []
    project = type(merge).project
    monkeypatch.setattr(type(merge), 'project', lambda self, m: bands.append(m.shape) or project(self, m))

    def autocast():
        return torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None)

    with torch.no_grad(), autocast():
        chunked = merge(x)
        whole = project(merge, merge.merge(x))
    h2, w2 = -(-hw[0] // 2), -(-hw[1] // 2)
    assert [s[1] for s in bands] == [min(2, h2 - start) for start in range(0, h2, 2)]
    assert chunked.shape == whole.shape == (2, h2, w2, 32) and chunked.dtype == whole.dtype
    if dtype is None:
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(chunked, whole)  # bf16: within about two units in the last place

    recorded = x.clone().requires_grad_(True)
    official = x.clone().requires_grad_(True)
    with autocast():
        out = merge(recorded)
        # the official merge: zero-pad right/bottom, then the neighbours (0,0), (1,0), (0,1), (1,1) by slicing
        padded = F.pad(official, (0, 0, 0, 2 * w2 - hw[1], 0, 2 * h2 - hw[0]))
        neighbours = [padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2], padded[:, 1::2, 1::2]]
        expected = project(merge, torch.cat(neighbours, -1))
    assert bands[-1][1] == h2 and len(bands) == -(-h2 // 2) + 1  # the recorded merge is one piece
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, whole, rtol=0, atol=0)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert recorded.grad.shape == x.shape and recorded.grad.abs().sum() > 0
    torch.testing.assert_close(recorded.grad, official.grad, rtol=0, atol=0)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_in_place_inference_leaves_hooked_tensors_alone(cls, dtype):
    """CPU inference writes blocks' outputs into their inputs, but not where a forward hook (or pre-hook)
    was handed those tensors: what a hook saw stays what the module returned; the outputs are the same."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TINY, window_size=4)).eval()
    x = torch.randn(1, 3, 61, 75)
    autocast = torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        plain = model(x)
    seen = []

    def keep(module, args, output):
        for t in output if isinstance(output, tuple) else (output,):
            seen.append((t, t.clone()))

    modules = [model.patch_embed, model.layers[0].downsample, model.layers[0], model.layers[1].blocks[0]]
    handles = [m.register_forward_hook(keep) for m in modules]
    handles.append(model.layers[2].blocks[1].register_forward_pre_hook(lambda m, args: keep(m, None, args[0])))
    try:
        with torch.no_grad(), autocast:
            hooked = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 6
    for tensor, at_the_time in seen:
        assert torch.equal(tensor, at_the_time)
    for a, b in zip(hooked, plain, strict=True):
        assert torch.equal(a, b)
    assert not layers.observed(model)
