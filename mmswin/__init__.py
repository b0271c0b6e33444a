"""Swin Transformer V1 and V2 backbones for MMDetection 3.x and MMSegmentation 1.x."""
from .checkpoint import install as _install_safe_checkpoint_loading
from .models import SwinTransformer, SwinTransformerV2
from .version import __version__

_install_safe_checkpoint_loading()

__all__ = ['__version__', 'SwinTransformer', 'SwinTransformerV2']
