"""mmswin's compiled CPU kernels for bf16 (``mmswin/csrc``, the extension ``mmswin._C``).

``setup.py`` builds them on Linux; they run on x86 CPUs with AVX512-BF16. Where they are missing, and
with ``MMSWIN_BF16_MATMUL=native`` or ``=fp32``, the models take PyTorch's operators for the same values.
"""
from functools import lru_cache, wraps
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

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


def use_amx() -> bool:
    """Whether inference's products may run on AMX tiles: the kernels are taken, this CPU has AMX-BF16 that the
    operating system grants, and ``MMSWIN_AMX`` is not ``0``."""
    return use_kernels() and kernels().use_amx()


_tile_pairs = WeakIdKeyDictionary()  # weight -> (what it was packed from, the packed tiles)


def tile_pairs(weight: torch.Tensor) -> torch.Tensor:
    """``weight: (N, ...)`` (N a multiple of 32) as ``(N, K)``, its other axes flattened and zero columns added
    up to a multiple of 32, rounded to bf16 and packed for the kernels' products on AMX tiles
    (``pack_tile_pairs``), kept for the next calls while the weight is unchanged: the same storage, dtype and
    version counter (in-place updates, ``load_state_dict`` and optimizer steps change it). Inference packs each
    weight once, not at every forward, at the memory of a bf16 copy of the weight. A weight made under
    ``torch.inference_mode()`` has no version counter to tell an in-place update by: it is packed afresh at
    every call."""
    if weight.is_inference():
        return _packed(weight)
    key = (weight.data_ptr(), weight.dtype, weight.shape, weight._version)
    kept = _tile_pairs.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    packed = _packed(weight)
    _tile_pairs[weight] = (key, packed)
    return packed


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """:func:`tile_pairs` without keeping it."""
    with torch.no_grad():
        rows = weight.reshape(weight.shape[0], -1).to(torch.bfloat16)
        rows = F.pad(rows, (0, -rows.shape[1] % 32)).contiguous()
        return kernels().pack_tile_pairs(rows)


def threads_share(chunks: int) -> bool:
    """Whether a pass over ``chunks`` chunks gives each thread whole chunks (the kernels' passes that
    share chunks out, each chunk's products on one thread): at least two chunks per thread. With fewer, the
    threads are better used splitting each product between them."""
    return chunks >= 2 * torch.get_num_threads()


def shared_chunk(total: int, chunk: int) -> int:
    """Items (tokens) per chunk of ``total`` for a training pass in chunks of at most ``chunk`` whose
    backward may share the chunks out among the threads: from four chunks on, equal chunks whose number is
    a multiple of four, so that two or four threads get the same work. The chunks do not depend on the
    thread count, and neither do the sums over them."""
    chunks = -(-total // chunk)
    if chunks < 4:
        return chunk
    return -(-total // (-(-chunks // 4) * 4))


def inference_chunk(total: int, chunk: int, least: int) -> int:
    """Items (tokens) per chunk of ``total`` for an inference pass in chunks of at most ``chunk`` that shares
    them out among the threads (:func:`threads_share`): equal chunks, at least two per thread and their
    number a multiple of the thread count, but not under ``least`` items (then fewer, down to one). An
    inference pass's values do not depend on its chunks."""
    threads = torch.get_num_threads()
    chunks = max(-(-total // chunk), 2 * threads)
    chunks = -(-chunks // threads) * threads
    if total < chunks * least:
        chunks = max(1, total // least // threads * threads)
    return -(-total // chunks)


def first_order_only(backward: Callable) -> Callable:
    """``once_differentiable`` for the kernels' backward passes (the window attention, a block's MLP half), with an
    error that says what to do at a backward with ``create_graph=True`` (instead of PyTorch's at the second
    backward)."""
    once = once_differentiable(backward)

    @wraps(backward)
    def checked(ctx, *grads: torch.Tensor) -> tuple:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "mmswin's compiled CPU bf16 window attention and MLP half have no second derivative (a backward with "
                'create_graph=True). Set MMSWIN_BF16_MATMUL=native before the forward to take PyTorch\'s '
                'operators there, whose gradients are differentiable.')
        return once(ctx, *grads)

    return checked
