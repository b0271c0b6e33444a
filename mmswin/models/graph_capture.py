"""Whether the code runs to record a graph or under a function transform rather than to compute plain values."""
import torch
import torch.autograd.forward_ad as forward_ad

_MODE_KEYS = tuple(getattr(getattr(torch._C, '_TorchDispatchModeKey', None), name, None) for name in ('FAKE', 'PROXY'))
_TRANSFORMS = getattr(getattr(torch._C, '_functorch', None), 'peek_interpreter_stack', lambda: None)


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``functional_call`` inside
    them) or forward-mode AD (:func:`torch.autograd.forward_ad.dual_level`) is active. The tensors are then
    wrapped or carry tangents, which mmswin's autograd functions and compiled kernels do not handle: the model
    runs PyTorch's operators, as under tracing."""
    if _TRANSFORMS() is not None:
        return True
    return getattr(forward_ad, '_current_level', -1) >= 0


def recording_graph() -> bool:
    """Whether the tensors flowing through the model are being recorded into a graph: under torch.compile,
    ``torch.export`` (fake tensors), TorchScript tracing or ``make_fx``; or transformed (:func:`transformed`).
    What is built then must not be kept for later calls (a cached fake or wrapped tensor has no values of its
    own), and mmswin's compiled kernels and oneDNN calls, which these tracers and transforms do not see
    through, must not run."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or transformed():
        return True
    return any(key is not None and torch._C._get_dispatch_mode(key) is not None for key in _MODE_KEYS)
