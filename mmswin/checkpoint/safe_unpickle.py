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
* registers an mmengine local-file checkpoint loader that reads older files through
  :func:`restricted_load`, an unpickler that accepts a fixed set of globals and, as the only attribute
  look-up, ``getattr(HistoryBuffer, <statistics method>)``.

Nothing here turns ``weights_only`` off for an arbitrary file.
"""
import builtins
import collections
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

try:  # numpy >= 2 renamed numpy.core to numpy._core; files written with either may name both.
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

from mmengine.logging.history_buffer import HistoryBuffer

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
        ('builtins', 'set'): builtins.set,
        ('builtins', 'frozenset'): builtins.frozenset,
        ('builtins', 'slice'): builtins.slice,
    }
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


class _RestrictedUnpickler(pickle.Unpickler):

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RestrictedUnpicklingError(f'global {module}.{name}') from None


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module in ``torch.load(pickle_module=...)``."""
    __name__ = 'mmswin_restricted_pickle'
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def restricted_load(path: str, map_location: Any = None) -> Any:
    """Loads a checkpoint that holds only tensors, containers, numpy data and mmengine's
    ``HistoryBuffer``; raises :class:`RestrictedUnpicklingError` naming anything else."""
    return torch.load(path, map_location=map_location, weights_only=False,
                      pickle_module=_RestrictedPickleModule)


def safe_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``, falling back to :func:`restricted_load` for mmengine files
    written before :func:`install` (their ``HistoryBuffer`` state names ``builtins.getattr``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        return restricted_load(path, map_location=map_location)


def _history_buffer_getstate(self: HistoryBuffer) -> dict:
    # Only the data: the statistics methods are class attributes, set again by __setstate__.
    return {k: v for k, v in self.__dict__.items() if k != 'statistics_methods'}


def _load_local(filename: str, map_location: Any = None) -> Any:
    return safe_load(filename, map_location=map_location)


_installed = False


def install() -> None:
    """Makes mmengine checkpoints loadable without unsafe unpickling (idempotent)."""
    global _installed
    if _installed:
        return
    from mmengine.runner.checkpoint import CheckpointLoader

    safe = [HistoryBuffer, np.ndarray, np.dtype, _np_multiarray._reconstruct, _np_multiarray.scalar]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    torch.serialization.add_safe_globals(safe)
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)
    _installed = True
