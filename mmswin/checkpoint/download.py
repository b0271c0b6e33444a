"""Downloading checkpoints into torch hub's cache, shared by mmswin's loader and mmengine's URL schemes."""
import os
import os.path as osp
import zipfile
from typing import Optional
from urllib.parse import urlparse

import torch

URL_PREFIXES = ('http://', 'https://')


def cached_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where :func:`download` keeps ``url``: ``<torch hub dir>/checkpoints/<file name of the URL's path>``,
    as ``torch.hub.load_state_dict_from_url`` (and so mmengine) keeps it."""
    model_dir = model_dir if model_dir is not None else osp.join(torch.hub.get_dir(), 'checkpoints')
    name = osp.basename(urlparse(url).path)
    if not name:
        raise ValueError(f'{url} names no file to download')
    return osp.join(model_dir, name)


def download(url: str, model_dir: Optional[str] = None, progress: bool = True) -> str:
    """Downloads ``url`` once (torch writes a temporary file and renames it) and returns the local file.

    A file that is a zip archive of one member, the format of torch < 1.6 model zoos, is extracted
    beside it (once) and the member's path returned, as torch's own URL loader does; into
    ``<file>.unzipped/`` where the member has the archive's own name.
    """
    path = cached_path(url, model_dir)
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not osp.exists(path):
        torch.hub.download_url_to_file(url, path, progress=progress)
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
