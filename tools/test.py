"""Test (evaluate) a trained detector or segmentor with an mmswin config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out FILE] [--cfg-options ...]

Prints the config's metrics (COCO box/mask AP, mIoU); mmdet's and mmseg's own ``tools/test.py`` run the
same configs unchanged.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a clone without install

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmswin.runner import (add_run_arguments, default_scope_of, enable_visualization,  # noqa: E402
                           parse_run_arguments, prepare_config)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a model with an mmswin config')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go')
    parser.add_argument('--out', help='dump raw predictions: a .pkl file (mmdet) or a folder (mmseg)')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions there (under the work dir)')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per picture with --show')
    add_run_arguments(parser)
    return parse_run_arguments(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = prepare_config(Config.fromfile(args.config), config_path=args.config, work_dir=args.work_dir,
                         launcher=args.launcher, cfg_options=args.cfg_options)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show_dir, args.show, args.wait_time)
    if args.out:
        if default_scope_of(cfg) == 'mmseg':
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        else:
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = evaluators + [dict(type='DumpDetResults', out_file_path=args.out)]
    return Runner.from_cfg(cfg).test()


if __name__ == '__main__':
    main()
