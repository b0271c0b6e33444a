"""mmengine training checkpoints load under torch's weights_only default without unsafe unpickling."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import CheckpointLoader

from mmswin.checkpoint import RestrictedUnpicklingError, restricted_load, safe_load
from mmswin.checkpoint import safe_unpickle


def _training_checkpoint() -> dict:
    """What mmengine's Runner saves: weights, meta, message hub with HistoryBuffers, scheduler state."""
    hub = MessageHub(f'hub-{id(object())}')
    for i in range(3):
        hub.update_scalar('train/loss', 1.0 / (i + 1))
        hub.update_scalar('train/lr', np.float64(1e-4))
    hub.update_info('iter', 3)
    return dict(meta=dict(epoch=1, iter=3, seed=7, mmengine_version='0.10.7', np_seed=np.int64(7)),
                state_dict={'w': torch.randn(3, 3)}, message_hub=hub.state_dict(),
                optimizer={'state': {}, 'param_groups': [{'lr': 1e-4, 'params': [0]}]},
                param_schedulers=[{'milestones': __import__('collections').Counter({8: 1}), 'base_values': [1e-4]}])


def _check(ckpt: dict) -> None:
    assert ckpt['meta']['iter'] == 3
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.mean() == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert buf.statistics('current') == pytest.approx(1 / 3)


def test_new_checkpoints_load_with_torchs_safe_loader(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    torch.save(_training_checkpoint(), path)
    assert 'getattr' not in str(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    _check(torch.load(path, weights_only=True))


def _legacy_file(tmp_path):
    """A checkpoint as mmengine 0.10.7 writes it without mmswin: statistics methods pickled through
    ``builtins.getattr``."""
    path = tmp_path / 'legacy.pth'

    def legacy_getstate(self):
        self.__dict__.update(statistics_methods=self._statistics_methods)
        return self.__dict__

    patched = HistoryBuffer.__getstate__
    HistoryBuffer.__getstate__ = legacy_getstate
    try:
        torch.save(_training_checkpoint(), path)
    finally:
        HistoryBuffer.__getstate__ = patched
    assert 'builtins.getattr' in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return path


def test_legacy_checkpoints_load_through_the_restricted_unpickler(tmp_path):
    path = _legacy_file(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    _check(restricted_load(str(path)))
    _check(safe_load(str(path)))
    # what Runner.resume / load_from use
    _check(CheckpointLoader.load_checkpoint(str(path), map_location='cpu'))


def test_getattr_is_not_allow_listed():
    assert getattr not in torch.serialization.get_safe_globals()
    with pytest.raises(RestrictedUnpicklingError, match='getattr'):
        safe_unpickle._history_buffer_getattr(__import__('os'), 'system')
    with pytest.raises(RestrictedUnpicklingError, match='getattr'):
        safe_unpickle._history_buffer_getattr(HistoryBuffer, '__init__')


class _CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


class _GetattrOnAllowedClass:
    """Looks up an attribute of an allowed class other than a statistics method: a step towards
    calling arbitrary methods, which the restricted ``getattr`` must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return getattr, (HistoryBuffer, 'update')


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / 'pwned'
    for payload, pattern in ((_CallsSystem(marker), 'system'), (_GetattrOnAllowedClass(marker), 'getattr')):
        path = tmp_path / 'evil.pth'
        torch.save({'state_dict': {}, 'x': payload}, path)
        with pytest.raises(RestrictedUnpicklingError, match=pattern):
            restricted_load(str(path))
        with pytest.raises(pickle.UnpicklingError):
            CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert not marker.exists()


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path):
    """What mmengine's CheckpointHook uses to write: a write that fails half way (a killed run) must
    leave the previous checkpoint and no partial file."""
    from mmengine.fileio import get_file_backend

    path = tmp_path / 'iter_100.pth'
    good = {'state_dict': {'w': torch.ones(3)}}
    backend = get_file_backend(str(path))
    import io
    buf = io.BytesIO()
    torch.save(good, buf)
    backend.put(buf.getvalue(), str(path))

    with pytest.raises(TypeError):  # the write fails after the target would have been opened
        backend.put(object(), str(path))
    assert torch.equal(torch.load(path, weights_only=True)['state_dict']['w'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['iter_100.pth']
    backend.put_text(str(path), str(tmp_path / 'last_checkpoint'))
    assert (tmp_path / 'last_checkpoint').read_text() == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter_100.pth', 'last_checkpoint']
