"""The end-to-end demo: synthetic data, then Mask R-CNN and UperNet with small Swins, trained from scratch.

    python tools/demo/run_demo.py [--data-dir data/demo] [--work-dir work_dirs/demo] [--jobs J]
                                  [--tasks det seg] [--det-iters N] [--seg-iters N]
                                  [--det-cfg-options k=v ...] [--seg-cfg-options k=v ...] [--verbose]

1. generates the datasets of ``make_demo_data.py`` into ``--data-dir`` unless a complete generation with
   the default settings is already there;
2. trains ``configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py`` (mmdet) and
   ``configs/demo/swin-demo_upernet_demo-shapes-128x128.py`` (mmseg) with mmengine's Runner, each in its
   own process (mmdet and mmseg keep global registry scopes); with two or more CPU cores both run at
   once, each with half of the cores (``--jobs 1``: one after the other, with all of them);
3. evaluates each on its validation split (mmdet's CocoMetric, bbox and segm; mmseg's IoUMetric) and
   draws a few predictions next to the ground truth with mmdet's / mmseg's visualizers;
4. prints box AP, box AP50, mask AP and mIoU and writes ``WORK_DIR/results.json``:
   ``{"det": {"bbox_mAP": ..., "bbox_mAP_50": ..., "segm_mAP": ..., ...}, "seg": {"mIoU": ..., ...},
   "seconds": {...}}`` (AP as fractions as mmdet reports them, mIoU in percent as mmseg does).

Each task's checkpoint, logs and pictures go to ``WORK_DIR/det`` and ``WORK_DIR/seg``. The console shows
the training progress of both tasks (``--verbose``: everything they log); the full output of each is in
``WORK_DIR/<task>/console.log``.
"""
import argparse
import ast
import json
import os
import os.path as osp
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)                       # run from a clone without install
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from make_demo_data import ensure_demo_data  # noqa: E402

TASKS = {
    'det': dict(config=osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_swin-demo_fpn_demo-shapes-128.py'),
                title='instance segmentation (Mask R-CNN + FPN, COCO format)'),
    'seg': dict(config=osp.join(ROOT, 'configs', 'demo', 'swin-demo_upernet_demo-shapes-128x128.py'),
                title='semantic segmentation (UperNet, ADE20K layout)'),
}
NUM_PICTURES = 6
# The shortest training --det-iters / --seg-iters can ask for: rescaled, the demo schedules' warm-up (a tenth of
# the iterations) ends at iteration 1 at the earliest, and the lr decay after it needs an iteration of its own.
MIN_ITERS = 2
# Console lines worth showing from the workers when not --verbose.
_SHOW = ('Iter(train)', 'Iter(test)', 'Saving checkpoint', 'mAP_copypaste', 'per class results', '[demo]',
         'Error', 'error:', 'Traceback')


# ----------------------------------------------------------------------------------------- worker
def build_config(task: str, data_dir: str, work_dir: str, max_iters: Optional[int] = None,
                 cfg_options: Optional[dict] = None):
    """The task's demo config with its data under ``data_dir`` and its outputs in ``work_dir/<task>``.

    ``max_iters`` rescales the schedule (iterations, warm-up, lr decay, checkpoint) to that length.
    """
    from mmengine.config import Config

    from mmswin.runner import prepare_config
    path = TASKS[task]['config']
    cfg = Config.fromfile(path)
    if max_iters is not None:
        scale_schedule(cfg, max_iters)
    cfg = prepare_config(cfg, config_path=path, work_dir=osp.join(work_dir, task), cfg_options=cfg_options)
    if task == 'det':
        root = osp.join(data_dir, 'coco') + os.sep
        for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[key].dataset.data_root = root
        for key in ('val_evaluator', 'test_evaluator'):
            cfg[key].ann_file = osp.join(root, 'annotations', 'instances_val2017.json')
    else:
        root = osp.join(data_dir, 'ade', 'ADEChallengeData2016')
        for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[key].dataset.data_root = root
    return cfg


