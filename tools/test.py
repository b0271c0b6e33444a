"""Test (evaluate) a trained detector or segmentor with an mmswin config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out FILE] [--tta] [--cfg-options ...]

Prints the config's metrics (COCO box/mask AP, mIoU); mmdet's and mmseg's own ``tools/test.py`` run the
same configs unchanged.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a clone without install

from mmengine.config import Config  # noqa: E402

from mmswin.runner import (add_run_arguments, build_runner, default_scope_of, enable_test_time_augmentation,  # noqa
                           enable_visualization, parse_run_arguments, prepare_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Test a model with an mmswin config')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help="checkpoint file, URL or another of mmengine's schemes")
    parser.add_argument('--work-dir', help='where logs and metrics go')
    parser.add_argument('--out', help='dump raw predictions: a .pkl file (mmdet) or a folder (mmseg)')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions there (mmdet: under the work dir; '
                                           'mmseg: as given)')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per picture with --show')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation (the config's tta_model and "
                                                           'tta_pipeline)')
    add_run_arguments(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_run_arguments(build_parser(), argv)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse_run_arguments(parser, argv)
    remote = '://' in args.checkpoint  # a URL or another of mmengine's schemes (open-mmlab://, s3://, ...)
    if not remote and not osp.isfile(osp.expanduser(args.checkpoint)):
        parser.error(f'checkpoint {args.checkpoint}: ' + (
            'a directory, not a checkpoint file' if osp.isdir(args.checkpoint) else 'no such file'))
    cfg = prepare_config(Config.fromfile(args.config), config_path=args.config, work_dir=args.work_dir,
                         launcher=args.launcher, cfg_options=args.cfg_options)
    detection = default_scope_of(cfg) != 'mmseg'
    if args.out and detection and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out {args.out}: detection predictions are dumped to a .pkl or .pickle file')
    cfg.load_from = args.checkpoint
    try:
        if args.show or args.show_dir:
            enable_visualization(cfg, args.show_dir, args.show, args.wait_time)
        if args.tta:
            enable_test_time_augmentation(cfg)
    except ValueError as error:
        parser.error(str(error))
    if args.out:
        if not detection:
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        else:
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = evaluators + [dict(type='DumpDetResults', out_file_path=args.out)]
    return build_runner(cfg).test()


if __name__ == '__main__':
    main()
