"""Small building blocks shared by both Swin versions: norm/activation builders, DropPath, Mlp."""
import sys
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .gelu_mlp import gelu_mlp
from .graph_capture import transformed
from .layer_norm import LayerNorm
from .matmul import linear

# Tokens per chunk of inference: intermediates of about a MiB stay in the CPU's caches, and none is large
# enough for the C allocator to map it afresh (page faults) on every call.
CHUNK_TOKENS = 4096
# Elements of the MLP's hidden activation per chunk in training: Swin-T's first stage in chunks of
# CHUNK_TOKENS tokens, later (wider) stages in proportionally fewer.
MLP_CHUNK_ELEMENTS = CHUNK_TOKENS * 384
# Fewest tokens per chunk where CPU bf16 inference gives each thread whole chunks of the MLP and of the window
# attention: Swin-T's attention with oneDNN's projections got slower in four chunks of 294 tokens (stage 4 at
# 800x1216) or 686 (stage 3 of two 512x512 images), faster in four of 1078 (stage 3 at 800x1216). With the
# projections on AMX tiles, chunks of 256 tokens on took those two stages 8-10 ms less than 1024 did (128: the same).
SHARED_MLP_TOKENS = 128
SHARED_ATTENTION_TOKENS = 1024
SHARED_TILE_ATTENTION_TOKENS = 256
# Most tokens per chunk of CPU bf16 inference's attention half with the projections on AMX tiles, so that a
# chunk's qkv (6C bytes a token) stays in a core's L2 from the projection to the attention. At 800x1216 Swin-T's
# attention halves took 63 ms in chunks of 384 tokens against 75 in chunks of CHUNK_TOKENS (stage 2: 5.6-5.8
# against 8.0-9.2 ms a block); 256 and 512 tokens took about the same as 384.
TILE_ATTENTION_CHUNK_TOKENS = 384


def chunk_tokens(x: torch.Tensor) -> int:
    """Tokens per chunk of the chunked passes over ``x``: :data:`CHUNK_TOKENS` on the CPU, all of them on
    other devices (a GPU has no use for cache-sized pieces, and every chunk costs kernel launches)."""
    return CHUNK_TOKENS if x.device.type == 'cpu' else sys.maxsize


def mlp_chunk_elements(x: torch.Tensor) -> int:
    """Hidden elements per chunk of the training MLP over ``x``: :data:`MLP_CHUNK_ELEMENTS` on the CPU,
    everything at once on other devices."""
    return MLP_CHUNK_ELEMENTS if x.device.type == 'cpu' else sys.maxsize

_NORMS: Dict[str, Callable[..., nn.Module]] = {
    'LN': LayerNorm,
    'LayerNorm': LayerNorm,
}
_ACTS: Dict[str, Callable[..., nn.Module]] = {
    'GELU': nn.GELU,
    'ReLU': nn.ReLU,
    'SiLU': nn.SiLU,
    'Swish': nn.SiLU,
    'Identity': nn.Identity,
}


def _split_cfg(cfg: Optional[dict], arg: str, default: str) -> tuple:
    if cfg is None:
        return default, {}
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'{arg} must be a dict with a "type" key, got {cfg!r}')
    cfg = dict(cfg)
    kind = cfg.pop('type')
    if isinstance(kind, type):
        kind = kind.__name__
    cfg.pop('inplace', None)
    return kind, cfg


def build_norm(norm_cfg: Optional[dict], dim: int) -> nn.Module:
    """Builds a LayerNorm over the last dimension from an mmcv-style ``norm_cfg``.

    Args:
        norm_cfg: ``dict(type='LN', eps=1e-5)``; ``None`` means the default LayerNorm.
            ``requires_grad=False`` freezes its parameters, as mmcv's ``build_norm_layer`` does.
        dim: Number of channels normalised.
    """
    kind, kwargs = _split_cfg(norm_cfg, 'norm_cfg', 'LN')
    if kind not in _NORMS:
        raise ValueError(f'norm_cfg type {kind!r} is not supported; use one of {sorted(_NORMS)}')
    requires_grad = kwargs.pop('requires_grad', True)
    norm = _NORMS[kind](dim, **kwargs)
    for p in norm.parameters():
        p.requires_grad_(bool(requires_grad))
    return norm


