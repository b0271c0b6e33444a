"""The whole job on the demo data: mmdet's and mmseg's own train/test tools with mmswin configs,
mmswin's tools, an interrupted run resumed, a saved checkpoint evaluated, torchrun with 2 processes."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'demo'))
from make_demo_data import make_demo_data  # noqa: E402

DET_CFG = ROOT / 'configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py'
SEG_CFG = ROOT / 'configs/demo/swin-demo_upernet_demo-shapes-128x128.py'


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('demo_data')
    make_demo_data(str(root), num_train=8, num_val=4, size=64, seed=1)
    return root


def det_options(data: Path, iters: int = 4) -> list:
    coco = f'{data}/coco/'
    ann = f'{coco}annotations/instances_val2017.json'
    return [f'train_dataloader.dataset.data_root={coco}', f'val_dataloader.dataset.data_root={coco}',
            f'test_dataloader.dataset.data_root={coco}', f'val_evaluator.ann_file={ann}',
            f'test_evaluator.ann_file={ann}', f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            'default_hooks.checkpoint.interval=2', 'train_dataloader.batch_size=2',
            'default_hooks.logger.interval=1']


def seg_options(data: Path, iters: int = 4) -> list:
    ade = f'{data}/ade/ADEChallengeData2016'
    return [f'train_dataloader.dataset.data_root={ade}', f'val_dataloader.dataset.data_root={ade}',
            f'test_dataloader.dataset.data_root={ade}', f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}', 'default_hooks.checkpoint.interval=2',
            'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1']


def run(args: list, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHON=sys.executable)
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


def upstream_tool(package: str, name: str) -> Path:
    module = importlib.import_module(package)
    path = Path(module.__file__).parent / '.mim' / 'tools' / name
    assert path.exists(), path
    return path


def metric(text: str, name: str) -> float:
    found = re.findall(rf'{re.escape(name)}: (-?[0-9.]+)', text)
    assert found, f'{name} not in the output'
    return float(found[-1])


DET_METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50')
SEG_METRICS = ('mIoU', 'aAcc')


def assert_evaluates_the_checkpoint(tested: str, trained: str, names: tuple) -> None:
    """A test run of the checkpoint that a training run's last validation scored: every weight loaded (mmengine
    warns of missing or unexpected keys otherwise) and the same scores on the same images."""
    assert 'do not match exactly' not in tested and 'missing keys' not in tested
    for name in names:
        assert metric(tested, name) == metric(trained, name), name


def assert_same_predictions(trained: Path, tested: Path, num_images: int) -> None:
    """The boxes, scores, labels and masks of a test run, image by image, are those of the training run's
    validation (files of ``train_hooks.RecordPredictionsHook``), and there are some."""
    trained, tested = torch.load(trained), torch.load(tested)
    assert [r['img_id'] for r in tested] == [r['img_id'] for r in trained] and len(trained) == num_images
    assert sum(len(r['scores']) for r in trained) > 0
    for before, after in zip(trained, tested):
        assert before.keys() == after.keys() == {'img_id', 'bboxes', 'scores', 'labels', 'masks'}
        for key in ('bboxes', 'scores', 'labels', 'masks'):
            assert torch.equal(before[key], after[key]), (before['img_id'], key)


def test_mmdet_tools_train_and_test(demo_data, tmp_path):
    """mmdet's train.py, then its test.py on the last checkpoint. After 4 iterations the detector's mAP is
    still 0, so besides the metrics the test compares what it predicted: test.py must give, image by image,
    the boxes, scores, labels and masks the training run's validation gave."""
    work, trained_pkl, tested_pkl = tmp_path / 'det', tmp_path / 'trained.pkl', tmp_path / 'tested.pkl'
    cfg = _with_hooks(tmp_path, 'det', f"dict(type='RecordPredictionsHook', path='{trained_pkl}')", DET_CFG)
    out = run([sys.executable, upstream_tool('mmdet', 'train.py'), cfg, '--work-dir', work,
               '--cfg-options', *det_options(demo_data)])
    log = out.stdout + out.stderr
    for name in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert 0.0 <= metric(log, name) <= 1.0
    assert (work / 'iter_4.pth').exists()
    cfg = _with_hooks(tmp_path, 'det_test', f"dict(type='RecordPredictionsHook', path='{tested_pkl}')", DET_CFG)
    out = run([sys.executable, upstream_tool('mmdet', 'test.py'), cfg, work / 'iter_4.pth', '--work-dir',
               tmp_path / 'det_test', '--cfg-options', *det_options(demo_data)])
    assert_evaluates_the_checkpoint(out.stdout + out.stderr, log, DET_METRICS)
    assert_same_predictions(trained_pkl, tested_pkl, num_images=4)


def test_mmseg_tools_train_and_test(demo_data, tmp_path):
    work = tmp_path / 'seg'
    out = run([sys.executable, upstream_tool('mmseg', 'train.py'), SEG_CFG, '--work-dir', work,
               '--cfg-options', *seg_options(demo_data)])
    trained = out.stdout + out.stderr
    assert 0.0 <= metric(trained, 'mIoU') <= 100.0
    out = run([sys.executable, upstream_tool('mmseg', 'test.py'), SEG_CFG, work / 'iter_4.pth', '--work-dir',
               tmp_path / 'seg_test', '--cfg-options', *seg_options(demo_data)])
    assert_evaluates_the_checkpoint(out.stdout + out.stderr, trained, SEG_METRICS)


