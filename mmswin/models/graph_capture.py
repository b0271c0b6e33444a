"""Whether the code runs to record a graph rather than to compute values."""
import torch

_MODE_KEYS = tuple(getattr(getattr(torch._C, '_TorchDispatchModeKey', None), name, None) for name in ('FAKE', 'PROXY'))


def recording_graph() -> bool:
    """Whether the tensors flowing through the model are being recorded into a graph: under torch.compile,
    ``torch.export`` (fake tensors), TorchScript tracing or ``make_fx``. What is built then must not be kept for
    later calls (a cached fake tensor has no values), and mmswin's compiled kernels and oneDNN calls, which
    these tracers do not record, must not run."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return any(key is not None and torch._C._get_dispatch_mode(key) is not None for key in _MODE_KEYS)
