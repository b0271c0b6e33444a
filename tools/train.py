"""Train a detector or segmentor with an mmswin config (a thin wrapper over mmengine's Runner).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]

mmdet's and mmseg's own ``tools/train.py`` run the same configs unchanged.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a clone without install

from mmengine.config import Config  # noqa: E402

from mmswin.runner import add_run_arguments, build_runner, parse_run_arguments, prepare_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model with an mmswin config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default work_dirs/CONFIG_NAME)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from CKPT, or from the latest checkpoint in the work dir if no CKPT')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr with the batch size')
    add_run_arguments(parser)
    return parse_run_arguments(parser, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    try:
        cfg = prepare_config(cfg, config_path=args.config, work_dir=args.work_dir, launcher=args.launcher,
                             cfg_options=args.cfg_options, amp=args.amp, auto_scale_lr=args.auto_scale_lr,
                             resume=args.resume)
    except ValueError as error:  # an option the config cannot take, such as --auto-scale-lr
        print(f'train.py: error: {error}', file=sys.stderr)
        sys.exit(2)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
