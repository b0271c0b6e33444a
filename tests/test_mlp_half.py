"""A block's MLP half in CPU bf16 training as one pass of the kernels (:mod:`mmswin.models.mlp_half`): the values
and gradients of the norm, the MLP and the residual sum apart, only what is needed, less kept for the backward
(V1), the cases it leaves to the separate passes, and errors that name the bad input."""
import copy

import pytest
import torch
from torch import nn

from mmswin.models import cpu_kernels, layers, mlp_half
from mmswin.models.blocks import SwinBlock, SwinBlockV2, make_attention
from mmswin.models.layer_norm import LayerNorm
from mmswin.models.layers import DropPath, Mlp

from .test_gelu_mlp import saved_activations

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                   reason='the compiled kernels need Linux on x86 with AVX512-BF16')

C, WIDTH = 16, 64


def modules(affine: bool = True, biases: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    norm, mlp = LayerNorm(C, elementwise_affine=affine), Mlp(C, WIDTH)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
        if not biases:
            mlp.fc1.bias = mlp.fc2.bias = None
    return norm, mlp


def half(norm, mlp, x, grad, post_norm: bool, fused: bool, on_mlp_output=None):
    """The half's output, ``x``'s gradient and the parameters' gradients (``None`` where a parameter has none);
    ``on_mlp_output``, for the separate passes, is handed the gradient at the MLP's output."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    params = list(norm.parameters()) + list(mlp.parameters())
    for p in params:
        p.grad = None
    with torch.autocast('cpu', torch.bfloat16):
        if fused:
            assert mlp_half.applies(x, norm, mlp, DropPath(0.0))
            y = mlp_half.norm_mlp_residual(x, norm, mlp, post_norm)
        else:
            branch = mlp(x) if post_norm else mlp(norm(x))
            if on_mlp_output is not None:
                branch.register_hook(on_mlp_output)
            y = x + (norm(branch) if post_norm else branch)
    y.backward(grad)
    return y, x.grad, [p.grad for p in params]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(layers, 'MLP_CHUNK_ELEMENTS', 19 * WIDTH)  # chunks of 19 tokens, or equal ones a little smaller


@needs_kernels
@pytest.mark.parametrize('n', [1, 2, 3])
@pytest.mark.parametrize('post_norm', [False, True])
@pytest.mark.parametrize('affine,biases', [(True, True), (False, False)])
def test_the_pass_gives_the_values_of_the_separate_passes(n, post_norm, affine, biases, small_chunks):
    """Output, input gradient and the MLP's weight and fc1's bias gradients bit for bit, on any number of threads;
    the norm's gradients to the order of their fp32 sums; fc2's bias gradient the fp32 sum of the separate passes'
    bf16 gradients at the MLP's output (theirs is summed in bf16)."""
    norm, mlp = modules(affine, biases)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 97, C, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(2, 97, C, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    at_mlp_output = []  # the separate passes' bf16 gradient at the MLP's output (its fc2)
    try:
        fused = half(norm, mlp, x, grad, post_norm, fused=True)
        apart = half(norm, mlp, x, grad, post_norm, fused=False, on_mlp_output=at_mlp_output.append)
    finally:
        torch.set_num_threads(threads)
    assert fused[0].dtype == fused[1].dtype == torch.bfloat16 and fused[0].shape == x.shape
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])
    names = [name for name, _ in norm.named_parameters(prefix='norm')] + [
        name for name, _ in mlp.named_parameters(prefix='mlp')]
    grads = dict(zip(names, zip(fused[2], apart[2])))
    assert len(grads) == (2 if affine else 0) + (4 if biases else 2)
    for name, (ours, theirs) in grads.items():
        assert ours.dtype == theirs.dtype == torch.float32, name
        if name.startswith('norm'):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        elif name == 'mlp.fc2.bias':  # theirs is the bf16 sum; ours the fp32 one of the same bf16 gradients
            (upstream,) = at_mlp_output
            assert upstream.dtype == torch.bfloat16 and (post_norm or torch.equal(upstream, grad))
            exact = upstream.double().sum((0, 1))
            torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-6)
            assert (theirs.double() - exact).abs().max() > (ours.double() - exact).abs().max()
        else:
            assert torch.equal(ours, theirs), name


