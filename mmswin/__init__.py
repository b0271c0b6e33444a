"""Swin Transformer V1 and V2 backbones for MMDetection 3.x and MMSegmentation 1.x."""
from .version import __version__
from .models import SwinTransformer, SwinTransformerV2  # noqa: F401  (registers the models)

__all__ = ['__version__', 'SwinTransformer', 'SwinTransformerV2']
