"""Converting a checkpoint file of any supported format into mmswin's own format."""
import io
import os
import os.path as osp
import re
import secrets
import stat
from http.client import HTTPException
from typing import Callable, Dict, List, Mapping, Optional
from urllib.error import HTTPError

import torch

from ..version import __version__
from .atomic_write import write_atomic
from .formats import FORMATS, convert_state_dict, infer_arch, unwrap_checkpoint
from .loading import URL_PREFIXES, CheckpointError, read_checkpoint

_BLOCK_KEY = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.(.+)$')
_DOWNSAMPLE_KEY = re.compile(r'^layers\.(\d+)\.downsample\.(.+)$')


def _read(src: str, unsafe_load: bool) -> object:
    """:func:`read_checkpoint`, with a failed download reported as a :class:`CheckpointError` naming the URL."""
    try:
        return read_checkpoint(src, unsafe_load=unsafe_load)
    except CheckpointError:
        raise
    except (OSError, HTTPException, ValueError) as error:
        if not src.startswith(URL_PREFIXES):
            raise
        reason = error if isinstance(error, HTTPError) else getattr(error, 'reason', None) or error
        raise CheckpointError(f'could not download {src}: {reason}') from error


def _missing_body_key(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A backbone key that a converted (mmswin-named) state dict should have and lacks, or None.

    Every block of a Swin has the same parameter names, and so has the patch merging of every stage
    but the last, so a key that some of them have and another lacks is missing.
    """
    if 'patch_embed.proj.weight' not in sd:
        return 'patch_embed.proj.weight'
    blocks: Dict[tuple, set] = {}
    merges: Dict[int, set] = {}
    for key in sd:
        block, merge = _BLOCK_KEY.match(key), _DOWNSAMPLE_KEY.match(key)
        if block:
            blocks.setdefault((int(block.group(1)), int(block.group(2))), set()).add(block.group(3))
        elif merge:
            merges.setdefault(int(merge.group(1)), set()).add(merge.group(2))
    if not blocks:
        return 'layers.0.blocks.0.*'
    num_stages = max(stage for stage, _ in blocks) + 1
    block_names = set().union(*blocks.values())
    for stage in range(num_stages):
        depth = max((j for i, j in blocks if i == stage), default=-1) + 1
        if depth == 0:
            return f'layers.{stage}.blocks.0.*'
        for j in range(depth):
            lacking = sorted(block_names - blocks.get((stage, j), set()))
            if lacking:
                return f'layers.{stage}.blocks.{j}.{lacking[0]}'
    if any(stage >= num_stages - 1 for stage in merges):  # a merge feeds a stage that is not there
        return f'layers.{max(merges) + 1}.blocks.0.*'
    merge_names = set().union(*merges.values()) if merges else set()
    for stage in range(num_stages - 1):
        lacking = sorted(merge_names - merges.get(stage, set())) if merge_names else ['reduction.weight']
        if lacking:
            return f'layers.{stage}.downsample.{lacking[0]}'
    return None


def convert_checkpoint(src: str, prefix: Optional[str] = None, unsafe_load: bool = False) -> dict:
    """Reads ``src`` and returns ``{'state_dict': ..., 'meta': ...}`` in mmswin names.

    ``meta`` records the source file and format, the Swin version and the architecture inferred from
    the weights (``meta['arch']``, with ``out_indices`` covering every stage), so the result can be
    checked or rebuilt without the source.

    Raises:
        FileNotFoundError: ``src`` is a path to no file.
        CheckpointError: ``src`` cannot be read or downloaded, is not a Swin, ``prefix`` matches no key,
            or the Swin weights look incomplete; the message names ``src``.
    """
    obj = _read(src, unsafe_load)
    try:
        sd, meta = unwrap_checkpoint(obj)
        converted = convert_state_dict(sd, meta, prefix=prefix)
    except CheckpointError:
        raise
    except (ValueError, KeyError) as error:
        raise CheckpointError(f'{src}: {error}') from error
    described = f'{src} ({converted.source_format} format, Swin V{converted.version})'
    missing = _missing_body_key(converted.state_dict)
    try:
        arch = None if missing else infer_arch(converted.state_dict, converted.version)
    except KeyError as error:
        missing = str(error.args[0]) if error.args else str(error)
    except (IndexError, ValueError, RuntimeError) as error:  # tensors of unexpected shapes
        raise CheckpointError(f'{described}: cannot infer the architecture from the weights: {error}') from error
    if missing is not None:
        renamed = ' (named as in mmswin)' if converted.source_format in ('openmmlab', 'timm') else ''
        raise CheckpointError(f'{described} looks incomplete: the backbone key {missing}{renamed} is missing '
                              f'({len(converted.state_dict)} backbone tensors found)')
    arch['out_indices'] = list(range(len(arch['depths'])))
    return dict(state_dict=converted.state_dict,
                meta=dict(mmswin_version=__version__, swin_version=converted.version,
                          source=os.path.basename(src), source_format=converted.source_format,
                          source_format_description=FORMATS[converted.source_format], arch=arch,
                          ignored_keys=converted.ignored))


def _missing_folders(folder: str) -> List[str]:
    """``folder`` and those of its ancestors that do not exist yet, outermost first."""
    missing = []
    while not osp.exists(folder) and osp.dirname(folder) != folder:
        missing.insert(0, folder)
        folder = osp.dirname(folder)
    return missing


def save_atomic(obj: dict, dst: str, check: Optional[Callable[[str], None]] = None) -> None:
    """``torch.save`` through a temporary file beside ``dst`` and a rename: ``dst`` is never half
    written, and gets the permissions :func:`write_atomic` gives.

    ``check``, when given, is called with the path of the complete file before it replaces ``dst``; if it
    raises, that file (and any folder made for ``dst``) is removed again and ``dst`` is left as it was.
    Folders made for ``dst`` are removed as well when the write fails. A ``dst`` that is a symbolic link
    stays one: the file it points to is replaced.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    dst = osp.realpath(dst)
    folder = osp.dirname(dst)
    made = _missing_folders(folder)
    staged = None
    try:
        if check is None:
            write_atomic(buffer.getvalue(), dst)
            return
        os.makedirs(folder, exist_ok=True)
        mode = stat.S_IMODE(os.stat(dst).st_mode) if osp.isfile(dst) else None
        # Created private when it is to replace a file, so it is never more open than that file; write_atomic
        # keeps the mode of the file it replaces.
        staged = osp.join(folder, f'.{osp.basename(dst)}.{secrets.token_hex(6)}.unverified')
        os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600))
        write_atomic(buffer.getvalue(), staged)
        check(staged)
        if mode is not None:
            os.chmod(staged, mode)
        os.replace(staged, dst)
    except BaseException:
        if staged is not None and osp.lexists(staged):
            os.unlink(staged)
        for path in reversed(made):
            try:
                os.rmdir(path)
            except OSError:
                break
        raise