@needs_kernels
@pytest.mark.parametrize('post_norm', [False, True])
@pytest.mark.parametrize('frozen', ['x', 'norm', 'fc1', 'fc2'])
def test_the_backward_gives_only_what_is_needed(frozen, post_norm, small_chunks):
    """With the input or a layer frozen, the pass leaves out exactly those gradients and gives the others the
    values of the separate passes (as :func:`test_the_pass_gives_the_values_of_the_separate_passes` compares
    them): a frozen input, as under a frozen stage, must not cost the norm its gradients."""
    norm, mlp = modules()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 150, C, generator=g).bfloat16().requires_grad_(frozen != 'x')
    grad = torch.randn(1, 150, C, generator=g).bfloat16()
    for name, module in (('norm', norm), ('fc1', mlp.fc1), ('fc2', mlp.fc2)):
        module.requires_grad_(name != frozen)
    fused = half(norm, mlp, x, grad, post_norm, fused=True)
    apart = half(copy.deepcopy(norm), copy.deepcopy(mlp), x, grad, post_norm, fused=False)
    assert (fused[1] is None) == (apart[1] is None) == (frozen == 'x')
    assert frozen == 'x' or torch.equal(fused[1], apart[1])
    assert [g is None for g in fused[2]] == [g is None for g in apart[2]]
    assert sum(g is None for g in fused[2]) == (0 if frozen == 'x' else 2)
    names = ['norm.weight', 'norm.bias', 'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    for name, ours, theirs in zip(names, fused[2], apart[2]):
        if ours is None:
            continue
        if name.startswith('norm'):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        elif name == 'fc2.bias':  # an fp32 sum against the separate passes' bf16 one
            torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=2e-3 * theirs.abs().max().item())
        else:
            assert torch.equal(ours, theirs), name


class Half(nn.Module):
    """The MLP half under bf16 autocast, in one pass or apart."""

    def __init__(self, norm: LayerNorm, mlp: Mlp, post_norm: bool, fused: bool) -> None:
        super().__init__()
        self.norm, self.mlp, self.post_norm, self.fused = norm, mlp, post_norm, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast('cpu', torch.bfloat16):
            if self.fused:
                return mlp_half.norm_mlp_residual(x, self.norm, self.mlp, self.post_norm)
            return x + (self.norm(self.mlp(x)) if self.post_norm else self.mlp(self.norm(x)))


@needs_kernels
@pytest.mark.parametrize('post_norm', [False, True])
def test_v1_keeps_one_map_less(post_norm, small_chunks):
    """V1 recomputes the normalised tokens in the backward from the kept means and 1 / stds; V2 keeps the branch
    before its norm, as the norm does."""
    norm, mlp = modules()
    x = torch.randn(1, 150, C).bfloat16().requires_grad_()

    def maps(fused):
        kept = saved_activations(Half(norm, mlp, post_norm, fused), x)
        tokens = [t for t in kept if t.dtype == torch.bfloat16 and t.ndim >= 2 and t.shape[-1] == C
                  and tuple(t.shape) != (WIDTH, C)]  # tokens or their chunks, not fc1's weight
        return sum(t.numel() for t in tokens)

    assert maps(fused=True) == 150 * C * (2 if post_norm else 1)
    assert maps(fused=False) == 150 * C * 2


def block(version: int, drop_path: float = 0.0, drop: float = 0.0, act: str = 'none') -> SwinBlock:
    attn = make_attention(version, C, 2, 7, True, None, 0.0, 0.0, True, 0)
    cls = SwinBlock if version == 1 else SwinBlockV2
    return cls(C, attn, mlp_ratio=4.0, drop=drop, drop_path=drop_path,
               act_cfg=dict(type='GELU', approximate=act)).train()


@needs_kernels
@pytest.mark.parametrize('version', [1, 2])
def test_blocks_take_the_pass_in_bf16_training(version, small_chunks, monkeypatch):
    calls = []
    fused = mlp_half.norm_mlp_residual
    monkeypatch.setattr(mlp_half, 'norm_mlp_residual', lambda *a: calls.append(a[-1]) or fused(*a))
    blk = block(version)
    x = torch.randn(1, 14, 14, C).bfloat16().requires_grad_()
    with torch.autocast('cpu', torch.bfloat16):
        y = blk(x, (7, 7), (0, 0), None)
    y.float().sum().backward()
    assert calls == [version == 2]
    assert all(p.grad is not None for p in blk.mlp.parameters())


@needs_kernels
@pytest.mark.parametrize('case', ['fp32', 'no grad', 'native', 'drop path', 'dropout', 'tanh', 'few chunks', 'compile'])
def test_other_cases_take_the_separate_passes(case, small_chunks, monkeypatch):
    blk = block(1, drop_path=0.1 if case == 'drop path' else 0.0, drop=0.1 if case == 'dropout' else 0.0,
                act='tanh' if case == 'tanh' else 'none')
    x = torch.randn(1, 1 if case == 'few chunks' else 14, 14, C)
    x = (x if case == 'fp32' else x.bfloat16()).requires_grad_(case != 'no grad')
    if case == 'no grad':
        blk.requires_grad_(False)
    if case == 'native':
        monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    if case == 'compile':
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with torch.autocast('cpu', torch.bfloat16):
        assert not mlp_half.applies(x, blk.norm2, blk.mlp, blk.drop_path)