def scale_schedule(cfg, max_iters: int) -> None:
    """Sets the training length to ``max_iters``, scaling the scheduler milestones with it.

    Raises ValueError when a scheduler is left without iterations (mmengine needs ``begin < end``)."""
    old = cfg.train_cfg.max_iters
    ratio = max_iters / old

    def scaled(value):
        return max(1, int(round(value * ratio))) if value else value
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    for scheduler in cfg.param_scheduler:
        scheduler.begin = scaled(scheduler.get('begin', 0))
        if 'end' in scheduler:
            scheduler.end = max_iters if scheduler.end >= old else scaled(scheduler.end)
            if scheduler.end <= scheduler.begin:
                raise ValueError(f'{max_iters} training iterations are too few for the schedule: {scheduler.type} '
                                 f'would run from iteration {scheduler.begin} to {scheduler.end}')
    cfg.default_hooks.checkpoint.interval = max_iters


def _upscaled(sample, task: str, factor: int):
    """A copy of a test result ``factor`` times larger, for legible drawings of small images."""
    import torch

    def nearest(t: torch.Tensor) -> torch.Tensor:     # (N, H, W) -> (N, factor*H, factor*W)
        return t.repeat_interleave(factor, -2).repeat_interleave(factor, -1)

    big = sample.clone()
    if task == 'det':
        gt, pred = big.gt_instances, big.pred_instances
        boxes = gt.bboxes.tensor if hasattr(gt.bboxes, 'tensor') else gt.bboxes
        gt.bboxes = boxes * factor
        height, width = gt.masks.height, gt.masks.width
        gt.masks = gt.masks.resize((height * factor, width * factor))
        pred.bboxes = pred.bboxes * factor
        if 'masks' in pred:
            pred.masks = nearest(pred.masks)
    else:
        from mmengine.structures import PixelData
        for key in ('gt_sem_seg', 'pred_sem_seg'):
            big.set_field(PixelData(data=nearest(sample.get(key).data)), key)
        if 'seg_logits' in big:
            del big.seg_logits
    return big


def save_predictions(runner, task: str, out_dir: str, num: int = NUM_PICTURES, factor: int = 3) -> List[str]:
    """Draws the ground truth (left) and the prediction (right) of the first ``num`` test images into
    ``out_dir``, ``factor`` times enlarged."""
    import mmcv
    import torch
    from mmengine.dataset import pseudo_collate

    os.makedirs(out_dir, exist_ok=True)
    dataset = runner.test_dataloader.dataset
    visualizer = runner.visualizer
    visualizer.dataset_meta = dataset.metainfo
    model = runner.model
    model.eval()
    paths = []
    for index in range(min(num, len(dataset))):
        with torch.no_grad():
            sample = model.test_step(pseudo_collate([dataset[index]]))[0]
        image = mmcv.imread(sample.img_path, channel_order='rgb')
        image = mmcv.imrescale(image, factor, interpolation='nearest')
        out_file = osp.join(out_dir, osp.splitext(osp.basename(sample.img_path))[0] + '.png')
        extra = dict(pred_score_thr=0.5) if task == 'det' else dict(with_labels=True)
        visualizer.add_datasample(osp.basename(out_file), image, data_sample=_upscaled(sample, task, factor),
                                  draw_gt=True, draw_pred=True, show=False, out_file=out_file, **extra)
        paths.append(out_file)
    return paths


