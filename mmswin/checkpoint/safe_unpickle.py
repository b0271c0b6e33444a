"""Loading mmengine training checkpoints without running pickled code (torch >= 2.6, ``weights_only``).

mmengine 0.10.7 checkpoints pickle, besides tensors, the message hub's ``HistoryBuffer`` objects (numpy
arrays and scalars inside) and, through ``HistoryBuffer.__getstate__``, its statistics functions, which
protocol 2 rebuilds with ``builtins.getattr(HistoryBuffer, 'min')``. ``getattr`` must never be
allow-listed in torch's safe unpickler: it would let a file call any method of anything it can reach.

:func:`install` (run by ``import mmswin``) therefore:

* allow-lists for ``torch.load(weights_only=True)`` only ``HistoryBuffer`` and the numpy array/scalar
  reconstructors, which build data and call nothing else;
* makes ``HistoryBuffer`` pickle its data only, so checkpoints written from then on load with torch's
  safe loader as they are;
* makes ``HistoryBuffer.__setstate__`` refuse a file that would replace or add one of its class-wide
  statistics methods (mmengine's updates the dict shared by every buffer);
* registers an mmengine local-file checkpoint loader that reads older files through
  :func:`restricted_load`, an unpickler that accepts a fixed set of globals and, as the only attribute
  look-up, ``getattr(HistoryBuffer, <statistics method>)``, and sets state (pickle's BUILD) only on
  instances of the allow-listed classes, never on a class or function itself;
* makes mmengine's URL schemes (``http(s)://``, ``torchvision://``, ``open-mmlab://``, ``mmcls://``),
  which read downloads with ``weights_only=False``, read them as local files are read;
* does the same for its storage schemes (``s3://``, ``petrel://``, ``pavi://``), whose ``torch.load``
  refuses mmengine training checkpoints written before :func:`install` (torch's safe default).

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
    if encoding != 'latin1' or not isinstance(text, str):
        raise RestrictedUnpicklingError(f'_codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


class RestrictedUnpicklingError(pickle.UnpicklingError):
    """A pickle asked for something outside the restricted unpickler's allow-list."""


def _history_buffer_getattr(obj: Any, name: str, *default: Any) -> Any:
    """The only ``getattr`` a restricted file may call: a statistics method of ``HistoryBuffer``."""
    if obj is HistoryBuffer and name in _STATISTICS and not default:
        return getattr(HistoryBuffer, name)
    raise RestrictedUnpicklingError(f'builtins.getattr({obj!r}, {name!r}) (only HistoryBuffer '
                                    f'statistics methods {sorted(_STATISTICS)} are allowed)')


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
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('builtins', 'getattr'): _history_buffer_getattr,
        ('__builtin__', 'getattr'): _history_buffer_getattr,
        ('_codecs', 'encode'): _latin1_encode,
    }
    # Protocol 2 (torch.save's default) names builtins ``__builtin__``; pickle maps that in the
    # ``find_class`` the restricted unpickler overrides.
    for name in ('set', 'frozenset', 'slice'):
        allowed[('builtins', name)] = allowed[('__builtin__', name)] = getattr(builtins, name)
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[(module, '_reconstruct')] = _np_multiarray._reconstruct
        allowed[(module, 'scalar')] = _np_multiarray.scalar
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[('torch', name)] = getattr(torch, name)
    for name in dir(np.dtypes):
        if name.endswith('DType'):
            allowed[('numpy.dtypes', name)] = getattr(np.dtypes, name)
    return allowed


_ALLOWED = _allowed_globals()
# BUILD (``__setstate__`` or an update of ``__dict__`` / attributes) is allowed only on objects whose
# exact type is one of these, as in torch's weights-only unpickler: never on an allow-listed class or
# function itself, which would change it for the whole process.
_BUILDABLE = frozenset(obj for obj in _ALLOWED.values() if isinstance(obj, type))


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
        except (KeyError, IndexError, struct.error) as error:
            raise pickle.UnpicklingError(f'malformed pickle ({type(error).__name__}: {error})') from error

    def load_build(self) -> None:
        """BUILD: sets the state of the object below the top of the stack, if it is buildable."""
        if len(self.stack) >= 2 and type(self.stack[-2]) not in _BUILDABLE:
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

    safe = [HistoryBuffer, np.ndarray, np.dtype, _np_multiarray._reconstruct, _np_multiarray.scalar]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    torch.serialization.add_safe_globals(safe)
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    HistoryBuffer.__setstate__ = _history_buffer_setstate
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=STORE_SCHEMES, loader=load_from_store, force=True)
    CheckpointLoader.register_scheme(prefixes='pavi://', loader=load_from_pavi, force=True)
    # load_from_http looks up ``load_url`` in its module at each call; torchvision://, open-mmlab:// and
    # mmcls:// go through load_from_http.
    mmengine_checkpoint.load_url = load_url
    _installed = True
