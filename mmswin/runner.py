"""Shared command-line options and config preparation of ``tools/train.py`` and ``tools/test.py``."""
import argparse
import os
import os.path as osp
from typing import List, Optional

from mmengine.config import Config, DictAction

SEGMENTORS = ('EncoderDecoder', 'CascadeEncoderDecoder', 'mmseg.EncoderDecoder', 'mmseg.CascadeEncoderDecoder')


def default_scope_of(cfg: Config) -> str:
    """The config's ``default_scope``, else 'mmseg' for segmentors and 'mmdet' for anything else."""
    if cfg.get('default_scope'):
        return cfg.default_scope
    return 'mmseg' if cfg.model.get('type') in SEGMENTORS else 'mmdet'


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both tools share: config overrides and the distributed launcher."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_run_arguments(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def prepare_config(cfg: Config, config_path: str, work_dir: Optional[str] = None, launcher: str = 'none',
                   cfg_options: Optional[dict] = None, amp: bool = False, auto_scale_lr: bool = False,
                   resume: Optional[str] = None) -> Config:
    """Applies the command-line options of the train/test tools the way mmdet's and mmseg's do."""
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.default_scope = default_scope_of(cfg)
    imports = list(cfg.get('custom_imports', {}).get('imports', []))
    if 'mmswin' not in imports:
        cfg.custom_imports = dict(imports=imports + ['mmswin'], allow_failed_imports=False)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])
    if amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume
    return cfg


def enable_visualization(cfg: Config, show_dir: Optional[str], show: bool = False,
                         wait_time: float = 2.0) -> Config:
    """Makes the test loop draw every prediction into ``show_dir`` (a relative path is taken under the
    work dir, for detection and segmentation alike)."""
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise ValueError('the config has no default_hooks.visualization to draw predictions with')
    hooks.visualization.draw = True
    hooks.visualization.interval = 1
    if show:
        hooks.visualization.show = True
        hooks.visualization.wait_time = wait_time
    if show_dir:
        if default_scope_of(cfg) == 'mmseg':  # mmdet's test_out_dir is under the work dir: same here
            cfg.visualizer.save_dir = osp.join(cfg.work_dir, show_dir)
        else:
            hooks.visualization.test_out_dir = show_dir
    return cfg
