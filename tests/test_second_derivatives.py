"""Second derivatives (a backward with ``create_graph=True``: Hessian-vector products, gradient penalties)
through the hand-written backward passes, checked against finite differences (gradgradcheck, fp64), and
the clear error of the compiled CPU bf16 attention, which has none."""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmswin.models import SwinTransformer, SwinTransformerV2, cpu_kernels
from mmswin.models.attention import unit_vectors
from mmswin.models.gelu_mlp import gelu_mlp
from mmswin.models.matmul import softmax
from mmswin.models.qkv_projection import qkv_heads

from .conftest import with_visible_bias

# Two stages, shifted windows and padding at both (tokens 5x7, then 3x4, windows of 2).
TWO_STAGES = dict(embed_dims=8, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1), strides=(2, 2),
                  patch_size=2, window_size=2, drop_path_rate=0.0)


def f64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize('with_scale', [False, True])
def test_v2_unit_vectors(with_scale):
    torch.manual_seed(0)
    args = (f64(3, 2, 5, 4),) + ((torch.rand(2, 1, 1, dtype=torch.float64) + 0.5).requires_grad_(),) * with_scale
    assert torch.autograd.gradgradcheck(unit_vectors, args)


def test_v2_unit_vectors_of_zero_keys_have_finite_second_derivatives():
    """Padding keys are zero vectors: F.normalize's second derivative there is NaN. Here it is finite, and
    the other vectors' are the composed operators'."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x[0, 1] = 0
    scale = torch.tensor([[[2.0]], [[0.5]]], dtype=torch.float64)
    grad, grad2 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)

    def second(fn, x, scale):
        x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        g, = torch.autograd.grad(fn(x, scale), x, grad, create_graph=True)
        return torch.autograd.grad(g, (x, scale), grad2)

    ours = second(unit_vectors, x, scale)
    theirs = second(lambda a, s: F.normalize(a, dim=-1) * s, x, scale)
    assert all(torch.isfinite(g).all() for g in ours)
    assert torch.isnan(theirs[0][0, 1]).all()
    real = torch.ones(2, 3, dtype=torch.bool)
    real[0, 1] = False
    torch.testing.assert_close(ours[0][real], theirs[0][real])
    x[0, 1] = 1e-3  # the scale's second derivative does not depend on the zero key: compare without it
    torch.testing.assert_close(second(unit_vectors, x, scale)[1],
                               second(lambda a, s: F.normalize(a, dim=-1) * s, x, scale)[1])


def test_gelu_mlp():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4, 8).double(), nn.Linear(8, 4).double()
    params = [p.detach().clone().requires_grad_() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]

    def mlp(x, w1, b1, w2, b2):
        for module, name, value in ((fc1, 'weight', w1), (fc1, 'bias', b1), (fc2, 'weight', w2), (fc2, 'bias', b2)):
            delattr(module, name)
            setattr(module, name, value)
        return gelu_mlp(x, fc1, fc2, chunk_elements=16)  # chunks of 2 tokens

    assert torch.autograd.gradgradcheck(mlp, (f64(3, 5, 4), *params))


@pytest.mark.parametrize('stack_qk', [False, True])
def test_qkv_projection(stack_qk):
    torch.manual_seed(0)

    def heads(x, w, b):
        return qkv_heads(x, w, b, heads=2, scale=0.5, chunk_tokens=6, stack_qk=stack_qk)  # chunks of 2 windows

    assert torch.autograd.gradgradcheck(heads, (f64(5, 3, 4), f64(12, 4), f64(12)))


def test_reduced_precision_softmax():
    """The CPU bf16 softmax in pieces keeps the backward of PyTorch's, whose second derivative it has."""
    torch.manual_seed(0)
    x = torch.randn(6, 7, dtype=torch.bfloat16, requires_grad=True)
    grad, grad2 = torch.randn(6, 7, dtype=torch.bfloat16), torch.randn(6, 7, dtype=torch.bfloat16)
    seconds = []
    for fn in (softmax, lambda t: t.softmax(-1)):
        g, = torch.autograd.grad(fn(x), x, grad, create_graph=True)
        seconds.append(torch.autograd.grad(g, x, grad2)[0])
    assert softmax(x).grad_fn.name() == '_SoftmaxInPiecesBackward'
    torch.testing.assert_close(*seconds, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_backbones(cls):
    """Whole backbones in fp64 in training mode: the blocks' hand-written backward passes (qkv projection,
    MLP, V2's normalisation, window gather and scatter) and autograd's, with padding and shifts."""
    torch.manual_seed(0)
    model = with_visible_bias(cls(**TWO_STAGES)).double().train()
    assert torch.autograd.gradgradcheck(lambda x: model(x), (f64(1, 3, 10, 14),))


def hessian_vector_product(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype],
                           seed: int = 1) -> torch.Tensor:
    """``H v`` of a loss of the outputs with respect to the parameters, for a random ``v``, flattened in fp64."""
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.autocast('cpu', dtype or torch.bfloat16, enabled=dtype is not None):
        outs = [o.double() for o in model(x)]
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64)).sum() + o.square().mean()
               for o in outs)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * torch.randn(g.shape, generator=generator, dtype=torch.float64).to(g.dtype)).sum() for g in grads)
    return torch.cat([h.flatten() for h in torch.autograd.grad(dot, params)]).double()


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_cpu_fp16_hessian_vector_products_are_finite(cls):
    """Under CPU fp16 autocast the layer norms run in fp32: PyTorch's fp16 norm takes its second derivative
    in fp16, which overflows to NaN at V2's post-norms of small attention outputs."""
    torch.manual_seed(0)
    model = cls(embed_dims=32, depths=(2, 2), num_heads=(2, 2), out_indices=(0, 1), strides=(4, 2),
                window_size=4, drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 52, 60)
    ours = hessian_vector_product(model, x, torch.float16)
    reference = hessian_vector_product(model.double(), x.double(), None)
    assert torch.isfinite(ours).all()
    assert F.cosine_similarity(ours, reference, 0) > 0.9999


@pytest.mark.skipif(not cpu_kernels.kernels_available(), reason='needs the compiled CPU kernels')
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_cpu_bf16_kernels_say_how_to_get_second_derivatives(cls, monkeypatch):
    """The compiled attention's backward has no derivative: a backward with create_graph=True names the
    setting that takes PyTorch's operators, with which a Hessian-vector product is fp64's to bf16's
    precision."""
    torch.manual_seed(0)
    model = cls(embed_dims=32, depths=(2, 2), num_heads=(2, 2), out_indices=(0, 1), strides=(4, 2),
                window_size=4, drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 52, 60)
    with pytest.raises(RuntimeError, match='MMSWIN_BF16_MATMUL=native'):
        hessian_vector_product(model, x, torch.bfloat16)
    monkeypatch.setenv('MMSWIN_BF16_MATMUL', 'native')
    ours = hessian_vector_product(model, x, torch.bfloat16)
    reference = hessian_vector_product(model.double(), x.double(), None)
    assert torch.isfinite(ours).all()
    assert F.cosine_similarity(ours, reference, 0) > 0.9999
