"""mmengine training checkpoints load under torch's weights_only default without unsafe unpickling."""
import collections
import os
import pickle
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

from mmswin.checkpoint import CheckpointError, RestrictedUnpicklingError, read_checkpoint, restricted_load, safe_load
from mmswin.checkpoint import safe_unpickle
from mmswin.models import SwinTransformer

from .conftest import DATA, SMALL


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


def test_new_checkpoints_need_no_getattr_and_load_safely(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    torch.save(_training_checkpoint(), path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert 'getattr' not in str(unsafe) and any(name.startswith('numpy') for name in unsafe)
    for ckpt in (safe_load(str(path)), CheckpointLoader.load_checkpoint(str(path), map_location='cpu'),
                 read_checkpoint(str(path))):
        _check(ckpt)
        assert ckpt['meta']['np_seed'] == 7 and type(ckpt['meta']['np_seed']) is np.int64


def test_torchs_own_allow_list_is_left_as_it_is(tmp_path):
    """numpy's reconstructors let a file set a dtype's state; ``import mmswin`` must not allow-list them for
    every ``torch.load(weights_only=True)`` of the process."""
    names = [getattr(g, '__module__', '') or '' for g in torch.serialization.get_safe_globals()]
    assert not any(n.startswith(('numpy', 'mmengine')) for n in names)
    path = tmp_path / 'epoch_1.pth'
    torch.save(_training_checkpoint(), path)
    with pytest.raises(pickle.UnpicklingError, match='numpy'):
        torch.load(path, weights_only=True)


class _NumpyReduce:
    """Pickles as ``function(*args)`` followed by BUILD with ``state``, as numpy's own objects pickle."""

    def __init__(self, function, args, state=None):
        self.reduced = (function, args) if state is None else (function, args, state)

    def __reduce__(self):
        return self.reduced


def _forged_dtype(spec: str, flags: int) -> _NumpyReduce:
    return _NumpyReduce(np.dtype, (spec, False, True), (3, '|', None, None, None, -1, -1, flags))


def _array_of(dtype, raw: bytes) -> _NumpyReduce:
    from numpy.core.multiarray import _reconstruct
    return _NumpyReduce(_reconstruct, (np.ndarray, (0,), b'b'), (1, (len(raw) // 8,), dtype, False, raw))


@pytest.mark.parametrize('payload, pattern', [
    # an object dtype whose flags say it holds no objects: its 8 bytes would be taken for a PyObject pointer
    (_array_of(_forged_dtype('O8', 0), (0x4141414141414141).to_bytes(8, 'little')), 'dtype object'),
    # a float dtype whose flags say it holds objects: freeing the array would release 8 bytes as an object
    (_array_of(_forged_dtype('f8', 63), (0x4141414141414141).to_bytes(8, 'little')), 'BUILD of numpy dtype'),
    # an array made from a buffer with strides of the file's choosing
    (_NumpyReduce(np.ndarray, ((4,), 'f8', b'12345678', 0, (-8,))), r'numpy\.ndarray\(\.\.\.\)'),
    (_NumpyReduce(__import__('numpy.core.multiarray', fromlist=['scalar']).scalar,
                  (np.dtype('O'), (0x4141414141414141).to_bytes(8, 'little'))), 'dtype object'),
], ids=['object-dtype-without-flags', 'float-dtype-with-object-flags', 'ndarray-from-buffer', 'object-scalar'])
def test_numpy_data_the_file_forges_is_refused(tmp_path, payload, pattern):
    path = tmp_path / 'forged.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': {'seed': payload}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    for load in (safe_load, restricted_load):
        with pytest.raises(RestrictedUnpicklingError, match=pattern):
            load(str(path))
    with pytest.raises(CheckpointError, match=f'{path}: refused to unpickle'):
        read_checkpoint(str(path))
    with pytest.raises(RestrictedUnpicklingError, match=f'{path}: refused to unpickle'):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')


def test_plain_numpy_data_round_trips(tmp_path):
    values = {'f8': np.arange(3.0), 'f8_big': np.arange(3.0).astype('>f8'), 'i8': np.arange(4), 'b1': np.ones(2, bool),
              'u1': np.arange(3, dtype=np.uint8), 'c16': np.array([1 + 2j]), 'U5': np.array(['car', 'bus']),
              'S3': np.array([b'ab']), 'f2': np.float16(1.5), 'scalar': np.float64(0.25), 'empty': np.zeros((0, 3))}
    path = tmp_path / 'plain.pth'
    torch.save({'state_dict': {}, 'meta': values}, path)
    loaded = safe_load(str(path))['meta']
    for key, value in values.items():
        expected = pickle.loads(pickle.dumps(value, protocol=2))  # what numpy's own unpickling gives
        assert type(loaded[key]) is type(expected) and loaded[key].dtype == expected.dtype, key
        assert np.array_equal(loaded[key], value), key


def _legacy_file(tmp_path, **extra):
    """A checkpoint as mmengine 0.10.7 writes it without mmswin: statistics methods pickled through
    ``builtins.getattr``; ``extra`` is added to it."""
    path = tmp_path / 'legacy.pth'

    def legacy_getstate(self):
        self.__dict__.update(statistics_methods=self._statistics_methods)
        return self.__dict__

    patched = HistoryBuffer.__getstate__
    HistoryBuffer.__getstate__ = legacy_getstate
    try:
        torch.save({**_training_checkpoint(), **extra}, path)
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
    with pytest.raises(UnicodeEncodeError):  # a text write that fails (mmengine's own leaves an empty file)
        backend.put_text('iter_200.pth \u00fc', str(tmp_path / 'last_checkpoint'), encoding='ascii')
    assert (tmp_path / 'last_checkpoint').read_text() == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter_100.pth', 'last_checkpoint']


def _build_on_global(module: str, name: str, state: object) -> bytes:
    """A protocol-2 pickle that sets ``state`` on the global ``module.name`` itself: GLOBAL, state, BUILD."""
    return (pickle.PROTO + b'\x02' + pickle.GLOBAL + f'{module}\n{name}\n'.encode()
            + pickle.dumps(state, protocol=2)[2:-1] + pickle.BUILD + pickle.STOP)


@pytest.mark.parametrize('module, name, state, attribute', [
    # setattr on the class through the slot state: Counter.most_common = OrderedDict, process-wide
    ('collections', 'Counter', (None, {'most_common': collections.OrderedDict}), 'most_common'),
    # the function's __dict__ updated: an attribute on torch's tensor reconstructor
    ('torch._utils', '_rebuild_tensor_v2', {'mmswin_marker': 1}, 'mmswin_marker'),
])
def test_build_on_an_allow_listed_class_or_function_is_refused(tmp_path, module, name, state, attribute):
    target = getattr(__import__(module, fromlist=[name]), name)
    before = target.__dict__.get(attribute)
    path = tmp_path / 'build.pth'
    path.write_bytes(_build_on_global(module, name, state))
    try:
        with pytest.raises(RestrictedUnpicklingError, match=f'BUILD.*{name}'):
            safe_load(str(path))
        with pytest.raises(RestrictedUnpicklingError, match='BUILD'):
            restricted_load(str(path))
        with pytest.raises(CheckpointError, match='BUILD'):
            read_checkpoint(str(path))
        with pytest.raises(pickle.UnpicklingError, match='BUILD'):
            CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
        assert target.__dict__.get(attribute) is before
    finally:  # undo what a broken unpickler did, for the tests after this one
        if before is not None:
            setattr(target, attribute, before)
        elif attribute in target.__dict__:
            delattr(target, attribute)
    assert collections.Counter({'a': 2, 'b': 1}).most_common(1) == [('a', 2)]


@pytest.mark.parametrize('methods', [{'min': collections.Counter}, {'mmswin_extra': collections.OrderedDict}])
def test_history_buffer_state_cannot_change_the_class_wide_statistics(tmp_path, methods):
    """mmengine's ``HistoryBuffer.__setstate__`` updates the dict shared by all buffers; a file may only
    name the methods already registered."""
    registered = dict(HistoryBuffer._statistics_methods)
    buffer = HistoryBuffer([1.0, 2.0], [1, 1])
    path = tmp_path / 'hub.pth'

    def evil_getstate(self):
        return {**self.__dict__, 'statistics_methods': methods}

    patched = HistoryBuffer.__getstate__
    HistoryBuffer.__getstate__ = evil_getstate
    try:
        torch.save({'state_dict': {}, 'message_hub': {'log_scalars': {'loss': buffer}}}, path)
    finally:
        HistoryBuffer.__getstate__ = patched
    try:
        with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):  # torch's own allow-list
            torch.load(path, weights_only=True)
        for load in (safe_load, restricted_load):
            with pytest.raises(pickle.UnpicklingError, match='statistics method'):
                load(str(path))
        assert HistoryBuffer._statistics_methods == registered
    finally:
        HistoryBuffer._statistics_methods.clear()
        HistoryBuffer._statistics_methods.update(registered)
    assert HistoryBuffer([1.0, 3.0], [1, 1]).min() == 1.0


def test_protocol_2_builtins_load(tmp_path):
    """torch.save writes protocol 2, which names ``set``, ``frozenset`` and ``slice`` ``__builtin__``."""
    extra = {'meta_sets': {'classes': {'car', 'person'}, 'frozen': frozenset({1, 2}), 'crop': slice(1, 8, 2)}}
    path = _legacy_file(tmp_path, **extra)
    assert b'__builtin__\nset' in __import__('zipfile').ZipFile(path).read('legacy/data.pkl')
    for ckpt in (restricted_load(str(path)), safe_load(str(path)),
                 CheckpointLoader.load_checkpoint(str(path), map_location='cpu')):
        _check(ckpt)
        assert ckpt['meta_sets'] == extra['meta_sets']


def test_mmengine_local_loader_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    torch.save({'state_dict': {'w': torch.ones(2)}}, tmp_path / 'x.pth')
    assert torch.equal(_load_checkpoint('~/x.pth', map_location='cpu')['state_dict']['w'], torch.ones(2))
    for missing in ('~/missing.pth', str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            _load_checkpoint(missing)


def test_mmengine_local_loader_errors_name_the_file(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    torch.save({'state_dict': {}, 'x': _CallsSystem(tmp_path / 'pwned')}, tmp_path / 'evil.pth')
    for name, error, pattern in (('empty.pth', EOFError, 'not a readable checkpoint'),
                                 ('garbage.pth', pickle.UnpicklingError, 'invalid load key'),
                                 ('evil.pth', RestrictedUnpicklingError, r'global (posix|nt)\.system.*pickled code')):
        with pytest.raises(error, match=f'{tmp_path / name}.*{pattern}'):
            _load_checkpoint(str(tmp_path / name))
    assert not (tmp_path / 'pwned').exists()



class _BadEncoding:
    """A string pickled through ``_codecs.encode`` with an encoding that does not exist (a damaged byte)."""

    def __reduce__(self):
        import codecs
        return codecs.encode, ('k', 'lati21')


def _saved_with_extension_code(path, legacy: bool) -> None:
    """A checkpoint naming ``collections.OrderedDict`` by a copyreg extension code this process does not have."""
    import copyreg
    copyreg.add_extension('collections', 'OrderedDict', 240)
    try:
        torch.save({'state_dict': collections.OrderedDict(w=torch.ones(2))}, path,
                   _use_new_zipfile_serialization=not legacy)
    finally:
        copyreg.remove_extension('collections', 'OrderedDict', 240)


@pytest.mark.parametrize('legacy', [True, False], ids=['legacy', 'zip'])
@pytest.mark.parametrize('damage', ['encoding', 'extension'])
def test_damaged_pickles_are_errors_naming_the_file(tmp_path, legacy, damage):
    """Errors torch.load and pickle raise for a damaged stream beyond UnpicklingError (LookupError, ValueError)
    are reported as unreadable files with their name, by mmswin's reader and by mmengine's loaders."""
    path = tmp_path / 'damaged.pth'
    if damage == 'encoding':
        torch.save({'state_dict': {}, 'meta': {'note': _BadEncoding()}}, path,
                   _use_new_zipfile_serialization=not legacy)
    else:
        _saved_with_extension_code(path, legacy)
    with pytest.raises(CheckpointError, match=f'{path} is not a readable checkpoint'):
        read_checkpoint(str(path))
    with pytest.raises(pickle.UnpicklingError, match=f'{path} is not a readable checkpoint'):
        _load_checkpoint(str(path))


@pytest.mark.parametrize('legacy', [True, False], ids=['legacy', 'zip'])
def test_every_truncation_is_a_checkpoint_error_naming_the_file(tmp_path, legacy):
    """A file cut anywhere is refused as unreadable with its name, by mmswin's reader (with and without
    ``unsafe_load``) and by mmengine's local loader (the exception types mmengine's callers know), never a bare
    ``struct.error`` or ``IndexError`` from inside torch.load."""
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': {'layers.0.w': torch.randn(3, 2)}, 'meta': {'epoch': 1}}, whole,
               _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / 'cut.pth'
    for end in range(1, len(data), 1 if legacy else 7):
        cut.write_bytes(data[:end])
        for unsafe in (False, True):
            # (a cut can leave a pickle naming a global that is not one, which the safe reader refuses)
            with pytest.raises(CheckpointError, match=f'{cut}(: refused to unpickle| is not a readable checkpoint)'):
                read_checkpoint(str(cut), unsafe_load=unsafe)
        with pytest.raises((pickle.UnpicklingError, EOFError, RuntimeError, struct.error, IndexError),
                           match=str(cut)):
            _load_checkpoint(str(cut))

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name == 'nt', reason='POSIX permissions')
def test_atomic_writes_give_a_new_file_the_mode_of_a_plain_open(tmp_path, umask_027):
    """0666 less the umask, as ``open()`` gives (mkstemp's 0600 would hide checkpoints from the group)."""
    import mmengine
    from mmengine.fileio import get_file_backend

    backend = get_file_backend(str(tmp_path))
    backend.put(b'data', str(tmp_path / 'new.pth'))
    backend.put_text('text', str(tmp_path / 'new.txt'))
    mmengine.dump({'a': 1}, str(tmp_path / 'new.json'))
    assert [_mode(tmp_path / n) for n in ('new.pth', 'new.txt', 'new.json')] == [0o640] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['new.json', 'new.pth', 'new.txt']


@pytest.mark.skipif(os.name == 'nt', reason='POSIX permissions')
def test_atomic_writes_keep_the_mode_of_a_replaced_file(tmp_path, umask_027):
    from mmengine.fileio import get_file_backend

    backend = get_file_backend(str(tmp_path))
    for name in ('old.pth', 'old.txt'):
        (tmp_path / name).write_bytes(b'old')
        os.chmod(tmp_path / name, 0o604)
    backend.put(b'new', str(tmp_path / 'old.pth'))
    backend.put_text('new', str(tmp_path / 'old.txt'))
    assert [_mode(tmp_path / n) for n in ('old.pth', 'old.txt')] == [0o604] * 2
    assert [(tmp_path / n).read_bytes() for n in ('old.pth', 'old.txt')] == [b'new'] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['old.pth', 'old.txt']


@pytest.mark.skipif(os.name == 'nt', reason='POSIX symbolic links')
def test_atomic_writes_write_through_a_symbolic_link(tmp_path):
    """As mmengine's plain ``open()`` does: the file the link points at is replaced and the link kept."""
    import mmengine

    (tmp_path / 'store').mkdir()
    target = tmp_path / 'store' / 'results.pkl'
    target.write_bytes(b'old')
    link = tmp_path / 'results.pkl'
    link.symlink_to(target)
    mmengine.dump({'a': 1}, str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert mmengine.load(str(target)) == {'a': 1}
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['results.pkl', 'results.pkl', 'store']


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """A folder served over HTTP on the loopback interface: ``(folder, base URL)``; torch hub's cache is a
    fresh folder of its own."""
    import functools
    import http.server
    import threading

    served = tmp_path / 'served'
    served.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_a_download_cut_short_is_not_cached(tmp_path, monkeypatch):
    """A connection closed before the announced Content-Length: an error naming the URL, nothing left in torch
    hub's cache (torch's own downloader keeps the half file, which every later load would read), and the
    next, whole, download loads."""
    import http.server
    import threading

    from mmswin.checkpoint.download import IncompleteDownload

    data = (DATA / 'v1_official_cls.pth').read_bytes()
    sent = []

    class HalfOnce(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data if sent else data[:len(data) // 2])
            sent.append(self.path)
            self.close_connection = True

        def log_message(self, *args):
            pass

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), HalfOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/swin_tiny.pth'
    try:
        with pytest.raises(IncompleteDownload, match=rf'{url}: the download stopped after {len(data) // 2} of the '
                                                      rf'{len(data)} bytes'):
            read_checkpoint(url)
        cache = Path(torch.hub.get_dir()) / 'checkpoints'
        assert list(cache.iterdir()) == []
        assert read_checkpoint(url)['model'].keys() == torch.load(DATA / 'v1_official_cls.pth')['model'].keys()
        assert [p.name for p in cache.iterdir()] == ['swin_tiny.pth'] and len(sent) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_mmengine_url_loads_never_run_pickled_code(http_dir, tmp_path):
    """``load_from='https://...'`` (and ``torchvision://``, ``open-mmlab://``, which download through it):
    mmengine reads downloads with ``weights_only=False``; mmswin reads them as local files."""
    served, base = http_dir
    marker = tmp_path / 'pwned'
    torch.save({'state_dict': {}, 'x': _CallsSystem(marker)}, served / 'evil.pth')
    with pytest.raises(RestrictedUnpicklingError, match=rf'{base}/evil\.pth \(downloaded to .*hub.*evil\.pth\): '
                                                         r'refused to unpickle global (posix|nt)\.system'):
        _load_checkpoint(f'{base}/evil.pth', map_location='cpu')
    assert not marker.exists()


def test_mmengine_url_loads_read_training_checkpoints(http_dir, tmp_path):
    served, base = http_dir
    _legacy_file(served)  # legacy.pth: statistics methods through builtins.getattr
    torch.save(_training_checkpoint(), served / 'new.pth')
    for name in ('legacy.pth', 'new.pth'):
        _check(_load_checkpoint(f'{base}/{name}?download=1', map_location='cpu'))
        assert (tmp_path / 'hub' / 'hub' / 'checkpoints' / name).is_file()
    (served / 'new.pth').unlink()
    _check(_load_checkpoint(f'{base}/new.pth', map_location='cpu'))  # from the cache, as torch's loader


def test_url_loads_extract_a_legacy_zip_archive(http_dir, tmp_path):
    """torch < 1.6 model zoos served a checkpoint zipped alone; torch's URL loader extracts it."""
    import zipfile

    served, base = http_dir
    torch.save({'state_dict': {'w': torch.arange(4.0)}}, tmp_path / 'weights.pth', _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(served / 'weights.zip', 'w') as archive:
        archive.write(tmp_path / 'weights.pth', 'weights.pth')
    with zipfile.ZipFile(served / 'old.pth', 'w') as archive:  # the member named as the archive
        archive.write(tmp_path / 'weights.pth', 'old.pth')
    with zipfile.ZipFile(served / 'nested.zip', 'w') as archive:  # the member in a folder of the archive
        archive.write(tmp_path / 'weights.pth', 'models/nested.pth')
    for name in ('weights.zip', 'old.pth', 'nested.zip'):
        for ckpt in (_load_checkpoint(f'{base}/{name}', map_location='cpu'), read_checkpoint(f'{base}/{name}')):
            assert torch.equal(ckpt['state_dict']['w'], torch.arange(4.0))
    cache = tmp_path / 'hub' / 'hub' / 'checkpoints'
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob('*') if p.is_file()) == [
        'nested.pth', 'nested.zip', 'old.pth', 'old.pth.unzipped/old.pth', 'weights.pth', 'weights.zip']


def test_read_checkpoint_url_is_restricted_unless_opted_in(http_dir, tmp_path):
    served, base = http_dir
    marker = tmp_path / 'pwned'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'x': _CallsSystem(marker)}, served / 'evil.pth')
    with pytest.raises(CheckpointError, match=rf'{base}/evil\.pth: refused to unpickle .*unsafe_load=True'):
        read_checkpoint(f'{base}/evil.pth')
    assert not marker.exists()
    assert torch.equal(read_checkpoint(f'{base}/evil.pth', unsafe_load=True)['state_dict']['w'], torch.ones(2))
    assert marker.exists()


def test_unsafe_load_sets_history_buffer_state_as_mmengine(tmp_path):
    """With the opt-in, a file may register statistics methods as under mmengine alone; without it, or
    outside that load, it may not."""
    registered = dict(HistoryBuffer._statistics_methods)
    path = tmp_path / 'hub.pth'
    extra = {'mmswin_extra': collections.OrderedDict}

    def extended_getstate(self):
        return {**self.__dict__, 'statistics_methods': {**self._statistics_methods, **extra}}

    patched = HistoryBuffer.__getstate__
    HistoryBuffer.__getstate__ = extended_getstate
    try:
        torch.save({'state_dict': {}, 'buf': HistoryBuffer([1.0, 2.0], [1, 1])}, path)
    finally:
        HistoryBuffer.__getstate__ = patched
    try:
        with pytest.raises(CheckpointError, match="statistics method 'mmswin_extra'"):
            read_checkpoint(str(path))
        assert HistoryBuffer._statistics_methods == registered
        assert read_checkpoint(str(path), unsafe_load=True)['buf'].mean() == 1.5
        assert HistoryBuffer._statistics_methods == {**registered, **extra}
        HistoryBuffer._statistics_methods.pop('mmswin_extra')
        with pytest.raises(pickle.UnpicklingError, match="statistics method 'mmswin_extra'"):
            restricted_load(str(path))  # the trust ended with the load
    finally:
        HistoryBuffer._statistics_methods.clear()
        HistoryBuffer._statistics_methods.update(registered)


def _contents(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_mmengine_store_loads_read_training_checkpoints(store, tmp_path):
    """``load_from='s3://...'``: mmengine reads it with torch's default, which refuses mmengine's own older
    training checkpoints; mmswin reads them as local files."""
    store['s3://bucket/legacy.pth'] = _legacy_file(tmp_path).read_bytes()
    store['cluster:s3://bucket/new.pth'] = _contents(_training_checkpoint())
    store['petrel://bucket/legacy.pth'] = store['s3://bucket/legacy.pth']
    for uri in store:
        assert CheckpointLoader._get_checkpoint_loader(uri) is safe_unpickle.load_from_store
        _check(_load_checkpoint(uri, map_location='cpu'))


def test_mmengine_store_loads_never_run_pickled_code(store, tmp_path):
    marker = tmp_path / 'pwned'
    store['s3://bucket/evil.pth'] = _contents({'state_dict': {}, 'x': _CallsSystem(marker)})
    with pytest.raises(RestrictedUnpicklingError,
                       match=r's3://bucket/evil\.pth: refused to unpickle global (posix|nt)\.system'):
        _load_checkpoint('s3://bucket/evil.pth', map_location='cpu')
    assert not marker.exists()


def test_read_checkpoint_from_a_store_is_restricted_unless_opted_in(store, tmp_path):
    """``init_cfg=dict(type='Pretrained', checkpoint='s3://...')`` reads through the same store."""
    marker = tmp_path / 'pwned'
    store['s3://bucket/legacy.pth'] = _legacy_file(tmp_path).read_bytes()
    store['s3://bucket/evil.pth'] = _contents({'state_dict': {'w': torch.ones(2)}, 'x': _CallsSystem(marker)})
    _check(read_checkpoint('s3://bucket/legacy.pth'))
    with pytest.raises(CheckpointError, match=r's3://bucket/evil\.pth: refused to unpickle .*unsafe_load=True'):
        read_checkpoint('s3://bucket/evil.pth')
    assert not marker.exists()
    assert torch.equal(read_checkpoint('s3://bucket/evil.pth', unsafe_load=True)['state_dict']['w'], torch.ones(2))
    assert marker.exists()


def _assert_pretrained_as_local(checkpoint: str) -> None:
    """A backbone initialised from ``checkpoint`` (which serves the golden V1 file) has the weights that the
    local file gives (each model starts from its own random initialisation)."""
    models = []
    for source in (checkpoint, str(DATA / 'v1_official_cls.pth')):
        model = SwinTransformer(**SMALL, init_cfg=dict(type='Pretrained', checkpoint=source))
        model.init_weights()
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pretrained_backbone_from_a_store(store):
    store['cluster:s3://bucket/swin.pth'] = (DATA / 'v1_official_cls.pth').read_bytes()
    _assert_pretrained_as_local('cluster:s3://bucket/swin.pth')


def test_pretrained_backbone_from_mmengines_mmcls_model_zoo(http_dir, monkeypatch):
    """``checkpoint='mmcls://swin_tiny'``, as mmengine's ``load_from`` takes it: the zoo's URL, downloaded."""
    from mmengine.runner import checkpoint as mmengine_checkpoint

    served, base = http_dir
    (served / 'swin.pth').write_bytes((DATA / 'v1_official_cls.pth').read_bytes())
    zoo = mmengine_checkpoint.get_mmcls_models()
    assert {'swin_tiny', 'swin_small', 'swin_base', 'swin_large'} <= set(zoo)
    monkeypatch.setattr(mmengine_checkpoint, 'get_mmcls_models', lambda: {**zoo, 'swin_tiny': f'{base}/swin.pth'})
    _assert_pretrained_as_local('mmcls://swin_tiny')
    with pytest.raises(CheckpointError, match=r"mmcls://swin_t: mmengine's mmcls model zoo has no model 'swin_t' "
                                              r'\(its Swins: swin_base, swin_large, swin_small, swin_tiny\)'):
        read_checkpoint('mmcls://swin_t')


def test_read_checkpoint_names_a_scheme_it_does_not_read():
    for uri in ('ftp://host/model.pth', 'open-mmlab://resnet50_v1c'):
        schemes = r'\(paths, http\(s\)://, s3://, petrel://, pavi:// and mmcls:// are\)'
        with pytest.raises(CheckpointError, match=rf'{uri}: {uri.split(":")[0]}:// is not a scheme this loader '
                                                  rf'reads {schemes}'):
            read_checkpoint(uri)


def test_store_without_its_client_names_the_file(monkeypatch):
    monkeypatch.setitem(sys.modules, 'petrel_client', None)  # as if not installed
    with pytest.raises(ImportError, match=r's3://bucket/w\.pth: .*petrel_client'):
        read_checkpoint('s3://bucket/w.pth')


def test_pavi_loads_read_training_checkpoints(tmp_path, monkeypatch):
    """``pavi://`` downloads from pavi's model cloud into a temporary folder; mmswin reads the download as
    a local file, through mmengine and its own loader alike, and its errors name the model."""
    import types

    legacy = _legacy_file(tmp_path).read_bytes()
    marker = tmp_path / 'pwned'
    models = {'runs/legacy': legacy, 'runs/evil': _contents({'x': _CallsSystem(marker)})}

    class Model:
        def __init__(self, path):
            self.name, self.path = path.rsplit('/', 1)[1] + '.pth', path

        def download(self, target):
            with open(target, 'wb') as file:
                file.write(models[self.path])

    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=Model)
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    assert CheckpointLoader._get_checkpoint_loader('pavi://runs/legacy') is safe_unpickle.load_from_pavi
    _check(_load_checkpoint('pavi://runs/legacy', map_location='cpu'))
    _check(read_checkpoint('pavi://runs/legacy'))  # init_cfg=dict(type='Pretrained', checkpoint='pavi://...')
    with pytest.raises(RestrictedUnpicklingError, match=r'pavi://runs/evil: refused to unpickle global'):
        _load_checkpoint('pavi://runs/evil', map_location='cpu')
    with pytest.raises(CheckpointError, match=r'pavi://runs/evil: refused to unpickle global'):
        read_checkpoint('pavi://runs/evil')
    assert not marker.exists()
    monkeypatch.setitem(sys.modules, 'pavi', None)  # not installed
    with pytest.raises(ImportError, match=r'pavi://runs/legacy: loading from pavi:// needs the pavi package'):
        read_checkpoint('pavi://runs/legacy')
