"""Loading mmengine training checkpoints without running pickled code (torch >= 2.6, ``weights_only``).

mmengine 0.10.7 checkpoints pickle, besides tensors, the message hub's ``HistoryBuffer`` objects (numpy
arrays and scalars inside) and, through ``HistoryBuffer.__getstate__``, its statistics functions, which
protocol 2 rebuilds with ``builtins.getattr(HistoryBuffer, 'min')``. ``getattr`` must never be
allow-listed in torch's safe unpickler: it would let a file call any method of anything it can reach.
Neither may numpy's reconstructors be: a file that sets the state of a ``numpy.dtype`` can clear an
object dtype's flags and have raw bytes taken for object pointers.

:func:`install` (run by ``import mmswin``) therefore leaves torch's allow-list as it is and:

* makes ``HistoryBuffer`` pickle its data only (no ``getattr``);
* makes ``HistoryBuffer.__setstate__`` refuse a file that would replace or add one of its class-wide
  statistics methods (mmengine's updates the dict shared by every buffer);
* registers an mmengine local-file checkpoint loader that reads what torch's safe loader refuses through
  :func:`restricted_load`, an unpickler that accepts a fixed set of globals and, as the only attribute
  look-up, ``getattr(HistoryBuffer, <statistics method>)``; it sets state (pickle's BUILD) only on
  instances of the allow-listed classes, never on a class or function itself, and builds numpy data
  only of plain types (booleans, numbers, strings) whose dtype state is numpy's own for that type;
* makes mmengine's URL schemes (``http(s)://``, ``torchvision://``, ``open-mmlab://``, ``mmcls://``),
  which read downloads with ``weights_only=False``, read them as local files are read;
* does the same for its storage schemes (``s3://``, ``petrel://``, ``pavi://``), whose ``torch.load``
  refuses mmengine training checkpoints (torch's safe default).

Nothing here turns ``weights_only`` off for an arbitrary file.
"""
import builtins
import collections
import io
import os.path as osp
import pickle
import struct
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

try:  # numpy >= 2 renamed numpy.core to numpy._core; files written with either may name both.
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

from mmengine.logging.history_buffer import HistoryBuffer

from .download import STORE_SCHEMES, download, read_pavi, read_store

_STATISTICS = frozenset({'min', 'max', 'mean', 'current'})


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for raw bytes (numpy buffers): latin-1 only."""
    if encoding != 'latin1' or not isinstance(text, str):  # not what pickle writes: a damaged file
        raise pickle.UnpicklingError(f'_codecs.encode of {type(text).__name__} with encoding {encoding!r}')
    return text.encode('latin1')


class RestrictedUnpicklingError(pickle.UnpicklingError):
    """A pickle asked for something outside the restricted unpickler's allow-list."""


def _history_buffer_getattr(obj: Any, name: str, *default: Any) -> Any:
    """The only ``getattr`` a restricted file may call: a statistics method of ``HistoryBuffer``."""
    if obj is HistoryBuffer and name in _STATISTICS and not default:
        return getattr(HistoryBuffer, name)
    raise RestrictedUnpicklingError(f'builtins.getattr({obj!r}, {name!r}) (only HistoryBuffer '
                                    f'statistics methods {sorted(_STATISTICS)} are allowed)')


_PLAIN_KINDS = 'biufcSU'  # numpy kinds the restricted unpickler builds: no objects, records or datetimes


class _NdarrayName:
    """What the name ``numpy.ndarray`` stands for in a restricted file: only the first argument of
    numpy's array reconstructor, never a constructor the file could call with a buffer of its own."""

    def __new__(cls, *args: Any, **kwargs: Any) -> '_NdarrayName':
        raise RestrictedUnpicklingError('numpy.ndarray(...) (arrays are read only as numpy pickles them)')


def _empty_bytes() -> bytes:
    """``bytes()``, as protocol 2 pickles ``b''`` (an empty array's data); never ``bytes(n)``."""
    return b''


