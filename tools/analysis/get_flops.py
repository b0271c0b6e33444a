"""Parameters and FLOPs of an mmswin backbone or of a whole model from a config.

    python tools/analysis/get_flops.py SwinTransformer --arch tiny --shape 224
    python tools/analysis/get_flops.py SwinTransformerV2 --arch base --window-size 8 --shape 256 256
    python tools/analysis/get_flops.py configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --shape 800 1216
    python tools/analysis/get_flops.py CONFIG --backbone-only --cfg-options model.backbone.window_size=12

FLOPs count one multiply-add as one, as the Swin papers' tables do (Swin-T at 224x224: 4.5G).
"""
import argparse
import difflib
import json
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmswin.analysis import count_flops, count_parameters  # noqa: E402
from mmswin.models import ARCH_ALIASES, ARCH_ZOO, SwinTransformer, SwinTransformerV2  # noqa: E402

BACKBONES = {'SwinTransformer': SwinTransformer, 'SwinTransformerV2': SwinTransformerV2}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses and checks the command line; misuse exits through ``parser.error`` (status 2)."""
    usage = ('%(prog)s TARGET [--shape H [W]] [--arch ARCH] [--window-size N] [--cfg-options KEY=VALUE ...] '
             '[--backbone-only] [--json]')
    parser = argparse.ArgumentParser(description=__doc__, usage=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # optional for argparse only: a --shape of one or two values takes what follows it, the target too
    parser.add_argument('target', nargs='?', metavar='TARGET',
                        help=f'a config file, or a backbone name: {" / ".join(BACKBONES)}')
    parser.add_argument('--shape', nargs='+', default=None, metavar='SIZE',
                        help='input size, H W or one value for both sides (default 224 224 for V1, 256 256 for '
                             'V2 backbones, 800 1216 for detection configs, 512 512 for segmentation configs)')
    parser.add_argument('--arch', default=None,
                        help='backbone preset, with a backbone name only (default tiny)')
    parser.add_argument('--window-size', type=int, default=None, metavar='N',
                        help='backbone window, with a backbone name only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None, metavar='KEY=VALUE',
                        help='override config entries (a config only), e.g. model.backbone.window_size=8')
    parser.add_argument('--backbone-only', action='store_true', help='count only the backbone of a config')
    parser.add_argument('--json', action='store_true', help='print a JSON line instead of a table')
    args = parser.parse_args(argv)
    if args.target is None and args.shape and not args.shape[-1].isdecimal():
        args.target = args.shape.pop()  # --shape H W TARGET
    if args.target is None:
        parser.error('the following arguments are required: TARGET')
    if args.shape is not None:
        if len(args.shape) > 2:
            parser.error(f'--shape takes one or two values (H W), got {" ".join(args.shape)}')
        if not all(value.isdecimal() and int(value) > 0 for value in args.shape):
            parser.error(f'--shape takes positive integers, got {" ".join(args.shape)}')
        args.shape = (int(args.shape[0]), int(args.shape[-1]))  # one value: a square
    if args.target in BACKBONES:
        if args.cfg_options is not None:
            parser.error(f'--cfg-options applies to a config file, not to the backbone name {args.target}')
        if args.arch is None:
            args.arch = 'tiny'
        presets = sorted(ARCH_ZOO) + sorted(ARCH_ALIASES)
        if args.arch.lower() not in presets:
            parser.error(f'--arch must be one of {", ".join(presets)}, got {args.arch!r}')
    elif osp.isfile(args.target):
        given = [flag for flag, value in (('--arch', args.arch), ('--window-size', args.window_size))
                 if value is not None]
        if given:
            parser.error(f'{" and ".join(given)} {"apply" if len(given) > 1 else "applies"} to a backbone '
                         f'name only, not to a config file; '
                         f'use --cfg-options model.backbone.KEY=VALUE to change the config\'s backbone')
    else:
        close = difflib.get_close_matches(args.target, BACKBONES, n=1)
        hint = f' (did you mean {close[0]}?)' if close else ''
        parser.error(f'target {args.target!r} is neither a backbone name ({", ".join(BACKBONES)}) nor an '
                     f'existing config file path{hint}')
    return args


def _whole_model_forward(model, scope: str, inputs: torch.Tensor):
    """A module whose forward runs the detector/segmentor on ``inputs`` the way its test step does."""
    if scope == 'mmseg':
        return lambda x: model(x, mode='tensor')
    from mmdet.structures import DetDataSample
    h, w = inputs.shape[-2:]
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                         batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
    return lambda x: model._forward(x, [sample])


class _Wrapper(torch.nn.Module):

    def __init__(self, model, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def build(args: argparse.Namespace):
    """Returns ``(module, input, description)``."""
    if args.target in BACKBONES:
        kwargs = dict(arch=args.arch)
        if args.window_size is not None:
            kwargs['window_size'] = args.window_size
        model = BACKBONES[args.target](**kwargs)
        shape = args.shape or ((256, 256) if args.target == 'SwinTransformerV2' else (224, 224))
        return model, torch.zeros(1, 3, *shape), f'{args.target} ({args.arch})'
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmswin.runner import default_scope_of
    cfg = Config.fromfile(args.target)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    scope = default_scope_of(cfg)
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    shape = args.shape or ((512, 512) if scope == 'mmseg' else (800, 1216))
    x = torch.zeros(1, 3, *shape)
    model = MODELS.build(cfg.model)
    if args.backbone_only:
        return model.backbone, x, f'backbone of {osp.basename(args.target)}'
    return _Wrapper(model, _whole_model_forward(model, scope, x)), x, osp.basename(args.target)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, x, name = build(args)
    model.eval()
    with torch.no_grad():
        flops = count_flops(model, (x,))
    result = dict(model=name, input_shape=list(x.shape), params=count_parameters(model), flops=flops)
    if args.json:
        print(json.dumps(result))
    else:
        print(f'model:  {name}\ninput:  {tuple(x.shape)}\nparams: {result["params"] / 1e6:.2f} M\n'
              f'flops:  {flops / 1e9:.2f} G (multiply-adds)')
    return result


if __name__ == '__main__':
    main()
