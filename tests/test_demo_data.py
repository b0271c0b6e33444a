"""tools/demo/make_demo_data.py: deterministic synthetic data that pycocotools, mmdet and mmseg read as the
demo configs describe it; the demo configs and run_demo's config preparation (no training here)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / 'tools' / 'demo'
DET_CONFIG = ROOT / 'configs' / 'demo' / 'mask-rcnn_swin-demo_fpn_demo-shapes-128.py'
SEG_CONFIG = ROOT / 'configs' / 'demo' / 'swin-demo_upernet_demo-shapes-128x128.py'
NUM_TRAIN, NUM_VAL, SIZE = 6, 3, 128


def _load(name):
    if str(DEMO) not in sys.path:
        sys.path.insert(0, str(DEMO))
    spec = importlib.util.spec_from_file_location(name, DEMO / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load('make_demo_data')


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    gen.make_demo_data(str(out), num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=0)
    return out


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_layout(demo_dir):
    coco, ade = demo_dir / 'coco', demo_dir / 'ade' / 'ADEChallengeData2016'
    assert (coco / 'annotations' / 'instances_train2017.json').is_file()
    assert (coco / 'annotations' / 'instances_val2017.json').is_file()
    assert len(list((coco / 'train2017').glob('*.jpg'))) == NUM_TRAIN
    assert len(list((coco / 'val2017').glob('*.jpg'))) == NUM_VAL
    for split, num in (('training', NUM_TRAIN), ('validation', NUM_VAL)):
        images = sorted(p.stem for p in (ade / 'images' / split).glob('*.jpg'))
        labels = sorted(p.stem for p in (ade / 'annotations' / split).glob('*.png'))
        assert images == labels and len(images) == num
    settings = json.loads((demo_dir / gen.STAMP).read_text())
    assert settings['num_train'] == NUM_TRAIN and settings['classes'] == list(gen.CLASSES)


def test_deterministic(demo_dir, tmp_path):
    gen.make_demo_data(str(tmp_path / 'again'), num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=0)
    first, second = _files(demo_dir), _files(tmp_path / 'again')
    assert sorted(first) == sorted(second) and len(first) == 3 * (NUM_TRAIN + NUM_VAL) + 3
    assert all(first[k] == second[k] for k in first)
    # another seed gives other scenes; one image more leaves the earlier ones unchanged
    gen.make_demo_data(str(tmp_path / 'seed1'), num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=1)
    other = _files(tmp_path / 'seed1')
    assert other['coco/train2017/000000000001.jpg'] != first['coco/train2017/000000000001.jpg']
    gen.make_demo_data(str(tmp_path / 'more'), num_train=NUM_TRAIN + 1, num_val=NUM_VAL, size=SIZE, seed=0)
    more = _files(tmp_path / 'more')
    assert more['coco/train2017/000000000006.jpg'] == first['coco/train2017/000000000006.jpg']
    assert 'coco/train2017/000000000007.jpg' in more


def test_scenes():
    rng = np.random.default_rng(3)
    counts = np.zeros(len(gen.CLASSES), int)
    for _ in range(20):
        img, objects = gen.render_scene(rng, 96)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert 1 <= len(objects) <= 5
        union = np.zeros((96, 96), int)
        for label, mask in objects:
            counts[label] += 1
            assert mask.sum() >= gen._MIN_PART and not gen._has_hole_or_crumb(mask)
            union += mask
        assert union.max() == 1                       # visible masks do not overlap
        # solid shapes over a textured background: a shape's pixels vary much less than the background's
        inside = np.mean([img[mask].astype(float).std(0).mean() for _, mask in objects])
        assert inside < img[union == 0].astype(float).std(0).mean()
    assert (counts > 0).all()


def test_occlusion_is_present():
    rng = np.random.default_rng(0)
    overlapping = 0
    for _ in range(30):
        _, objects = gen.render_scene(rng, 128)
        masks = [m for _, m in objects]
        dilated = [np.pad(m, 1)[:-2, 1:-1] | np.pad(m, 1)[2:, 1:-1] | m for m in masks]
        overlapping += any((dilated[i] & masks[j]).any() for i in range(len(masks)) for j in range(len(masks))
                           if i != j)
    assert overlapping >= 5                          # shapes touching/occluding each other are common


def test_pycocotools(demo_dir):
    from pycocotools.coco import COCO
    for split, num in (('train', NUM_TRAIN), ('val', NUM_VAL)):
        coco = COCO(str(demo_dir / 'coco' / 'annotations' / f'instances_{split}2017.json'))
        assert len(coco.getImgIds()) == num
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(gen.CLASSES)
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= 2 * num
        for ann in anns:
            assert ann['iscrowd'] == 0 and ann['category_id'] in coco.getCatIds()
            assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann['segmentation'])
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann['area'] > 0       # the polygons rasterise to exactly the visible pixels
            ys, xs = np.nonzero(mask)
            assert ann['bbox'] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        for img_id in coco.getImgIds():               # visible parts of one image never overlap
            masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))]
            assert np.sum(masks, 0).max() == 1


def test_coco_matches_generator(demo_dir):
    from pycocotools.coco import COCO
    coco = COCO(str(demo_dir / 'coco' / 'annotations' / 'instances_val2017.json'))
    _, objects = gen.render_scene(gen._rng(0, 'coco', 'val', 1), SIZE)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    assert [a['category_id'] - 1 for a in anns] == [label for label, _ in objects]
    for ann, (_, mask) in zip(anns, objects):
        assert (coco.annToMask(ann).astype(bool) == mask).all()


def _dataset_cfg(config: Path, split: str, data_root: str):
    cfg = Config.fromfile(str(config))
    ds = cfg[f'{split}_dataloader'].dataset
    ds.data_root = data_root
    return cfg, ds


def test_mmdet_coco_dataset(demo_dir):
    init_default_scope('mmdet')
    from mmdet.registry import DATASETS
    root = str(demo_dir / 'coco') + os.sep
    for split, num in (('train', NUM_TRAIN), ('val', NUM_VAL)):
        cfg, ds_cfg = _dataset_cfg(DET_CONFIG, split, root)
        dataset = DATASETS.build(ds_cfg)
        assert type(dataset).__name__ == 'CocoDataset' and len(dataset) == num
        assert dataset.metainfo['classes'] == gen.CLASSES
        assert cfg.model.roi_head.bbox_head.num_classes == cfg.model.roi_head.mask_head.num_classes == 4
    # the validation pipeline keeps the annotations: boxes, masks and labels agree
    sample = dataset[0]
    gt = sample['data_samples'].gt_instances
    assert sample['inputs'].shape == (3, SIZE, SIZE)
    assert len(gt) >= 1 and set(gt.labels.tolist()) <= set(range(4))
    masks = gt.masks.to_ndarray().astype(bool)
    for box, mask in zip(gt.bboxes.numpy(), masks):
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    raw = json.loads((demo_dir / 'coco' / 'annotations' / 'instances_val2017.json').read_text())
    first = [a for a in raw['annotations'] if a['image_id'] == sample['data_samples'].img_id]
    assert gt.labels.tolist() == [a['category_id'] - 1 for a in first]


def test_mmseg_dataset(demo_dir):
    init_default_scope('mmseg')
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import DATASETS
    root = str(demo_dir / 'ade' / 'ADEChallengeData2016')
    for split, num in (('train', NUM_TRAIN), ('val', NUM_VAL)):
        cfg, ds_cfg = _dataset_cfg(SEG_CONFIG, split, root)
        dataset = DATASETS.build(ds_cfg)
        assert len(dataset) == num and dataset.metainfo['classes'] == gen.SEG_CLASSES
        assert dataset.reduce_zero_label and cfg.model.decode_head.num_classes == len(gen.SEG_CLASSES)
        # the same folders as mmseg's ADE20KDataset reads them (with its own 150 class names)
        ade = ADE20KDataset(data_root=root, data_prefix=ds_cfg.data_prefix, pipeline=[])
        assert [ade.get_data_info(i)['img_path'] for i in range(len(ade))] == \
            [dataset.get_data_info(i)['img_path'] for i in range(num)]
    sample = dataset[0]
    label = sample['data_samples'].gt_sem_seg.data.numpy()[0]
    assert sample['inputs'].shape == (3, SIZE, SIZE) and label.shape == (SIZE, SIZE)
    assert set(np.unique(label)) <= set(range(len(gen.SEG_CLASSES)))     # 0 (unlabelled) is not used
    assert (label == 0).mean() > 0.3 and len(np.unique(label)) >= 2      # background and shapes
    _, objects = gen.render_scene(gen._rng(0, 'ade', 'val', 0), SIZE)
    expected = np.zeros((SIZE, SIZE), np.int64)
    for cls, mask in objects:
        expected[mask] = cls + 1
    assert (label == expected).all()


def test_cli_and_safety(tmp_path):
    out = tmp_path / 'cli'
    subprocess.run([sys.executable, str(DEMO / 'make_demo_data.py'), str(out), '--num-train', '2', '--num-val', '1',
                    '--size', '96', '--seed', '5'], check=True, capture_output=True)
    settings = gen.existing_settings(str(out))
    assert settings['size'] == 96 and settings['seed'] == 5
    assert len(list((out / 'coco' / 'train2017').glob('*.jpg'))) == 2
    # regenerating replaces an earlier generation completely
    gen.make_demo_data(str(out), num_train=1, num_val=1, size=96, seed=5)
    assert len(list((out / 'ade' / 'ADEChallengeData2016' / 'images' / 'training').glob('*.jpg'))) == 1
    # ensure_demo_data keeps a matching generation and replaces another one
    stamp = out / gen.STAMP
    before = stamp.stat().st_mtime_ns
    gen.ensure_demo_data(str(out), num_train=1, num_val=1, size=96, seed=5)
    assert stamp.stat().st_mtime_ns == before
    gen.ensure_demo_data(str(out), num_train=2, num_val=1, size=96, seed=5)
    assert gen.existing_settings(str(out))['num_train'] == 2
    gen.ensure_demo_data(str(out), num_train=2, num_val=1, size=96, seed=6)
    assert gen.existing_settings(str(out))['seed'] == 6
    # folders it did not write are never deleted
    foreign = tmp_path / 'foreign'
    (foreign / 'coco').mkdir(parents=True)
    (foreign / 'coco' / 'keep.txt').write_text('real data')
    with pytest.raises(FileExistsError):
        gen.make_demo_data(str(foreign), num_train=1, num_val=1)
    assert (foreign / 'coco' / 'keep.txt').exists()


def test_demo_configs():
    det, seg = Config.fromfile(str(DET_CONFIG)), Config.fromfile(str(SEG_CONFIG))
    for cfg in (det, seg):
        assert cfg.model.backbone.init_cfg is None and cfg.model.backbone.type.startswith('mmswin.')
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert cfg.default_hooks.checkpoint.save_last and cfg.default_hooks.checkpoint.by_epoch is False
        assert cfg.train_dataloader.num_workers <= 1 and cfg.randomness.seed is not None
        assert 'LocalVisBackend' in [b['type'] for b in cfg.visualizer.vis_backends]
    assert det.val_evaluator.type == 'CocoMetric' and set(det.val_evaluator.metric) == {'bbox', 'segm'}
    assert det.model.backbone.with_cp is False
    assert seg.val_evaluator.type == 'IoUMetric' and seg.val_evaluator.iou_metrics == ['mIoU']
    assert seg.model.decode_head.norm_cfg.type == seg.model.auxiliary_head.norm_cfg.type == 'BN'
    assert seg.model.auxiliary_head.num_classes == len(gen.SEG_CLASSES)


def test_run_demo_config_preparation(tmp_path):
    run_demo = _load('run_demo')
    det = run_demo.build_config('det', str(tmp_path / 'data'), str(tmp_path / 'work'), max_iters=40,
                                cfg_options={'train_dataloader.batch_size': 2})
    assert det.work_dir == str(tmp_path / 'work' / 'det')
    assert det.train_dataloader.dataset.data_root == str(tmp_path / 'data' / 'coco') + os.sep
    assert det.test_evaluator.ann_file == str(tmp_path / 'data' / 'coco' / 'annotations' / 'instances_val2017.json')
    assert det.train_cfg.max_iters == 40 and det.train_dataloader.batch_size == 2
    assert det.param_scheduler[-1].end == 40 and det.param_scheduler[0].end < 40
    seg = run_demo.build_config('seg', str(tmp_path / 'data'), str(tmp_path / 'work'), max_iters=30)
    assert seg.val_dataloader.dataset.data_root == str(tmp_path / 'data' / 'ade' / 'ADEChallengeData2016')
    assert seg.train_cfg.max_iters == 30 and seg.param_scheduler[-1].end == 30


def test_run_demo_passes_overrides_to_its_workers(tmp_path):
    run_demo = _load('run_demo')
    args = run_demo.parse_args(['--work-dir', str(tmp_path), '--det-iters', '7', '--det-cfg-options',
                                'model.backbone.num_heads=[1,2,4,8]', 'model.backbone.with_cp=True',
                                'optim_wrapper.optimizer.lr=0.002',
                                'train_dataloader.dataset.pipeline.2.scale=(160,160)', "load_from=/tmp/it's.pth", '--jobs', '1'])
    cmd = run_demo._worker_command('det', args)
    worker = run_demo.parse_args(cmd[2:])
    assert worker.worker == 'det' and worker.det_iters == 7 and worker.work_dir == str(tmp_path)
    expected = {'model.backbone.num_heads': [1, 2, 4, 8], 'model.backbone.with_cp': True,
                'optim_wrapper.optimizer.lr': 0.002, 'train_dataloader.dataset.pipeline.2.scale': (160, 160),
                'load_from': "/tmp/it's.pth"}
    assert worker.det_cfg_options == args.det_cfg_options == expected  # as mmengine's DictAction parses them
    assert type(worker.det_cfg_options['train_dataloader.dataset.pipeline.2.scale']) is tuple  # mmcv's Resize
    seg = run_demo._worker_command('seg', args)
    assert '--cfg-literal' not in seg and '--det-iters' not in seg and seg[seg.index('--worker') + 1] == 'seg'
    args = run_demo.parse_args(['--work-dir', str(tmp_path), '--seg-iters', '5', '--det-iters', '6'])
    det, seg = (run_demo.parse_args(run_demo._worker_command(task, args)[2:]) for task in ('det', 'seg'))
    assert (det.worker, det.det_iters, det.seg_iters) == ('det', 6, None)
    assert (seg.worker, seg.seg_iters, seg.det_iters) == ('seg', 5, None)


def test_run_demo_refuses_a_task_named_twice(capsys):
    run_demo = _load('run_demo')
    with pytest.raises(SystemExit) as exit_info:
        run_demo.parse_args(['--tasks', 'det', 'seg', 'det'])
    assert exit_info.value.code == 2 and '--tasks lists det more than once' in capsys.readouterr().err


def test_run_demo_summary_without_detections():
    """mmdet's CocoMetric returns no metrics when nothing was detected: the summary says so."""
    run_demo = _load('run_demo')
    text = run_demo.summarize({'det': {}, 'seg': {'mIoU': 40.0, 'mAcc': 50.0, 'aAcc': 60.0}})
    assert 'no detections on the validation split: no AP' in text and 'mIoU 40.00   mAcc 50.00   aAcc 60.00' in text
    text = run_demo.summarize({'det': {'bbox_mAP': 0.5, 'bbox_mAP_50': 0.75}})
    assert 'box AP 0.500   box AP50 0.750   mask AP n/a   mask AP50 n/a' in text