def _plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _PLAIN_KINDS or dtype.hasobject or dtype.fields:
        raise RestrictedUnpicklingError(f'numpy data of dtype {dtype} (only booleans, numbers and strings are read)')
    return dtype


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(spec, align, copy)`` as numpy pickles a dtype, for plain types only."""
    if not isinstance(spec, str) or type(align) is not bool or type(copy) is not bool:
        raise RestrictedUnpicklingError(f'numpy.dtype{(spec, align, copy)!r}')
    try:
        dtype = np.dtype(spec, align, copy)
    except TypeError as error:
        raise RestrictedUnpicklingError(f'numpy.dtype({spec!r}): {error}') from None
    return _plain_dtype(dtype)


def _numpy_reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """numpy's array reconstructor as numpy pickles an array: an empty ndarray, its data set by BUILD."""
    if subtype is not _NdarrayName or shape != (0,) or code != b'b':
        raise RestrictedUnpicklingError(f'numpy.core.multiarray._reconstruct{(subtype, shape, code)!r}')
    return _np_multiarray._reconstruct(np.ndarray, (0,), b'b')


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """A numpy scalar of a plain dtype from its bytes."""
    if not isinstance(data, bytes):
        raise RestrictedUnpicklingError(f'numpy scalar of {type(data).__name__} data (bytes only)')
    return _np_multiarray.scalar(_plain_dtype(dtype), data)


def _check_numpy_state(obj: Any, state: Any) -> None:
    """Refuses BUILD state numpy would not have written: a dtype's must be that of its own type (a file
    could otherwise set its flags, size or fields), an array's must hold bytes of a plain dtype."""
    if isinstance(obj, np.dtype):
        own = obj.__reduce__()[2]
        if not (isinstance(state, tuple) and len(state) == len(own) and state[0] == own[0]
                and state[1] in ('<', '>', '|', '=') and state[2:] == own[2:]):
            raise RestrictedUnpicklingError(f'BUILD of numpy dtype {obj} with state {state!r} (numpy writes {own!r})')
    elif type(obj) is np.ndarray and isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
        if not isinstance(state[4], bytes):
            raise RestrictedUnpicklingError(f'BUILD of a numpy array from {type(state[4]).__name__} (bytes only)')
        _plain_dtype(state[2])
    else:
        raise RestrictedUnpicklingError(f'BUILD of {_describe(obj)} with state numpy does not write')


def _allowed_globals() -> Dict[Tuple[str, str], Callable]:
    allowed = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('collections', 'Counter'): collections.Counter,
        ('collections', 'defaultdict'): collections.defaultdict,
        ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
        ('torch', 'Size'): torch.Size,
        ('torch', 'device'): torch.device,
        ('mmengine.logging.history_buffer', 'HistoryBuffer'): HistoryBuffer,
        ('numpy', 'ndarray'): _NdarrayName,
        ('numpy', 'dtype'): _numpy_dtype,
        ('builtins', 'getattr'): _history_buffer_getattr,
        ('__builtin__', 'getattr'): _history_buffer_getattr,
        ('_codecs', 'encode'): _latin1_encode,
    }
    # Protocol 2 (torch.save's default) names builtins ``__builtin__``; pickle maps that in the
    # ``find_class`` the restricted unpickler overrides.
    for name in ('set', 'frozenset', 'slice'):
        allowed[('builtins', name)] = allowed[('__builtin__', name)] = getattr(builtins, name)
    allowed[('builtins', 'bytes')] = allowed[('__builtin__', 'bytes')] = _empty_bytes
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[(module, '_reconstruct')] = _numpy_reconstruct
        allowed[(module, 'scalar')] = _numpy_scalar
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[('torch', name)] = getattr(torch, name)
    return allowed


_ALLOWED = _allowed_globals()
# BUILD (``__setstate__`` or an update of ``__dict__`` / attributes) is allowed only on objects whose
# exact type is one of these, as in torch's weights-only unpickler: never on an allow-listed class or
# function itself, which would change it for the whole process.
# numpy's arrays and dtypes are built only with the state numpy writes (:func:`_check_numpy_state`).
_BUILDABLE = frozenset(obj for obj in _ALLOWED.values() if isinstance(obj, type) and obj is not _NdarrayName)
_NUMPY_BUILDABLE = (np.ndarray, np.dtype)


