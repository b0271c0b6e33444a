from .swin import ARCH_ALIASES, ARCH_ZOO, SwinTransformer, SwinTransformerV2

__all__ = ['ARCH_ALIASES', 'ARCH_ZOO', 'SwinTransformer', 'SwinTransformerV2']
