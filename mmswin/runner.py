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


CONFIG_SUFFIXES = ('.py', '.json', '.yaml', '.yml')


class _ConfigOptions(DictAction):
    """mmengine's ``KEY=VALUE`` parsing, with a malformed option reported as an argument error."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            super().__call__(parser, namespace, values, option_string)
        except (ValueError, AssertionError) as error:
            parser.error(f'{option_string} takes KEY=VALUE pairs (VALUE: a number, a string, a list [a,b] or a '
                         f'tuple (a,b)), got {" ".join(values)!r}: {error or type(error).__name__}')


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both tools share: config overrides and the distributed launcher."""
    parser.add_argument('--cfg-options', nargs='+', action=_ConfigOptions, help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_run_arguments(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parses ``argv``; a config that is not a readable config file is an argument error."""
    args = parser.parse_args(argv)
    if not osp.isfile(args.config):
        parser.error(f'config {args.config}: ' + ('a directory, not a config file' if osp.isdir(args.config)
                                                  else 'no such file'))
    if not args.config.endswith(CONFIG_SUFFIXES):
        parser.error(f'config {args.config}: a config file ends with one of {", ".join(CONFIG_SUFFIXES)}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    setup_dynamo_cache_size()
    return args


def setup_dynamo_cache_size() -> None:
    """``DYNAMO_CACHE_SIZE_LIMIT`` (an int) sets torch.compile's recompilation limit, as in mmdet's tools."""
    value = os.environ.get('DYNAMO_CACHE_SIZE_LIMIT')
    if value:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = int(value)


def build_runner(cfg: Config):
    """The config's ``runner_type`` (through mmengine's RUNNERS registry), else mmengine's Runner."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def prepare_config(cfg: Config, config_path: str, work_dir: Optional[str] = None, launcher: str = 'none',
                   cfg_options: Optional[dict] = None, amp: bool = False, auto_scale_lr: bool = False,
                   resume: Optional[str] = None) -> Config:
    """Applies the command-line options of the train/test tools the way mmdet's and mmseg's do."""
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.default_scope = default_scope_of(cfg)
    custom = cfg.get('custom_imports') or {}
    imports = custom.get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    if 'mmswin' not in imports:
        cfg.custom_imports = dict(custom, imports=imports + ['mmswin'])
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])
    if amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if auto_scale_lr:
        if not cfg.get('auto_scale_lr') or 'base_batch_size' not in cfg.auto_scale_lr:
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
    """Makes the test loop draw every prediction into ``show_dir``, where mmdet's and mmseg's tools put it:
    for detection under the run's folder in the work dir, for segmentation as given (relative to the
    current directory)."""
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise ValueError('the config has no default_hooks.visualization to draw predictions with')
    hooks.visualization.draw = True
    hooks.visualization.interval = 1
    if show:
        hooks.visualization.show = True
        hooks.visualization.wait_time = wait_time
    if show_dir:
        if default_scope_of(cfg) == 'mmseg':
            cfg.visualizer.save_dir = show_dir
        else:
            hooks.visualization.test_out_dir = show_dir
    return cfg


def enable_test_time_augmentation(cfg: Config) -> Config:
    """``--tta`` as in mmdet's and mmseg's tools: the config's ``tta_model`` wraps the model and its
    ``tta_pipeline`` replaces the test dataset's pipeline."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise ValueError(f'--tta needs {" and ".join(missing)} in the config')
    cfg.model = dict(cfg.tta_model, module=cfg.model)
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:  # wrappers such as ConcatDataset or RepeatDataset
        dataset = dataset['dataset']
    if 'batch_shapes_cfg' in dataset:  # fixed batch shapes do not fit the augmented images
        dataset.batch_shapes_cfg = None
    dataset.pipeline = cfg.tta_pipeline
    return cfg
