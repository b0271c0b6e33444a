"""The ``mmswin`` registry scope, children of mmengine's root ``MODELS`` and ``HOOKS``.

Because they are children of the roots, ``MODELS.build(dict(type='mmswin.SwinTransformer'))`` and
``custom_hooks=[dict(type='mmswin.RNGStateHook')]`` work from mmengine, mmdet and mmseg alike once
``mmswin`` is imported.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmswin', locations=['mmswin.models'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmswin', locations=['mmswin.engine'])
