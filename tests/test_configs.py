"""Every config in configs/ loads, builds its model on CPU and runs a forward pass."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / 'configs').rglob('*.py')
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