def _describe(obj: Any) -> str:
    """``type collections.Counter`` for a class or function, ``a numpy.ndarray`` for other objects."""
    if isinstance(obj, type) or (callable(obj) and hasattr(obj, '__qualname__')):
        return f'{type(obj).__name__} {getattr(obj, "__module__", None)}.{obj.__qualname__}'
    return f'a {type(obj).__module__}.{type(obj).__qualname__}'


class _Dispatch(dict):
    """Opcode table whose unknown opcodes fail as in the C unpickler rather than with a bare KeyError."""

    def __missing__(self, opcode: int) -> Callable:
        raise pickle.UnpicklingError(f'invalid load key, {chr(opcode)!r}.')


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's own unpickler (the C one cannot check BUILD) limited to :data:`_ALLOWED` globals and
    to BUILD on instances of :data:`_BUILDABLE` types."""
    dispatch = _Dispatch(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RestrictedUnpicklingError(f'global {module}.{name}') from None

    def load(self) -> Any:
        """Unpickles, reporting a malformed stream as the C unpickler does, with ``UnpicklingError``."""
        try:
            return super().load()
        except (KeyError, IndexError, ValueError, struct.error) as error:  # ValueError: an unknown EXT code
            raise pickle.UnpicklingError(f'malformed pickle ({type(error).__name__}: {error})') from error

    def load_build(self) -> None:
        """BUILD: sets the state of the object below the top of the stack, if it is buildable."""
        if len(self.stack) >= 2 and isinstance(self.stack[-2], _NUMPY_BUILDABLE):
            _check_numpy_state(self.stack[-2], self.stack[-1])
        elif len(self.stack) >= 2 and type(self.stack[-2]) not in _BUILDABLE:
            raise RestrictedUnpicklingError(f'BUILD (setting the state) of {_describe(self.stack[-2])}: only '
                                            'instances of allow-listed classes may be built')
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module in ``torch.load(pickle_module=...)``."""
    __name__ = 'mmswin_restricted_pickle'
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


Source = Union[str, bytes]  # a checkpoint's path, or its contents read from a storage backend