@needs_kernels
def test_the_standard_case_takes_the_pass(small_chunks):
    blk = block(1)
    with torch.autocast('cpu', torch.bfloat16):
        assert mlp_half.applies(torch.randn(1, 14, 14, C).bfloat16().requires_grad_(), blk.norm2, blk.mlp,
                                blk.drop_path)


def forward_inputs(tokens: int = 40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, C, generator=g).bfloat16()
    w1, w2 = torch.randn(WIDTH, C, generator=g).bfloat16(), torch.randn(C, WIDTH, generator=g).bfloat16()
    return dict(x=x, norm_weight=torch.ones(C), norm_bias=torch.zeros(C), eps=1e-5, post_norm=False, w1=w1,
                b1=torch.zeros(WIDTH, dtype=torch.bfloat16), w2=w2, b2=torch.zeros(C, dtype=torch.bfloat16), chunk=8,
                fused_bias=False)


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('x', torch.zeros(40, C), r'x must be a contiguous \(tokens, C\) bf16'),
    ('norm_weight', torch.ones(8), r'norm_weight must be None or a contiguous \(16,\) fp32'),
    ('eps', -1.0, 'eps must not be negative'),
    ('w2', torch.zeros(8, WIDTH, dtype=torch.bfloat16), "w2 must have x's 16 rows"),
    ('chunk', 0, 'chunk must be positive, got 0'),
])
def test_bad_forward_input_is_named(arg, value, message):
    inputs = forward_inputs()
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'norm_gelu_mlp_forward: {message}'):
        cpu_kernels.kernels().norm_gelu_mlp_forward(**inputs)


def backward_inputs(post_norm: bool):
    inputs = forward_inputs()
    inputs['post_norm'] = post_norm
    y, stats, hidden, branch = cpu_kernels.kernels().norm_gelu_mlp_forward(**inputs)
    return dict(grad=torch.ones_like(y), x=inputs['x'], stats=stats, hidden=hidden, branch=branch,
                norm_weight=inputs['norm_weight'], norm_bias=inputs['norm_bias'], eps=1e-5, post_norm=post_norm,
                w1=inputs['w1'], w2=inputs['w2'], need_x=True, need_norm_weight=True, need_norm_bias=True,
                need_w1=True, need_b1=True, need_w2=True, need_b2=True)


@needs_kernels
@pytest.mark.parametrize('post_norm,arg,value,message', [
    (False, 'grad', torch.zeros(40, 8, dtype=torch.bfloat16), "grad must be a contiguous bf16 CPU tensor of x's shape"),
    (False, 'stats', torch.zeros(39, 2), r'stats must be the contiguous \(40, 2\) fp32 means'),
    (False, 'hidden', [torch.zeros(8, WIDTH, dtype=torch.bfloat16)], 'the hidden chunks hold 8 rows, x has 40'),
    (False, 'hidden', [torch.zeros(40, 8, dtype=torch.bfloat16)], r'hidden\[0\] must be a contiguous \(rows, 64\)'),
    (False, 'branch', [torch.zeros(40, C, dtype=torch.bfloat16)], 'branch must be empty without post_norm'),
    (True, 'branch', [], r'branch must hold one chunk per hidden chunk \(5\), got 0'),
    (True, 'branch', [torch.zeros(8, C, dtype=torch.bfloat16)] * 4 + [torch.zeros(7, C, dtype=torch.bfloat16)],
     "branch's chunks must have hidden's rows"),
])
def test_bad_backward_input_is_named(post_norm, arg, value, message):
    inputs = backward_inputs(post_norm)
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'norm_gelu_mlp_backward: {message}'):
        cpu_kernels.kernels().norm_gelu_mlp_backward(**inputs)


@needs_kernels
def test_a_second_derivative_is_refused_with_what_to_do(small_chunks):
    norm, mlp = modules()
    x = torch.randn(1, 150, C).bfloat16().requires_grad_()
    with torch.autocast('cpu', torch.bfloat16):
        y = mlp_half.norm_mlp_residual(x, norm, mlp, False)
    with pytest.raises(RuntimeError, match='MMSWIN_BF16_MATMUL=native'):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)


def test_modules_of_other_kinds_take_the_separate_passes():
    x = torch.randn(1, 150, C).bfloat16().requires_grad_()
    assert not mlp_half.applies(x, nn.LayerNorm(C), Mlp(C, WIDTH), DropPath(0.0))