def train_and_evaluate(task: str, data_dir: str, work_dir: str, max_iters: Optional[int] = None,
                       cfg_options: Optional[dict] = None, num_pictures: int = NUM_PICTURES) -> Dict[str, float]:
    """Trains the task's demo model, tests it on the validation split, draws pictures; returns the
    metrics without their ``coco/`` prefix. Also writes them to ``work_dir/<task>/metrics.json``."""
    from mmengine.runner import Runner

    cfg = build_config(task, data_dir, work_dir, max_iters=max_iters, cfg_options=cfg_options)
    # Evaluate once, after training, through the test loop (the test split is the validation split).
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    runner = Runner.from_cfg(cfg)
    start = time.time()
    print(f'[demo] {task}: training {cfg.train_cfg.max_iters} iterations', flush=True)
    runner.train()
    trained = time.time()
    print(f'[demo] {task}: trained in {trained - start:.0f} s; evaluating on the validation split', flush=True)
    metrics = runner.test()
    metrics = {key.split('/')[-1]: float(value) for key, value in metrics.items()}
    pictures = save_predictions(runner, task, osp.join(cfg.work_dir, 'predictions'), num_pictures)
    print(f'[demo] {task}: evaluated in {time.time() - trained:.0f} s; {len(pictures)} pictures in '
          f'{osp.join(cfg.work_dir, "predictions")}', flush=True)
    with open(osp.join(cfg.work_dir, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=1)
    return metrics


# ------------------------------------------------------------------------------------ orchestration
def _pump(proc: subprocess.Popen, task: str, log_path: str, verbose: bool, lock: threading.Lock) -> None:
    with open(log_path, 'w') as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if verbose or any(key in line for key in _SHOW) or line.startswith(('|', '+')):
                with lock:
                    sys.stdout.write(f'[{task}] {line}')
                    sys.stdout.flush()


def _worker_command(task: str, args: argparse.Namespace) -> List[str]:
    cmd = [sys.executable, osp.abspath(__file__), '--worker', task, '--data-dir', args.data_dir,
           '--work-dir', args.work_dir]
    iters = args.det_iters if task == 'det' else args.seg_iters
    if iters is not None:
        cmd += [f'--{task}-iters', str(iters)]
    options = args.det_cfg_options if task == 'det' else args.seg_cfg_options
    if options:
        cmd += ['--cfg-literal', repr(options)]     # parsed values as Python literals: tuples stay tuples
    return cmd


def run_workers(args: argparse.Namespace) -> Dict[str, float]:
    """Runs each task in its own process, ``args.jobs`` at a time; returns each task's seconds."""
    jobs = max(1, min(args.jobs, len(args.tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    lock = threading.Lock()
    pending = list(args.tasks)
    running: Dict[str, tuple] = {}
    seconds: Dict[str, float] = {}
    failed: List[str] = []
    stopped = set()
    print(f'[demo] training {", ".join(args.tasks)}: {jobs} at a time, {threads} thread(s) each', flush=True)
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            os.makedirs(osp.join(args.work_dir, task), exist_ok=True)
            log_path = osp.join(args.work_dir, task, 'console.log')
            proc = subprocess.Popen(_worker_command(task, args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            pump = threading.Thread(target=_pump, args=(proc, task, log_path, args.verbose, lock), daemon=True)
            pump.start()
            running[task] = (proc, pump, time.time(), log_path)
        time.sleep(0.5)
        for task, (proc, pump, start, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            pump.join()
            seconds[task] = round(time.time() - start, 1)
            del running[task]
            if proc.returncode != 0 and task not in stopped:
                failed.append(task)
                with open(log_path) as f:
                    tail = f.readlines()[-40:]
                with lock:
                    print(f'[demo] {task} failed (exit code {proc.returncode}); the end of {log_path}:')
                    sys.stdout.write(''.join(f'[{task}] {line}' for line in tail))
                for other, (other_proc, *_) in running.items():   # no point in finishing the others
                    print(f'[demo] stopping {other}', flush=True)
                    other_proc.terminate()
                    stopped.add(other)
                pending.clear()
    if failed:
        raise SystemExit(f'[demo] failed: {", ".join(failed)}')
    return seconds


def _metric(metrics: dict, key: str, digits: int) -> str:
    return f'{metrics[key]:.{digits}f}' if key in metrics else 'n/a'


def summarize(results: dict) -> str:
    lines = ['', '=' * 72, 'mmswin demo: small Swin backbones trained from scratch, validation-split results']
    if 'det' in results:
        det = results['det']
        lines.append(f"  {TASKS['det']['title']}")
        if not det:  # mmdet's CocoMetric reports nothing when the model detected nothing
            lines.append('    no detections on the validation split: no AP')
        else:
            lines.append(f"    box AP {_metric(det, 'bbox_mAP', 3)}   box AP50 {_metric(det, 'bbox_mAP_50', 3)}   "
                         f"mask AP {_metric(det, 'segm_mAP', 3)}   mask AP50 {_metric(det, 'segm_mAP_50', 3)}")
    if 'seg' in results:
        seg = results['seg']
        lines.append(f"  {TASKS['seg']['title']}")
        lines.append(f"    mIoU {_metric(seg, 'mIoU', 2)}   mAcc {_metric(seg, 'mAcc', 2)}   "
                     f"aAcc {_metric(seg, 'aAcc', 2)}")
    if 'seconds' in results:
        lines.append('  time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items()))
    lines.append('=' * 72)
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='mmswin end-to-end demo on synthetic data (CPU, minutes)')
    parser.add_argument('--data-dir', default='data/demo', help='where the synthetic datasets are (generated)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='checkpoints, logs, pictures, results.json')
    parser.add_argument('--tasks', nargs='+', choices=sorted(TASKS), default=['det', 'seg'])
    parser.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                        help='tasks trained at the same time (default: 2 with two or more CPU cores)')
    parser.add_argument('--det-iters', type=int,
                        help=f'training iterations of the detector (schedule rescaled; at least {MIN_ITERS})')
    parser.add_argument('--seg-iters', type=int,
                        help=f'training iterations of the segmentor (schedule rescaled; at least {MIN_ITERS})')
    parser.add_argument('--det-cfg-options', nargs='+', action=DictAction, help='overrides of the detection config')
    parser.add_argument('--seg-cfg-options', nargs='+', action=DictAction, help='overrides of the segmentation config')
    parser.add_argument('--verbose', action='store_true', help='show everything the trainings log')
    parser.add_argument('--worker', choices=sorted(TASKS), help=argparse.SUPPRESS)
    parser.add_argument('--cfg-literal', help=argparse.SUPPRESS)       # a worker's config overrides
    args = parser.parse_args(argv)
    repeated = sorted({task for task in args.tasks if args.tasks.count(task) > 1})
    if repeated:
        parser.error(f'--tasks lists {", ".join(repeated)} more than once')
    if args.jobs < 1:
        parser.error(f'--jobs must be at least 1, got {args.jobs}')
    for flag, iters in (('--det-iters', args.det_iters), ('--seg-iters', args.seg_iters)):
        if iters is not None and iters < MIN_ITERS:
            parser.error(f'{flag} must be at least {MIN_ITERS} (a warm-up iteration, then the lr decay), got {iters}')
    if args.cfg_literal:
        options = ast.literal_eval(args.cfg_literal)
        if args.worker == 'det':
            args.det_cfg_options = options
        else:
            args.seg_cfg_options = options
    args.data_dir = osp.abspath(args.data_dir)
    args.work_dir = osp.abspath(args.work_dir)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        task = args.worker
        train_and_evaluate(task, args.data_dir, args.work_dir,
                           max_iters=args.det_iters if task == 'det' else args.seg_iters,
                           cfg_options=args.det_cfg_options if task == 'det' else args.seg_cfg_options)
        return {}
    start = time.time()
    print(f'[demo] synthetic data in {args.data_dir}', flush=True)
    ensure_demo_data(args.data_dir)
    seconds = dict(data=round(time.time() - start, 1))
    seconds.update(run_workers(args))
    results = {}
    for task in args.tasks:
        with open(osp.join(args.work_dir, task, 'metrics.json')) as f:
            results[task] = json.load(f)
    seconds['total'] = round(time.time() - start, 1)
    results['seconds'] = seconds
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print(summarize(results))
    print(f'results: {osp.join(args.work_dir, "results.json")}; pictures: '
          + ', '.join(osp.join(args.work_dir, t, 'predictions') for t in args.tasks))
    return results


if __name__ == '__main__':
    main()
