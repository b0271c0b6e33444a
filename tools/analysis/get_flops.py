"""Parameters and FLOPs of an mmswin backbone or of a whole model from a config.

    python tools/analysis/get_flops.py SwinTransformer --arch tiny --shape 224 224
    python tools/analysis/get_flops.py SwinTransformerV2 --arch base --window-size 8 --shape 256 256
    python tools/analysis/get_flops.py configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --shape 800 1216
    python tools/analysis/get_flops.py CONFIG --backbone-only

FLOPs count one multiply-add as one, as the Swin papers' tables do (Swin-T at 224x224: 4.5G).
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from mmswin.analysis import count_flops, count_parameters  # noqa: E402
from mmswin.models import SwinTransformer, SwinTransformerV2  # noqa: E402

BACKBONES = {'SwinTransformer': SwinTransformer, 'SwinTransformerV2': SwinTransformerV2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('target', help='a config file, or SwinTransformer / SwinTransformerV2')
    parser.add_argument('--shape', type=int, nargs=2, default=None, metavar=('H', 'W'),
                        help='input size (default 224 224 for V1, 256 256 for V2 backbones, 800 1216 for '
                             'detection configs, 512 512 for segmentation configs)')
    parser.add_argument('--arch', default='tiny', help='backbone preset (with a backbone name)')
    parser.add_argument('--window-size', type=int, default=None, help='backbone window (with a backbone name)')
    parser.add_argument('--backbone-only', action='store_true', help='count only the backbone of a config')
    parser.add_argument('--json', action='store_true', help='print a JSON line instead of a table')
    return parser.parse_args(argv)


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
