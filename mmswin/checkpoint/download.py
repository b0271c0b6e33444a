"""Downloading checkpoints into torch hub's cache, and reading them from mmengine's storage backends and
pavi; shared by mmswin's loader and mmengine's URL and storage schemes."""
import os
import os.path as osp
import re
import secrets
import tempfile
import urllib.request
import zipfile
from typing import Optional
from urllib.parse import urlparse

import torch

URL_PREFIXES = ('http://', 'https://')
STORE_SCHEMES = (r'(\S+\:)?s3://', r'(\S+\:)?petrel://')  # mmengine's patterns, a cluster name allowed


def is_store_uri(filename: str) -> bool:
    """Whether ``filename`` is an ``s3://`` or ``petrel://`` URI (``cluster:s3://...`` too)."""
    return any(re.match(pattern, filename) for pattern in STORE_SCHEMES)


def read_store(filename: str, backend: str = 'petrel') -> bytes:
    """The contents of an ``s3://`` or ``petrel://`` file, read through mmengine's storage backend."""
    from mmengine.fileio import get_file_backend
    try:
        store = get_file_backend(filename, backend_args={'backend': backend})
    except ImportError as error:  # petrel_client is not installed
        raise ImportError(f'{filename}: {error}') from error
    return bytes(store.get(filename))


def read_pavi(filename: str) -> bytes:
    """The contents of a ``pavi://`` model, downloaded from pavi's model cloud into a temporary folder."""
    try:
        from pavi import modelcloud
    except ImportError:
        raise ImportError(f'{filename}: loading from pavi:// needs the pavi package') from None
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, model.name)
        model.download(path)
        with open(path, 'rb') as file:
            return file.read()


def cached_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where :func:`download` keeps ``url``: ``<torch hub dir>/checkpoints/<file name of the URL's path>``,
    as ``torch.hub.load_state_dict_from_url`` (and so mmengine) keeps it."""
    model_dir = model_dir if model_dir is not None else osp.join(torch.hub.get_dir(), 'checkpoints')
    name = osp.basename(urlparse(url).path)
    if not name:
        raise ValueError(f'{url} names no file to download')
    return osp.join(model_dir, name)


class IncompleteDownload(OSError):
    """The connection closed before the server's ``Content-Length`` arrived; nothing was cached."""


def fetch(url: str, path: str, progress: bool = True) -> None:
    """Downloads ``url`` to ``path`` through a temporary file beside it, renamed over ``path`` only once
    the ``Content-Length`` the server announced has arrived (torch hub's downloader keeps a download the
    connection cut short, and later loads would read it from the cache)."""
    tmp = f'{path}.{secrets.token_hex(8)}.partial'
    request = urllib.request.Request(url, headers={'User-Agent': 'mmswin'})
    try:
        with urllib.request.urlopen(request) as response, open(tmp, 'xb') as file:
            length = response.headers.get('Content-Length')
            expected = int(length) if length is not None and length.isdigit() else None
            received = 0
            with _progress_bar(expected, progress) as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise IncompleteDownload(f'{url}: the download stopped after {received} of the {expected} bytes the '
                                     'server announced (connection lost?); nothing was cached, try again')
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.unlink(tmp)


class _NoBar:
    def __enter__(self) -> '_NoBar':
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _progress_bar(total: Optional[int], progress: bool):
    """A tqdm bar in bytes on stderr, as torch hub shows (none without tqdm or with ``progress=False``)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, disable=not progress, unit='B', unit_scale=True, unit_divisor=1024)


def download(url: str, model_dir: Optional[str] = None, progress: bool = True) -> str:
    """Downloads ``url`` once (whole, see :func:`fetch`) into torch hub's cache and returns the local file.

    A file that is a zip archive of one member, the format of torch < 1.6 model zoos, is extracted
    beside it (once) and the member's path returned, as torch's own URL loader does; into
    ``<file>.unzipped/`` where the member has the archive's own name.
    """
    path = cached_path(url, model_dir)
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not osp.exists(path):
        fetch(url, path, progress=progress)
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) != 1 or members[0].is_dir():
            return path  # torch's own format (a zip of many entries), or not a legacy archive
        folder = osp.dirname(path)
        if osp.basename(members[0].filename) == osp.basename(path):
            folder = f'{path}.unzipped'
        target = osp.join(folder, osp.basename(members[0].filename))
        if not osp.isfile(target):
            members[0].filename = osp.basename(members[0].filename)  # no folders of the archive's choosing
            archive.extract(members[0], folder)
        return target
