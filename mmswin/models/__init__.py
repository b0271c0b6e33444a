from .swin import ARCH_ZOO, SwinTransformer, SwinTransformerV2

__all__ = ['ARCH_ZOO', 'SwinTransformer', 'SwinTransformerV2']
