"""Swin Transformer V1 and V2 backbones for MMDetection 3.x and MMSegmentation 1.x."""
from .checkpoint import install as _install_safe_checkpoint_loading
from .checkpoint.atomic_write import install as _install_atomic_writes
from .compile_workarounds import install as _install_compile_workarounds
from .distributed import install as _install_cpu_distributed
from .engine import RNGStateHook
from .models import SwinTransformer, SwinTransformerV2
from .version import __version__

_install_safe_checkpoint_loading()
_install_atomic_writes()
_install_cpu_distributed()
_install_compile_workarounds()

__all__ = ['__version__', 'RNGStateHook', 'SwinTransformer', 'SwinTransformerV2']
