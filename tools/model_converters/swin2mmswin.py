"""Convert a Swin checkpoint (official, detection/segmentation, mmdet/mmseg, mmpretrain, timm) to
mmswin's format, which loads with ``convert_weights=False`` and gives the same outputs.

    python tools/model_converters/swin2mmswin.py SRC DST [--verify]
"""
import argparse
import os
import sys

import torch

from mmswin.checkpoint import CheckpointError, load_pretrained
from mmswin.checkpoint.convert import convert_checkpoint, save_atomic
from mmswin.models import SwinTransformer, SwinTransformerV2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the mmswin checkpoint')
    parser.add_argument('--prefix', default=None,
                        help="key prefix of the backbone in SRC (default: 'backbone.' when present)")
    parser.add_argument('--unsafe-load', action='store_true',
                        help='allow SRC to run pickled code when read (only for files you trust)')
    parser.add_argument('--verify', action='store_true',
                        help='reload DST and compare a forward pass with SRC loaded directly')
    return parser.parse_args(argv)


def verify(src: str, dst: str, meta: dict, prefix, unsafe_load: bool) -> float:
    """Max abs difference of the outputs of the model loaded from SRC and from DST."""
    cls = SwinTransformerV2 if meta['swin_version'] == 2 else SwinTransformer
    arch = dict(meta['arch'], drop_path_rate=0.0)
    models = []
    for path, kwargs in ((src, dict(prefix=prefix, unsafe_load=unsafe_load)), (dst, {})):
        model = cls(**arch).eval()
        load_pretrained(model, path, **kwargs)
        models.append(model)
    x = torch.randn(1, arch['in_channels'], 97, 131, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [m(x) for m in models]
    return max(float((a - b).abs().max()) for a, b in zip(*outs))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.src.startswith(('http://', 'https://')) and os.path.exists(args.dst) and \
            os.path.samefile(args.src, args.dst):
        print(f'error: DST {args.dst} is the input file; refusing to overwrite it', file=sys.stderr)
        return 2
    try:
        ckpt = convert_checkpoint(args.src, prefix=args.prefix, unsafe_load=args.unsafe_load)
    except (CheckpointError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    save_atomic(ckpt, args.dst)
    meta = ckpt['meta']
    print(f'{args.src}: {meta["source_format_description"]}, Swin V{meta["swin_version"]}, '
          f'{len(ckpt["state_dict"])} tensors -> {args.dst}')
    if meta['ignored_keys']:
        print(f'left out (not backbone weights): {len(meta["ignored_keys"])} keys')
    if args.verify:
        diff = verify(args.src, args.dst, meta, args.prefix, args.unsafe_load)
        print(f'verify: max abs difference of the outputs {diff:.3g}')
        if diff != 0.0:
            print('error: the converted checkpoint gives different outputs', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
