"""Every config in configs/ loads, builds its model on CPU and runs a forward pass."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py')
                 if not p.name.startswith('_'))


def _build(cfg: Config):
    scope = cfg.default_scope
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('path', CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_builds_and_runs(path):
    cfg = Config.fromfile(str(path))
    assert 'mmswin' in cfg.custom_imports['imports']
    backbone = cfg.model.backbone
    assert backbone.type.startswith('mmswin.')
    init = backbone.get('init_cfg') or {}
    if not path.parent.name == 'demo':
        assert init.get('type') == 'Pretrained' and init['checkpoint'].startswith('https://')
    # --auto-scale-lr works with every config: the reference batch is the one its learning rate is for
    batch = cfg.train_dataloader.batch_size * (1 if path.parent.name == 'demo' else 8)  # 8 GPUs
    assert cfg.auto_scale_lr.base_batch_size == batch and not cfg.auto_scale_lr.get('enable', False)
    model = _build(cfg).eval()
    assert type(model.backbone).__name__ == backbone.type.split('.')[-1]
    torch.manual_seed(0)
    with torch.no_grad():
        if cfg.default_scope == 'mmdet':
            from mmdet.testing import demo_mm_inputs
            data = demo_mm_inputs(1, [[3, 96, 128]], num_classes=cfg.model.roi_head.mask_head.num_classes,
                                  with_mask=True)
            results = model.test_step(data)
            assert len(results) == 1 and hasattr(results[0], 'pred_instances')
        else:
            logits = model(torch.randn(1, 3, 64, 96), mode='tensor')
            assert logits.shape == (1, cfg.model.decode_head.num_classes, 16, 24)


@pytest.mark.parametrize('folder', ['swin', 'swinv2'])
def test_metafile_lists_every_config_once(folder):
    import yaml
    root = Path(__file__).resolve().parents[1]
    meta = yaml.safe_load((root / 'configs' / folder / 'metafile.yml').read_text())
    listed = sorted(m['Config'] for m in meta['Models'])
    on_disk = sorted(f'configs/{folder}/{p.name}' for p in (root / 'configs' / folder).glob('*.py'))
    assert listed == on_disk
    for model in meta['Models']:
        assert model['Name'] == Path(model['Config']).stem
        assert model['Metadata']['Reproduced'] is False  # nothing is claimed as reproduced
        assert model['Results'] or 'not yet reproduced' in model['Source']


def _upstream(scope: str, path: str) -> Config:
    """An upstream config, as ``scope::path`` inheritance finds it."""
    import importlib
    root = Path(importlib.import_module(scope).__file__).parent / '.mim' / 'configs'
    return Config.fromfile(str(root / path))


def _plain(value):
    """``value`` without the ``_scope_`` keys that inheritance through ``mmdet::`` adds."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_swin_t_1x_is_mmdets_recipe():
    """The 1x config carries mmdet's name and its published result: it trains mmdet's recipe, with
    mmswin's backbone in place of mmdet's."""
    ours = Config.fromfile(str(ROOT / 'configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'))
    theirs = _upstream('mmdet', 'swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    for key in ('train_pipeline', 'test_pipeline', 'param_scheduler', 'train_cfg'):
        assert _plain(ours[key]) == _plain(theirs[key]), key
    assert ours.auto_scale_lr.base_batch_size == theirs.auto_scale_lr.base_batch_size
    assert _plain(ours.train_dataloader.dataset.pipeline) == _plain(theirs.train_dataloader.dataset.pipeline)
    assert ours.train_dataloader.batch_size == theirs.train_dataloader.batch_size
    assert ours.optim_wrapper.optimizer == theirs.optim_wrapper.optimizer
    assert ours.optim_wrapper.paramwise_cfg == theirs.optim_wrapper.paramwise_cfg
    for key in ('neck', 'rpn_head', 'roi_head', 'train_cfg', 'test_cfg', 'data_preprocessor'):
        assert _plain(ours.model[key]) == _plain(theirs.model[key]), key
    backbone, upstream = ours.model.backbone, theirs.model.backbone
    for key in ('window_size', 'drop_path_rate', 'out_indices', 'with_cp'):
        assert backbone[key] == upstream[key], key
    assert backbone.init_cfg.checkpoint == upstream.init_cfg.checkpoint


def test_cascade_configs_take_cascade_rcnns_rpn():
    """The Cascade Mask R-CNN configs train with Cascade R-CNN's RPN settings (mmdet's base, as the official
    Swin recipe), not the Mask R-CNN ones they inherit."""
    cascade = _upstream('mmdet', '_base_/models/cascade-mask-rcnn_r50_fpn.py').model
    for arch in 'tsb':
        path = ROOT / f'configs/swin/cascade-mask-rcnn_swin-{arch}-p4-w7_fpn_ms-crop-3x_coco.py'
        model = Config.fromfile(str(path)).model
        for key in ('rpn_head', 'test_cfg'):
            assert _plain(model[key]) == _plain(cascade[key]), key
        assert _plain(model.train_cfg) == _plain(cascade.train_cfg)


_SIZES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}
_NAMED = [p for p in CONFIGS if p.parent.name != 'demo']


@pytest.mark.parametrize('path', _NAMED, ids=[p.name for p in _NAMED])
def test_backbone_is_the_size_and_window_of_its_name(path):
    """The backbone a config builds is the architecture of its file name (``swin-s``/``swin-small``, ``w7`` or
    ``window7``), and its checkpoint is one of that size; with a namesake in mmdet's or mmseg's own configs, it is
    the namesake's backbone too."""
    import re

    from mmswin.models import ARCH_ZOO
    from mmswin.registry import MODELS
    cfg = Config.fromfile(str(path))
    size = re.search(r'swin(?:v2)?-(tiny|small|base|large|[tsbl])-', path.name).group(1)
    size = _SIZES.get(size, size)
    window = int(re.search(r'-(?:w|window)(\d+)', path.name).group(1))
    backbone = MODELS.build({k: v for k, v in cfg.model.backbone.items() if k != 'init_cfg'})
    arch = ARCH_ZOO[size]
    assert (backbone.embed_dims, list(backbone.depths), list(backbone.num_heads)) == (
        arch['embed_dims'], list(arch['depths']), list(arch['num_heads']))
    assert list(backbone.window_sizes) == [window] * len(backbone.depths)
    assert f'_{size}_' in Path(cfg.model.backbone.init_cfg.checkpoint).name
    for scope in ('mmdet', 'mmseg'):
        if (Path(__import__(scope).__file__).parent / '.mim/configs/swin' / path.name).exists():
            theirs = _upstream(scope, f'swin/{path.name}').model.backbone
            assert backbone.embed_dims == theirs.embed_dims and list(backbone.depths) == list(theirs.depths)
            assert list(backbone.num_heads) == list(theirs.num_heads)
            assert list(backbone.window_sizes) == [theirs.window_size] * len(theirs.depths)
