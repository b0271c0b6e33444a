"""Settings that make ``torch.compile`` of the backbones give the eager results on the CPU.

Inductor's C++ backend (PyTorch 2.13 and earlier) writes the tail block of a 2D-tiled vectorized
reduction with a full-width vector store when the tiled axis is not a multiple of the vector width
(pytorch/pytorch#196681): it writes past the output buffer, which corrupts the heap or silently
overwrites neighbouring values. The backward of a Swin block has such reductions (the position-bias and
bias gradients over 49-token windows, for instance); compiled training steps then abort or return wrong
gradients. Scalar tail loops (``torch._inductor.config.cpp.enable_loop_tail_vec = False``) avoid the
faulty store; they only affect the speed of the loop tails.

Set ``MMSWIN_INDUCTOR_TAIL_VEC=1`` to keep inductor's setting as it is.
"""
import os


def install() -> None:
    """Turn off inductor's vectorized loop tails unless ``MMSWIN_INDUCTOR_TAIL_VEC=1``."""
    if os.environ.get('MMSWIN_INDUCTOR_TAIL_VEC') == '1':
        return
    try:
        from torch._inductor import config
    except ImportError:  # a build of torch without inductor
        return
    if hasattr(config, 'cpp') and hasattr(config.cpp, 'enable_loop_tail_vec'):
        config.cpp.enable_loop_tail_vec = False