def build_activation(act_cfg: Optional[dict]) -> nn.Module:
    """Builds an activation from an mmcv-style ``act_cfg`` such as ``dict(type='GELU')``: GELU, ReLU, SiLU (Swish)
    and Identity directly, any other type as mmcv's ``build_activation_layer`` finds it (its activations, and
    PyTorch's, in mmengine's registry; PyTorch's by name without mmcv). Only the exact GELU takes mmswin's fused
    passes."""
    kind, kwargs = _split_cfg(act_cfg, 'act_cfg', 'GELU')
    if kind in _ACTS:
        return _ACTS[kind](**kwargs)
    cls = _registered_activation(kind)
    if cls is None:
        raise ValueError(f'act_cfg type {kind!r} is not an activation of PyTorch or mmcv '
                         f'(mmswin builds {sorted(_ACTS)} itself)')
    act = cls(**kwargs)
    _runs_as_built[type(act)] = True  # called as a module wherever it is not the exact GELU
    return act


def _registered_activation(kind: str) -> Optional[type]:
    """The activation class named ``kind`` in mmengine's registry (where mmcv registers its activations and
    PyTorch's), or else in ``torch.nn``."""
    try:
        import mmcv.cnn  # noqa: F401 - registers the activations
        from mmengine.registry import MODELS
        cls = MODELS.get(kind)
    except ImportError:
        cls = None
    if cls is None:
        cls = getattr(nn.modules.activation, kind, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def sample_scales(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Factors ``(B, 1, ..., 1)`` in ``x``'s dtype for the samples of ``x``: 0 for a dropped branch,
        ``1 / (1 - p)`` for a kept one; ``None`` where nothing is dropped (``p == 0`` or eval)."""
        kept = self.sample_kept(x)
        return None if kept is None else self.scales(kept)

    def sample_kept(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B, 1, ..., 1)`` in ``x``'s dtype: 1 for a sample whose branch is kept, 0 for a dropped one;
        ``None`` where nothing is dropped. On the CPU the draws take the same random numbers in any dtype."""
        if self.p == 0.0 or not self.training:
            return None
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(1.0 - self.p)

    def scales(self, kept: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The factors of :meth:`sample_scales` from ``kept`` (:meth:`sample_kept`), in ``dtype``."""
        return kept.to(dtype or kept.dtype).div_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.sample_scales(x)
        return x if scales is None else x * scales

    def extra_repr(self) -> str:
        return f'p={self.p}'


class Mlp(nn.Module):
    """The transformer MLP ``fc1 -> act -> drop -> fc2 -> drop`` with the official names. With GELU and
    no dropout, training keeps only ``fc1``'s output for backward (:func:`gelu_mlp`). Inference runs in
    chunks of :data:`CHUNK_TOKENS` tokens, applying the GELU in place, so that the ``(tokens, hidden)``
    activations stay in the CPU's caches and are never allocated whole (in one piece on other devices)."""

    def __init__(self, dim: int, hidden_dim: int, act_cfg: Optional[dict] = None,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = build_activation(act_cfg)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` to ``(..., C)``."""
        if plain_calls(self):
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        recorded = needs_grad(x, self.fc1.weight, self.fc2.weight)
        if recorded and isinstance(self.act, nn.GELU) and self.drop.p == 0:
            return gelu_mlp(x, self.fc1, self.fc2, self.act.approximate, mlp_chunk_elements(x))
        chunk = chunk_tokens(x)
        if recorded or torch.compiler.is_compiling() or x.numel() <= chunk * x.shape[-1]:
            return self.layers(x)
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk):
            part = self.layers(rows[start:start + chunk])
            if out is None:
                out = part.new_empty(rows.shape[0], part.shape[-1])
            out[start:start + chunk] = part
        return out.view(*x.shape[:-1], -1)

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """The layers one after the other on ``x: (..., C)``."""
        if isinstance(self.act, nn.GELU):
            x = linear(x, self.fc1.weight, self.fc1.bias, gelu=self.act.approximate)
        else:
            x = self.act(call_linear(self.fc1, x))
        return self.drop(call_linear(self.fc2, self.drop(x)))


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on ``tensors`` (so they must not be changed in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def runs_in_chunks(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module``'s pass over ``x`` may run in cache-sized chunks written into a preallocated output
    (or into ``x``): on the CPU, with nothing recorded for autograd, not under torch.compile, and where no hook
    sees the module's calls (:func:`plain_calls`: a hook is called once, with the whole tensor)."""
    return (x.device.type == 'cpu' and not torch.compiler.is_compiling()
            and not needs_grad(x, *module.parameters()) and not plain_calls(module))


def normalise_in_place(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` written into ``x: (..., C)`` (contiguous), :data:`CHUNK_TOKENS` rows at a time: no second
    tensor of ``x``'s size. Where ``norm`` gives another dtype, a new tensor, in one piece."""
    rows = x.view(-1, x.shape[-1])
    for start in range(0, rows.shape[0], CHUNK_TOKENS):
        part = norm(rows[start:start + CHUNK_TOKENS])
        if part.dtype != x.dtype:
            return norm(x)
        rows[start:start + CHUNK_TOKENS] = part
    return x


def norm_channels_first(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` of ``x: (B, H, W, C)`` as a contiguous ``(B, C, H, W)`` map (a backbone output). Without
    autograd on the CPU, bands of about :data:`CHUNK_TOKENS` tokens are normalised and transposed into the
    output: the normalised ``(B, H, W, C)`` map is never allocated. In bf16 with the compiled kernels, one
    pass of them, with autograd or without (:meth:`.LayerNorm.channels_first`), unless hooks see the norm
    (:func:`plain_calls`)."""
    if isinstance(norm, LayerNorm) and norm.takes_kernel(x) and not plain_calls(norm):
        return norm.channels_first(x)
    if not runs_in_chunks(x, norm):
        return norm(x).permute(0, 3, 1, 2).contiguous()
    b, h, w, _ = x.shape
    band = max(1, CHUNK_TOKENS // (b * w))
    out = None
    for start in range(0, h, band):
        part = norm(x[:, start:start + band]).permute(0, 3, 1, 2)
        if out is None:
            out = part.new_empty(b, part.shape[1], h, w)
        out[:, :, start:start + band] = part
    return out


def skips_dropped_branches(x: torch.Tensor, drop_path: DropPath, branch_draws: bool) -> bool:
    """Whether the residual sum of ``x`` computes its branch only for the samples that stochastic depth
    keeps (:func:`add_kept_branch`): in training on the CPU, not under torch.compile, and only where the
    branch draws no random numbers of its own (``branch_draws`` false), so that drawing the samples before
    the branch instead of after it takes the same numbers. On CUDA the choice would wait for the device."""
    return (drop_path.training and drop_path.p > 0.0 and not branch_draws and x.device.type == 'cpu'
            and not torch.compiler.is_compiling())


def add_kept_branch(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_path: DropPath,
                    modules: Sequence[nn.Module]) -> torch.Tensor:
    """``x + drop_path(branch(x))`` of ``x: (B, ...)``, the samples drawn first and ``branch`` computed
    only for those that keep it: a dropped sample's branch costs nothing, forward or backward.

    The outputs are those of :func:`add_residual` after the branch, with the same random numbers: exactly
    where all samples or none keep the branch (always at batch 1), and to the rounding of the smaller batch's
    products where some do. A branch dropped for every sample still gives each parameter of ``modules`` a
    zero gradient, as multiplying it by zero does: optimisers then treat the parameters alike (weight decay,
    moments), and distributed data parallel finds none of them unused.
    """
    kept = drop_path.sample_kept(x)
    flags = kept.view(-1).bool()
    if bool(flags.all()):
        out = branch(x)
        return torch.addcmul(x, out, drop_path.scales(kept, out.dtype))
    if not bool(flags.any()):
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not params or not torch.is_grad_enabled():
            return x
        return x + sum(p.reshape(-1)[0] * 0 for p in params)
    index = flags.nonzero().view(-1)
    part = x.index_select(0, index)
    out = branch(part)
    return x.index_copy(0, index, torch.addcmul(part, out, drop_path.scales(kept.index_select(0, index),
                                                                             out.dtype)))


def add_residual(x: torch.Tensor, branch: torch.Tensor, drop_path: Optional[DropPath] = None) -> torch.Tensor:
    """``x + drop_path(branch)``. With stochastic depth in training, ``x + branch * scales`` in one pass
    (``addcmul``: no branch-sized product written and read back); otherwise ``x + branch``, written into
    ``branch`` (a fresh tensor of the block) when autograd records nothing and both have one dtype: one
    memory-bound pass and allocation fewer per residual."""
    scales = None if drop_path is None else drop_path.sample_scales(branch)
    if scales is not None:
        return torch.addcmul(x, branch, scales)
    if needs_grad(x, branch) or branch.dtype != x.dtype:  # a wider x (fp32 under autocast) keeps its dtype
        return x + branch
    return branch.add_(x)


def plain_calls(*modules: nn.Module) -> bool:
    """Whether the layers of ``modules`` must run as PyTorch's modules and operators, one after the other, instead
    of mmswin's fused passes that use their weights directly: under TorchScript tracing (what FLOP counters such as
    mmengine's ``get_model_complexity_info`` read), where a forward hook or pre-hook would see the layers, and
    where a layer was replaced by one whose forward the fused passes do not compute (:func:`observed`: feature
    extraction, pruning, quantisation observers, LoRA adapters); and under ``torch.func`` transforms and
    forward-mode AD (:func:`.graph_capture.transformed`)."""
    return torch.jit.is_tracing() or transformed() or any(observed(m) for m in modules)


def call_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a linear layer of the backbones (an ``nn.Linear``, which PyTorch's tools such as
    ``quantize_dynamic`` recognise): its product through :func:`.matmul.linear` (oneDNN's fused bf16 linear in CPU
    inference, the fp32 kernels for bf16 on CPUs without bf16 instructions), or the layer called where
    :func:`plain_calls` (hooks, tracing, a quantised or wrapped replacement)."""
    if plain_calls(layer):
        return layer(x)
    return linear(x, layer.weight, layer.bias)


def observed(module: nn.Module) -> bool:
    """Whether code other than mmswin's and PyTorch's layers can see the tensors passed between the parts of
    ``module``: a forward hook or pre-hook (of ``module``, of one inside it, or a global one), or a module inside
    it whose forward is neither mmswin's nor that of a PyTorch layer mmswin builds (:func:`runs_as_built`), such
    as a wrapper or replacement a user put in place of a layer. Such modules are called; in-place inference
    leaves the tensors as they were handed over."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    # (compiled code runs no fused pass: the modules are traced as they are)
    compiling = torch.compiler.is_compiling()
    return any(m._forward_hooks or m._forward_pre_hooks or not (compiling or runs_as_built(type(m)))
               for m in module.modules())


# The PyTorch layers inside mmswin's backbones, whose forward the fused passes compute from their weights (or
# call): a replacement of one of these types, or of mmswin's own, is taken as the layer it replaces.
# (No container that is called: in a layer's place it would pass for the layer.)
_TORCH_LAYERS = (nn.Linear, nn.GELU, nn.ReLU, nn.SiLU, nn.Identity, nn.Dropout, nn.ModuleList)
_runs_as_built: Dict[Callable, bool] = {}  # by forward function: a class's forward may be patched and restored


def runs_as_built(cls: type) -> bool:
    """Whether modules of class ``cls`` run the forward of a layer that mmswin builds: a forward defined in
    mmswin or that of one of :data:`_TORCH_LAYERS` (a subclass that keeps it, such as a parametrised
    ``nn.Linear``, counts; one that overrides it does not), or of an activation :func:`build_activation` built."""
    forward = cls.forward
    known = _runs_as_built.get(forward)
    if known is None:
        known = (any(forward is layer.forward for layer in _TORCH_LAYERS)
                 or (getattr(forward, '__module__', None) or '').startswith('mmswin.'))
        _runs_as_built[forward] = known
    return known
