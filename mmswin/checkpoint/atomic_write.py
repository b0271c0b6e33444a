"""Atomic local writes for mmengine, so that a checkpoint being written when a run dies never replaces
the previous good one.

mmengine 0.10.7 saves checkpoints (and ``mmengine.dump`` its outputs) with ``LocalBackend.put`` /
``put_text``, which open the target with ``'wb'``: the old file is truncated at once and a killed run
leaves it half written. :func:`install` (run by ``import mmswin``) makes both write a temporary file
in the same folder, flush it to disk and rename it over the target. The file gets the permissions a
plain ``open()`` would give it: those of the file it replaces, else ``0o666`` less the umask.

Not covered: ``CheckpointHook`` writes the ``last_checkpoint`` pointer with a plain ``open(..., 'w')``,
not through ``LocalBackend``, so that small file is not written atomically.
"""
import os
import os.path as osp
import secrets
import stat
from pathlib import Path
from typing import Optional, Tuple, Union

from mmengine.fileio.backends.local_backend import LocalBackend


def _create_temporary(folder: str, name: str, mode: int) -> Tuple[int, str]:
    """Creates a new file ``.<name>.<random>.tmp`` in ``folder`` with ``mode`` less the umask (``0o666``
    gives what ``open()`` gives; ``tempfile.mkstemp`` always gives ``0o600``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0) | getattr(os, 'O_NOFOLLOW', 0)
    for _ in range(100):
        tmp = osp.join(folder, f'.{name}.{secrets.token_hex(6)}.tmp')
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f'no free temporary file name for {osp.join(folder, name)}')


def _existing_mode(filepath: str) -> Optional[int]:
    """Permission bits of the file ``filepath`` names, or None if there is none."""
    try:
        return stat.S_IMODE(os.stat(filepath).st_mode)
    except FileNotFoundError:
        return None


def write_atomic(data: bytes, filepath: Union[str, Path]) -> None:
    """Writes ``data`` to ``filepath`` through a temporary file and ``os.replace``, keeping the mode of
    a file it replaces (a new one gets ``0o666`` less the umask). A symbolic link is written through, as
    ``open()`` writes through it: the file it points at is replaced, the link kept."""
    filepath = osp.realpath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    mode = _existing_mode(filepath)
    # Replacing a file: private until it has that file's mode, so never more open than the old one.
    fd, tmp = _create_temporary(folder, osp.basename(filepath), 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
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