def _with_hooks(tmp_path: Path, name: str, hooks: str, base: Path = SEG_CFG) -> Path:
    path = tmp_path / f'{name}.py'
    path.write_text(f"_base_ = '{base}'\n"
                    "custom_imports = dict(imports=['mmswin', 'tests.train_hooks'], allow_failed_imports=False)\n"
                    f"custom_hooks = [dict(type='mmswin.RNGStateHook'), {hooks}]\n")
    return path


def _records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_interrupted_run_resumes_exactly_and_checkpoint_evaluates(demo_data, tmp_path):
    """A run SIGKILLed after iteration 3 (last checkpoint: iteration 2) resumes with --resume at
    iteration 3 and repeats the uninterrupted run's learning rates and losses exactly (dropout in the
    heads draws from torch's random stream, and so does the validation after each checkpoint); the final
    checkpoint is then evaluated by tools/test.py, which draws a picture of every prediction."""
    opts = [*seg_options(demo_data, iters=6), 'train_cfg.val_interval=2']
    train = [sys.executable, ROOT / 'tools/train.py']
    whole = tmp_path / 'whole.jsonl'
    run([*train, _with_hooks(tmp_path, 'whole', f"dict(type='RecordLossHook', path='{whole}')"),
         '--work-dir', tmp_path / 'whole', '--cfg-options', *opts])

    work = tmp_path / 'seg'
    first, second = tmp_path / 'first.jsonl', tmp_path / 'second.jsonl'
    dying = _with_hooks(tmp_path, 'dying', f"dict(type='RecordLossHook', path='{first}'), "
                                          "dict(type='KillAtIterHook', kill_after=3)")
    killed = run([*train, dying, '--work-dir', work, '--cfg-options', *opts], check=False)
    assert killed.returncode == -9
    assert (work / 'iter_2.pth').exists() and not (work / 'iter_4.pth').exists()
    resumed = run([*train, _with_hooks(tmp_path, 'resumed', f"dict(type='RecordLossHook', path='{second}')"),
                   '--work-dir', work, '--resume', '--cfg-options', *opts])
    assert 'resumed epoch: 0, iter: 2' in resumed.stdout + resumed.stderr

    reference = _records(whole)
    assert [r['iter'] for r in reference] == [1, 2, 3, 4, 5, 6]
    assert _records(first) == reference[:3]
    assert [r['iter'] for r in _records(second)] == [3, 4, 5, 6]
    assert _records(second) == reference[2:]  # same iterations, learning rates and losses

    out = run([sys.executable, ROOT / 'tools/test.py', SEG_CFG, work / 'iter_6.pth', '--work-dir',
               tmp_path / 'test', '--show-dir', 'pictures', '--cfg-options', *seg_options(demo_data)], cwd=tmp_path)
    # the resumed run's validation at iteration 6 scored the same weights on the same images
    assert_evaluates_the_checkpoint(out.stdout + out.stderr, resumed.stdout + resumed.stderr, SEG_METRICS)
    pictures = sorted((tmp_path / 'pictures').rglob('*.png'))  # as mmseg's test.py: from the current folder
    assert len(pictures) == 4  # one per validation image


def test_torchrun_two_processes(demo_data, tmp_path):
    """Distributed training and testing with torchrun, 2 processes on CPU (gloo; the configs' nccl becomes
    gloo on a CPU-only machine), started from another folder than the repository's. Each process's test
    predictions are those of its validation in training."""
    work = tmp_path / 'dist'
    cfg = _with_hooks(tmp_path, 'dist', f"dict(type='RecordPredictionsHook', path='{tmp_path}/trained_{{rank}}.pkl')",
                      DET_CFG)
    out = run(['bash', ROOT / 'tools/dist_train.sh', cfg, 2, '--work-dir', work, '--cfg-options',
               *det_options(demo_data)], cwd=tmp_path)
    log = out.stdout + out.stderr
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size, also on CPU
    assert (work / 'iter_4.pth').exists()
    cfg = _with_hooks(tmp_path, 'dist_test',
                      f"dict(type='RecordPredictionsHook', path='{tmp_path}/tested_{{rank}}.pkl')", DET_CFG)
    out = run(['bash', ROOT / 'tools/dist_test.sh', cfg, work / 'iter_4.pth', 2, '--work-dir',
               tmp_path / 'dist_test', '--cfg-options', *det_options(demo_data)], cwd=tmp_path)
    assert_evaluates_the_checkpoint(out.stdout + out.stderr, log, DET_METRICS)
    for rank in (0, 1):
        assert_same_predictions(tmp_path / f'trained_{rank}.pkl', tmp_path / f'tested_{rank}.pkl', num_images=2)


def test_mim_train_and_test(demo_data, tmp_path):
    """``mim train`` / ``mim test`` run the installed package's own tools with an mmswin config."""
    mim = Path(sys.executable).parent / 'mim'  # installed by `make install`
    work = tmp_path / 'mim'
    out = run([mim, 'train', 'mmseg', SEG_CFG, '--work-dir', work, '--cfg-options', *seg_options(demo_data)])
    trained = out.stdout + out.stderr
    assert 0.0 <= metric(trained, 'mIoU') <= 100.0
    out = run([mim, 'test', 'mmseg', SEG_CFG, '--checkpoint', work / 'iter_4.pth', '--work-dir',
               tmp_path / 'mim_test', '--cfg-options', *seg_options(demo_data)])
    assert_evaluates_the_checkpoint(out.stdout + out.stderr, trained, SEG_METRICS)
