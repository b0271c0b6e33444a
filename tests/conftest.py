"""Shared fixtures: the golden official checkpoints/outputs and small model settings."""
import json
from pathlib import Path

import pytest
import torch

import mmswin  # noqa: F401  (registers models, installs safe checkpoint loading)

DATA = Path(__file__).parent / 'data'
# The threads of every test: which of the kernels' paths a model takes depends on the thread count (whole
# chunks go to each thread only where there are at least two per thread), and so do the bounds measured on
# them. Tests of other counts set their own and put this one back.
TEST_THREADS = 2
# The architecture of the golden random-weight models (see tests/data/index.json and the README there).
SMALL = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


def position_bias_parameters(model: torch.nn.Module) -> list:
    return [p for n, p in model.named_parameters()
            if 'relative_position_bias_table' in n or 'cpb_mlp' in n]


def with_visible_bias(model: torch.nn.Module) -> torch.nn.Module:
    """V2 starts with zero res-post-norm weights (each block adds exactly zero, as in the official init): give
    all norms weights and the position bias a spread, so that the blocks' outputs and gradients are seen."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                p.normal_(1.0, 0.1)
        for p in position_bias_parameters(model):
            p.normal_(0.0, 0.5)
    return model


class CodePayload:
    """Pickles as a call to ``os.system`` touching ``marker``: what a malicious checkpoint looks like.
    The marker file exists afterwards only if the loader ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def golden_input(case: dict) -> torch.Tensor:
    return case['x_i8'].float() / 32


@pytest.fixture(scope='session')
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope='session')
def golden_index() -> dict:
    return json.loads((DATA / 'index.json').read_text())


@pytest.fixture(scope='session')
def v1_expected() -> dict:
    return torch.load(DATA / 'v1_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def v2_expected() -> dict:
    return torch.load(DATA / 'v2_expected.pt', weights_only=True)


@pytest.fixture(scope='session')
def v1_official_sd() -> dict:
    return torch.load(DATA / 'v1_official_cls.pth', weights_only=True)['model']


@pytest.fixture(scope='session')
def v2_official_sd() -> dict:
    return torch.load(DATA / 'v2_official_cls.pth', weights_only=True)['model']


@pytest.fixture
def store(monkeypatch):
    """mmengine's ``petrel`` storage backend (``s3://``, ``petrel://``) replaced by a dict of contents,
    filled by the test: ``{uri: bytes}``."""
    from mmengine.fileio.backends import BaseStorageBackend, registry_utils

    files = {}

    class DictStore(BaseStorageBackend):
        def __init__(self, **kwargs):
            pass

        def get(self, filepath):
            return memoryview(files[filepath])  # petrel's client returns a memoryview

        def get_text(self, filepath, encoding='utf-8'):
            return files[filepath].decode(encoding)

    monkeypatch.setitem(registry_utils.backends, 'petrel', DictStore)
    return files


def pytest_configure(config) -> None:
    torch.set_num_threads(TEST_THREADS)