def test_image_demo_names_a_file_that_is_not_an_image(tmp_path):
    image_demo = _load('image_demo')
    path = tmp_path / 'notimage.jpg'
    path.write_text('not an image')
    with pytest.raises(SystemExit, match=f'error: {re.escape(str(path))} is not an image OpenCV can read'):
        image_demo.main([str(path), str(DET_CONFIG), str(tmp_path / 'none.pth')])


def test_run_demo_rejects_iterations_its_schedules_cannot_take(tmp_path, capsys):
    """--det-iters / --seg-iters below run_demo.MIN_ITERS are argument errors naming the flag; at MIN_ITERS
    both rescaled schedules are ones mmengine builds, and one fewer leaves a scheduler without iterations."""
    import torch
    from mmengine.registry import PARAM_SCHEDULERS
    run_demo = _load('run_demo')
    for flag in ('--det-iters', '--seg-iters'):
        for value in (str(run_demo.MIN_ITERS - 1), '0', '-5'):
            with pytest.raises(SystemExit) as exit_info:
                run_demo.parse_args([flag, value])
            assert exit_info.value.code == 2
            assert f'{flag} must be at least {run_demo.MIN_ITERS}' in capsys.readouterr().err
        args = run_demo.parse_args([flag, str(run_demo.MIN_ITERS)])
        assert getattr(args, flag[2:].replace('-', '_')) == run_demo.MIN_ITERS
    with pytest.raises(SystemExit) as exit_info:
        run_demo.parse_args(['--jobs', '0'])
    assert exit_info.value.code == 2 and '--jobs must be at least 1, got 0' in capsys.readouterr().err
    for task in ('det', 'seg'):
        cfg = run_demo.build_config(task, str(tmp_path / 'data'), str(tmp_path / 'work'), max_iters=run_demo.MIN_ITERS)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        for scheduler in cfg.param_scheduler:
            PARAM_SCHEDULERS.build(dict(scheduler, optimizer=optimizer))
        with pytest.raises(ValueError, match='too few for the schedule'):
            run_demo.build_config(task, str(tmp_path / 'data'), str(tmp_path / 'work'),
                                  max_iters=run_demo.MIN_ITERS - 1)
