"""Converting a checkpoint file of any supported format into mmswin's own format."""
import io
import os
from typing import Optional

import torch

from ..version import __version__
from .atomic_write import write_atomic
from .formats import FORMATS, convert_state_dict, infer_arch, unwrap_checkpoint
from .loading import CheckpointError, read_checkpoint


def convert_checkpoint(src: str, prefix: Optional[str] = None, unsafe_load: bool = False) -> dict:
    """Reads ``src`` and returns ``{'state_dict': ..., 'meta': ...}`` in mmswin names.

    ``meta`` records the source file and format, the Swin version and the architecture inferred from
    the weights (``meta['arch']``), so the result can be checked or rebuilt without the source.
    """
    obj = read_checkpoint(src, unsafe_load=unsafe_load)
    try:
        sd, meta = unwrap_checkpoint(obj)
        converted = convert_state_dict(sd, meta, prefix=prefix)
        arch = infer_arch(converted.state_dict, converted.version)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f'{src}: {error}') from error
    return dict(state_dict=converted.state_dict,
                meta=dict(mmswin_version=__version__, swin_version=converted.version,
                          source=os.path.basename(src), source_format=converted.source_format,
                          source_format_description=FORMATS[converted.source_format], arch=arch,
                          ignored_keys=converted.ignored))


def save_atomic(obj: dict, dst: str) -> None:
    """``torch.save`` through a temporary file beside ``dst`` and a rename: ``dst`` is never half
    written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(buffer.getvalue(), dst)
