"""Run a trained detector or segmentor on an image and save a picture of its predictions.

    python tools/demo/image_demo.py IMAGE CONFIG CHECKPOINT --out-file result.jpg [--score-thr 0.3]
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import mmcv  # noqa: E402
from mmengine.config import Config  # noqa: E402

import mmswin  # noqa: E402,F401  (registers the backbones, safe checkpoint loading)
from mmswin.runner import default_scope_of  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-file', default='result.jpg', help='where to write the picture')
    parser.add_argument('--device', default='cpu', help="e.g. 'cpu' or 'cuda:0'")
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score threshold')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation overlay opacity')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    image = mmcv.imread(args.image)  # FileNotFoundError naming a missing file
    if image is None:
        raise SystemExit(f'error: {args.image} is not an image OpenCV can read')
    image = mmcv.bgr2rgb(image)
    if default_scope_of(cfg) == 'mmseg':
        from mmseg.apis import inference_model, init_model
        from mmseg.visualization import SegLocalVisualizer
        model = init_model(cfg, args.checkpoint, device=args.device)
        result = inference_model(model, args.image)
        visualizer = SegLocalVisualizer(alpha=args.opacity)
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample('result', image, result, draw_gt=False, out_file=args.out_file)
    else:
        from mmdet.apis import inference_detector, init_detector
        from mmdet.visualization import DetLocalVisualizer
        model = init_detector(cfg, args.checkpoint, device=args.device)
        result = inference_detector(model, args.image)
        visualizer = DetLocalVisualizer()
        visualizer.dataset_meta = model.dataset_meta
        visualizer.add_datasample('result', image, result, draw_gt=False, pred_score_thr=args.score_thr,
                                  out_file=args.out_file)
    print(f'predictions drawn to {args.out_file}')
    return result


if __name__ == '__main__':
    main()
