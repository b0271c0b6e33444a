"""``torch.func`` transforms (``grad``, ``vmap``, ``jvp``) and forward-mode AD run the backbones on PyTorch's
operators and give the values and derivatives of the eager model; the caches keep no wrapped tensor."""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, jvp, vmap

from mmswin.models import SwinTransformer, SwinTransformerV2

from .conftest import SMALL, with_visible_bias

MODELS = [SwinTransformer, SwinTransformerV2]


def _model(cls, train: bool, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = with_visible_bias(cls(**SMALL, **kwargs)).double()
    model.train(train)
    return model


def _image(batch: int = 2) -> torch.Tensor:
    # 16x24 tokens: padded windows of 7 and shifted windows at the first stage
    return torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _assert_equal_to_fp64_rounding(value: torch.Tensor, expected: torch.Tensor, name: str = '') -> None:
    """Equal but for the order of fp64 sums (PyTorch's operators against mmswin's passes): 1e-12 of the
    tensor's largest entry (errors of 3e-14 of it are measured), and 1e-10 of each entry."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12 * max(scale, 1.0), msg=name or None)


def _weighted_sum(outs, weights) -> torch.Tensor:
    return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))


@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('train,with_cp', [(False, False), (True, False), (True, True)])
def test_grad_of_a_functional_call_is_the_eager_gradient(cls, train, with_cp):
    model = _model(cls, train, with_cp=with_cp)
    x = _image()
    weights = [torch.randn_like(o) for o in model(x)]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict, image: torch.Tensor) -> torch.Tensor:
        return _weighted_sum(functional_call(model, p, (image,)), weights)

    grads, grad_x = grad(loss, argnums=(0, 1))(params, x)
    image = x.clone().requires_grad_()
    expected = torch.autograd.grad(_weighted_sum(model(image), weights), [*model.parameters(), image])
    assert len(grads) == len(expected) - 1
    for (name, g), e in zip([*grads.items(), ('x', grad_x)], expected, strict=True):
        _assert_equal_to_fp64_rounding(g, e, name)


@pytest.mark.parametrize('cls', MODELS)
def test_vmap_over_images_gives_the_batched_outputs(cls):
    model = _model(cls, train=False)
    x = _image(3)
    mapped = vmap(lambda image: model(image[None]))(x)
    with torch.no_grad():
        expected = model(x)
    for m, e in zip(mapped, expected, strict=True):
        assert m.shape == (3, 1, *e.shape[1:])
        _assert_equal_to_fp64_rounding(m[:, 0], e)


@pytest.mark.parametrize('cls', MODELS)
@pytest.mark.parametrize('forward_mode', ['jvp', 'dual_level'])
def test_forward_mode_derivatives_are_the_adjoint_of_the_gradient(cls, forward_mode):
    """``<J v, u> = <v, J^T u>``: the forward-mode derivative along ``v`` against the eager backward of ``u``."""
    model = _model(cls, train=True)
    x = _image()
    v = torch.randn_like(x)
    if forward_mode == 'jvp':
        outs, tangents = jvp(model, (x,), (v,))
    else:
        with forward_ad.dual_level():
            duals = [forward_ad.unpack_dual(o) for o in model(forward_ad.make_dual(x, v))]
        outs, tangents = [d.primal for d in duals], [d.tangent for d in duals]
    weights = [torch.randn_like(o) for o in outs]
    image = x.clone().requires_grad_()
    eager = model(image)
    for o, e in zip(outs, eager, strict=True):
        _assert_equal_to_fp64_rounding(o, e.detach())
    grad_x, = torch.autograd.grad(_weighted_sum(eager, weights), image)
    forward = _weighted_sum(tangents, weights)
    torch.testing.assert_close(forward, (v * grad_x).sum(), rtol=1e-9, atol=1e-9)


def test_transforms_keep_no_wrapped_tensor_in_the_caches():
    """V2 keeps its position bias in inference: a call under ``grad`` with other parameters leaves eager
    forwards with the model's own parameters as they were."""
    model = _model(SwinTransformerV2, train=False)
    x = _image(1)
    with torch.no_grad():
        before = model(x)
    params = {name: p.detach() * 1.5 for name, p in model.named_parameters()}
    grad(lambda p: functional_call(model, p, (x,))[0].sum())(params)
    vmap(lambda image: model(image[None]))(x)
    with torch.no_grad():
        after = model(x)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
