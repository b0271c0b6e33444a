"""mmswin's compiled CPU kernels for bf16 (``mmswin/csrc``, the extension ``mmswin._C``).

``setup.py`` builds them on Linux; they run on x86 CPUs with AVX512-BF16. Where they are missing, and
with ``MMSWIN_BF16_MATMUL=native`` or ``=fp32``, the models take PyTorch's operators for the same values.
"""
from functools import lru_cache

from .matmul import bf16_matmul_setting


@lru_cache(maxsize=1)
def _kernels():
    """``mmswin._C`` where it was built and this CPU runs it, else ``None``."""
    try:
        from mmswin import _C
    except ImportError:
        return None
    return _C if _C.available() else None


def kernels_available() -> bool:
    """Whether the kernels are installed and this CPU has what they need (AVX512-BF16)."""
    return _kernels() is not None


def kernels() -> object:
    """The kernels' module, where :func:`use_kernels`."""
    return _kernels()


def use_kernels() -> bool:
    """Whether the models take the kernels: available, and not turned off by ``MMSWIN_BF16_MATMUL``."""
    return bf16_matmul_setting() not in ('native', 'fp32') and kernels_available()
