"""The ``mmswin`` registry scope, a child of mmengine's root ``MODELS``.

Because it is a child of the root, ``MODELS.build(dict(type='mmswin.SwinTransformer'))`` works from
mmengine, mmdet and mmseg alike once ``mmswin`` is imported.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmswin', locations=['mmswin.models'])
