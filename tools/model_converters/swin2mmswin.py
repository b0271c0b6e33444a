"""Convert a Swin checkpoint (official, detection/segmentation, mmdet/mmseg, mmpretrain, timm) to
mmswin's format, which loads with ``convert_weights=False`` and gives the same outputs.

    python tools/model_converters/swin2mmswin.py SRC DST [--verify]

DST is written atomically, and with --verify only once the check passed.
"""
import argparse
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # a clone

import torch  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from mmswin.checkpoint import CheckpointError, load_pretrained  # noqa: E402
from mmswin.checkpoint.convert import convert_checkpoint, save_atomic  # noqa: E402
from mmswin.models import SwinTransformer, SwinTransformerV2  # noqa: E402


class VerificationError(Exception):
    """``--verify`` found different outputs, or could not compare them."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the mmswin checkpoint')
    parser.add_argument('--prefix', default=None,
                        help="key prefix of the backbone in SRC (default: 'backbone.' when present)")
    parser.add_argument('--unsafe-load', action='store_true',
                        help='allow SRC to run pickled code when read (only for files you trust)')
    parser.add_argument('--verify', action='store_true',
                        help='reload DST and compare a forward pass with SRC loaded directly; '
                             'DST is written only if they agree')
    return parser.parse_args(argv)


def check_src(src: str) -> Optional[str]:
    """Why SRC cannot be read, or None (URLs and s3:// / petrel:// files are checked when read)."""
    if '://' in src:
        return None
    path = os.path.expanduser(src)
    if not os.path.exists(path):
        return f'SRC {src}: no such file'
    if not os.path.isfile(path):
        return f'SRC {src} is not a file (a directory?); give the checkpoint file'
    return None


def check_dst(dst: str, src: str) -> Optional[str]:
    """Why DST cannot be written, or None. Folders missing on the way to DST are created later."""
    if not dst:
        return 'DST is empty; give the path of the file to write'
    if dst.endswith(('/', os.sep)) or os.path.isdir(dst):
        return f'DST {dst} is a directory; give the path of the file to write'
    if os.path.lexists(dst) and not os.path.isfile(dst):
        return f'DST {dst} exists and is not a regular file; refusing to replace it'
    if os.path.isfile(dst) and '://' not in src and \
            os.path.samefile(os.path.expanduser(src), dst):
        return f'DST {dst} is the input file; refusing to overwrite it'
    ancestor = os.path.dirname(os.path.abspath(dst))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f'DST {dst} cannot be written: {ancestor} is not a directory'
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f'DST {dst} cannot be written: no permission to write in {ancestor}'
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """mmengine's current logger at WARNING within: the loads of ``--verify`` repeat what the conversion
    reports, and DST is read from its staged name."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def verify(src: str, dst: str, meta: dict, prefix: Optional[str], unsafe_load: bool) -> float:
    """Max abs difference of the outputs of the model loaded from SRC and from DST (logging warnings only)."""
    cls = SwinTransformerV2 if meta['swin_version'] == 2 else SwinTransformer
    arch = dict(meta['arch'], drop_path_rate=0.0)
    arch.setdefault('out_indices', list(range(len(arch['depths']))))
    models = []
    for path, kwargs in ((src, dict(prefix=prefix, unsafe_load=unsafe_load)), (dst, {})):
        model = cls(**arch).eval()
        with _quiet():
            load_pretrained(model, path, **kwargs)
        models.append(model)
    x = torch.randn(1, arch['in_channels'], 97, 131, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [m(x) for m in models]
    return max(float((a - b).abs().max()) for a, b in zip(*outs, strict=True))


def _fail(message: str, code: int = 2) -> int:
    print(f'error: {message}', file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the converter; returns the exit status (2: bad arguments or input, 1: verification failed)."""
    args = parse_args(argv)
    problem = check_src(args.src) or check_dst(args.dst, args.src)
    if problem:
        return _fail(problem)
    try:
        ckpt = convert_checkpoint(args.src, prefix=args.prefix, unsafe_load=args.unsafe_load)
    except FileNotFoundError as error:
        return _fail(f'SRC {args.src}: {error}')
    except (CheckpointError, ImportError) as error:  # ImportError: a storage backend's client is missing
        return _fail(str(error))
    meta = ckpt['meta']

    def check(tmp: str) -> None:
        try:
            diff = verify(args.src, tmp, meta, args.prefix, args.unsafe_load)
        except Exception as error:  # noqa: BLE001 - reported, and DST is not written
            raise VerificationError(f'could not verify the converted checkpoint: {type(error).__name__}: '
                                    f'{str(error).replace(tmp, args.dst)}') from error
        print(f'verify: max abs difference of the outputs {diff:.3g}')
        if diff != 0.0:
            raise VerificationError(f'the converted checkpoint gives different outputs (max abs difference '
                                    f'{diff:.3g})')

    existed = os.path.exists(args.dst)
    try:
        save_atomic(ckpt, args.dst, check=check if args.verify else None)
    except VerificationError as error:
        return _fail(f'{error}; DST {args.dst} {"left as it was" if existed else "not written"}', code=1)
    except OSError as error:
        return _fail(f'DST {args.dst} cannot be written: {error.strerror or error}')
    print(f'{args.src}: {meta["source_format_description"]}, Swin V{meta["swin_version"]}, '
          f'{len(ckpt["state_dict"])} tensors -> {args.dst}')
    if meta['ignored_keys']:
        print(f'left out (not backbone weights): {len(meta["ignored_keys"])} keys')
    return 0


if __name__ == '__main__':
    sys.exit(main())
