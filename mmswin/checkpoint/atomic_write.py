"""Atomic local writes for mmengine, so that a checkpoint being written when a run dies never replaces
the previous good one.

mmengine 0.10.7 saves checkpoints (and the ``last_checkpoint`` pointer) with ``LocalBackend.put`` /
``put_text``, which open the target with ``'wb'``: the old file is truncated at once and a killed run
leaves it half written. :func:`install` (run by ``import mmswin``) makes both write a temporary file
in the same folder, flush it to disk and rename it over the target.
"""
import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import Union

from mmengine.fileio.backends.local_backend import LocalBackend


def write_atomic(data: bytes, filepath: Union[str, Path]) -> None:
    """Writes ``data`` to ``filepath`` through a temporary file and ``os.replace``."""
    filepath = str(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(filepath)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def _put(self: LocalBackend, obj: bytes, filepath: Union[str, Path]) -> None:
    write_atomic(obj, filepath)


def _put_text(self: LocalBackend, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
    write_atomic(obj.encode(encoding), filepath)


def install() -> None:
    """Makes mmengine's local file writes atomic (idempotent)."""
    LocalBackend.put = _put
    LocalBackend.put_text = _put_text