def opened(source: Source) -> Union[str, io.BytesIO]:
    """What ``torch.load`` takes for ``source``: a path as it is, contents as a fresh stream per read."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def restricted_load(source: Source, map_location: Any = None) -> Any:
    """Loads a checkpoint (path or contents) that holds only tensors, containers, numpy data and mmengine's
    ``HistoryBuffer``; raises :class:`RestrictedUnpicklingError` naming anything else."""
    return torch.load(opened(source), map_location=map_location, weights_only=False,
                      pickle_module=_RestrictedPickleModule)


def safe_load(source: Source, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a path or contents, falling back to :func:`restricted_load` for
    mmengine files written before :func:`install` (their ``HistoryBuffer`` state names ``builtins.getattr``)."""
    try:
        return torch.load(opened(source), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        return restricted_load(source, map_location=map_location)


def _history_buffer_getstate(self: HistoryBuffer) -> dict:
    # Only the data: the statistics methods are class attributes, set again by __setstate__.
    return {k: v for k, v in self.__dict__.items() if k != 'statistics_methods'}


_trust = threading.local()


@contextmanager
def trusted_history_buffers() -> Iterator[None]:
    """Within it, on this thread, ``HistoryBuffer`` state is set as mmengine sets it: a file may register
    statistics methods for every buffer. For loads the user opted into running pickled code for."""
    before = getattr(_trust, 'depth', 0)
    _trust.depth = before + 1
    try:
        yield
    finally:
        _trust.depth = before


def _history_buffer_setstate(self: HistoryBuffer, state: dict) -> None:
    """mmengine's ``__setstate__`` without changing the class: the statistics methods of a file must be
    the ones this process has registered under those names (they are shared by every buffer), unless the
    load is trusted (:func:`trusted_history_buffers`)."""
    if not isinstance(state, dict):
        raise RestrictedUnpicklingError(f'HistoryBuffer state must be a dict, not {type(state).__name__}')
    state = dict(state)
    methods = state.pop('statistics_methods', {})
    self._set_default_statistics()
    if not isinstance(methods, dict):
        raise RestrictedUnpicklingError(f'HistoryBuffer statistics_methods must be a dict, not '
                                        f'{type(methods).__name__}')
    if getattr(_trust, 'depth', 0):
        HistoryBuffer._statistics_methods.update(methods)
        methods = {}
    for name, method in methods.items():
        if HistoryBuffer._statistics_methods.get(name) is not method:
            raise RestrictedUnpicklingError(
                f'HistoryBuffer state sets statistics method {name!r} to {_describe(method)}, which would '
                f'change it for every HistoryBuffer (registered: {sorted(HistoryBuffer._statistics_methods)})')
    self.__dict__.update(state)


def _read_named(source: Source, name: str, map_location: Any) -> Any:
    """:func:`safe_load` of ``source``, its errors naming ``name`` (the file, or the URL it came from)."""
    try:
        return safe_load(source, map_location=map_location)
    except RestrictedUnpicklingError as error:
        raise RestrictedUnpicklingError(
            f'{name}: refused to unpickle {error}. mmswin reads checkpoints without running pickled code: '
            'only tensors, containers, numpy data and mmengine HistoryBuffers') from error
    except (pickle.UnpicklingError, EOFError, struct.error, IndexError) as error:  # the last two: legacy files
        raise type(error)(f'{name} is not a readable checkpoint (truncated or corrupt?): '
                          f'{str(error) or type(error).__name__}') from error
    except RuntimeError as error:  # torch's: a damaged zip archive, a map_location that does not exist...
        raise type(error)(f'{name}: {error}') from error
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - anything else a damaged file raises (LookupError for a mangled
        # string encoding, ValueError for an unknown pickle extension...), as an unpickling error naming the file
        raise pickle.UnpicklingError(f'{name} is not a readable checkpoint (truncated or corrupt?): '
                                     f'{type(error).__name__}: {error}') from error


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file checkpoint loader (``~`` expanded, a missing file refused) reading through
    :func:`safe_load`; its errors name the file. Named as mmengine's, whose log shows the name's tail."""
    path = osp.expanduser(filename)
    if not osp.isfile(path):
        problem = 'not a file' if osp.exists(path) else 'no such file'
        raise FileNotFoundError(f'checkpoint {path} can not be found ({problem})')
    return _read_named(path, path, map_location)


def load_url(url: str, model_dir: Optional[str] = None, map_location: Any = None, progress: bool = True) -> Any:
    """What mmengine's URL schemes call to read a download: torch hub's cache as before, read through
    :func:`safe_load` instead of ``torch.load(weights_only=False)``; errors name the URL and the file."""
    path = download(url, model_dir=model_dir, progress=progress)
    return _read_named(path, f'{url} (downloaded to {path})', map_location)


def load_from_store(filename: str, map_location: Any = None, backend: str = 'petrel') -> Any:
    """mmengine's loader of ``s3://`` and ``petrel://`` files (read whole through its storage backend)
    reading through :func:`safe_load` instead of ``torch.load``'s defaults; errors name the file."""
    return _read_named(read_store(filename, backend), filename, map_location)


def load_from_pavi(filename: str, map_location: Any = None) -> Any:
    """mmengine's ``pavi://`` loader (a download from pavi's model cloud) reading through :func:`safe_load`;
    errors name the model."""
    return _read_named(read_pavi(filename), filename, map_location)


_installed = False


def install() -> None:
    """Makes mmengine checkpoints loadable without unsafe unpickling (idempotent)."""
    global _installed
    if _installed:
        return
    from mmengine.runner import checkpoint as mmengine_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader

    HistoryBuffer.__getstate__ = _history_buffer_getstate
    HistoryBuffer.__setstate__ = _history_buffer_setstate
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=STORE_SCHEMES, loader=load_from_store, force=True)
    CheckpointLoader.register_scheme(prefixes='pavi://', loader=load_from_pavi, force=True)
    # load_from_http looks up ``load_url`` in its module at each call; torchvision://, open-mmlab:// and
    # mmcls:// go through load_from_http.
    mmengine_checkpoint.load_url = load_url
    _installed = True
