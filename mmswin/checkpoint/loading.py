"""Reading checkpoints safely and loading them into an mmswin backbone."""
import math
import os
import pickle
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import nn

from .formats import FORMATS, Converted, StateDict, convert_state_dict, unwrap_checkpoint
from .download import URL_PREFIXES, download, is_store_uri, read_pavi, read_store
from .safe_unpickle import (RestrictedUnpicklingError, Source, opened, restricted_load,
                            trusted_history_buffers)

BODY = ('patch_embed.', 'layers.', 'absolute_pos_embed')  # the backbone's own weights, not its output norms
_UNSAFE_HINT = ('It can only be read by running pickled code. If you trust its source, opt in explicitly: '
                "init_cfg=dict(type='Pretrained', checkpoint=..., unsafe_load=True) or "
                '`swin2mmswin.py --unsafe-load`.')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class _Unreadable(Exception):
    """The restricted reader's failure on a file that is not a readable checkpoint."""


def _mmcls_url(filename: str) -> str:
    """The URL of an ``mmcls://<name>`` model in mmengine's model zoo (``mmcls://swin_tiny``...)."""
    from mmengine.runner.checkpoint import get_mmcls_models

    urls = get_mmcls_models()
    name = filename[len('mmcls://'):]
    if name not in urls:
        swins = ', '.join(sorted(n for n in urls if 'swin' in n))
        raise CheckpointError(f"{filename}: mmengine's mmcls model zoo has no model {name!r} (its Swins: {swins})")
    return urls[name]


def _source(filename: str) -> Source:
    """The path of ``filename`` (a URL's or an ``mmcls://`` model's download) or, for ``s3://``,
    ``petrel://`` and ``pavi://``, its contents."""
    if filename.startswith(URL_PREFIXES):
        return download(filename)
    if is_store_uri(filename):
        return read_store(filename)
    if filename.startswith('pavi://'):
        return read_pavi(filename)
    if filename.startswith('mmcls://'):
        return download(_mmcls_url(filename))
    if '://' in filename:
        raise CheckpointError(f'{filename}: {filename.split("://")[0]}:// is not a scheme this loader reads '
                              '(paths, http(s)://, s3://, petrel://, pavi:// and mmcls:// are); load the file '
                              'with load_from= or download it first')
    path = os.path.expanduser(filename)
    if os.path.isdir(path):
        raise CheckpointError(f'{filename} is a directory, not a checkpoint file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    return path


def read_checkpoint(filename: str, map_location: str = 'cpu', unsafe_load: bool = False) -> object:
    """Loads a checkpoint file, URL, ``s3://`` / ``petrel://`` / ``pavi://`` file or ``mmcls://`` model
    without executing pickled code.

    ``torch.load(weights_only=True)`` first; files written by mmengine training runs go through a
    restricted unpickler that accepts only the globals such files contain. Arbitrary pickles are read
    only with ``unsafe_load=True``.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is not a readable checkpoint, or needs ``unsafe_load``.
    """
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path or URL, got {filename!r}')
    if type(unsafe_load) is not bool:
        raise TypeError(f'unsafe_load must be True or False, got {unsafe_load!r}')
    filename = os.fspath(filename)
    source = _source(filename)
    try:
        return _load(source, map_location, unsafe_load)
    except CheckpointError:
        raise
    except RestrictedUnpicklingError as error:
        raise CheckpointError(f'{filename}: refused to unpickle {error}. {_UNSAFE_HINT}') from error
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever reading a damaged file raised (EOFError, struct.error,
        # LookupError for a mangled string encoding...), reported with the file's name
        if 'map_location' in str(error):  # e.g. CUDA tensors on a machine without CUDA
            raise CheckpointError(f'{filename} cannot be read with map_location={map_location!r}: '
                                  f'{error}') from error
        raise CheckpointError(f'{filename} is not a readable checkpoint (truncated or corrupt?): '
                              f'{str(error) or type(error).__name__}') from error


def _load(source: Source, map_location: str, unsafe_load: bool) -> object:
    """:func:`read_checkpoint`'s reading of ``source``, its errors not yet naming the file."""
    if unsafe_load:
        with trusted_history_buffers():
            return torch.load(opened(source), map_location=map_location, weights_only=False)
    try:
        return torch.load(opened(source), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as safe_error:
        try:
            return restricted_load(source, map_location=map_location)
        except RestrictedUnpicklingError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the restricted reader met, the file is unreadable
            raise _Unreadable(str(error) or type(error).__name__) from safe_error


def _resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Bicubic resize of a ``(S1 * S1, nH)`` relative position bias table to ``rows = S2 * S2``,
    the official loader's rule."""
    s1, s2 = math.isqrt(table.shape[0]), math.isqrt(rows)
    heads = table.shape[1]
    grid = table.t().reshape(1, heads, s1, s1).float()
    grid = F.interpolate(grid, size=(s2, s2), mode='bicubic')
    return grid.reshape(heads, rows).t().to(table.dtype)


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def adapt_to_model(converted: Converted, target: Dict[str, torch.Tensor],
                   source: str) -> Tuple[StateDict, List[str], List[str]]:
    """Fits converted weights to a model's state dict.

    Resizes relative position bias tables and absolute position embeddings whose size differs (other
    window or pre-training size). Raises :class:`CheckpointError` naming ``source``, the format and the
    first key whose shape cannot be fitted.

    Returns:
        ``(state_dict, resized_keys, unused_keys)``.
    """
    out, resized, unused = {}, [], []
    fmt = converted.source_format
    for key, value in converted.state_dict.items():
        if key not in target:
            unused.append(key)
            continue
        if (not isinstance(value, torch.Tensor) or value.is_meta or value.is_complex()
                or value.layout != torch.strided or value.is_nested
                or value.is_floating_point() != target[key].is_floating_point()):
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else (
                f'{value.dtype} on {value.device}' if value.layout == torch.strided and not value.is_nested
                else f'{"nested" if value.is_nested else value.layout} tensor')
            raise CheckpointError(f'{source} ({fmt} format): {key} is a {kind}, not a tensor of values the model '
                                  f'can take ({target[key].dtype})')
        want = target[key].shape
        if value.shape != want:
            if (key.endswith('relative_position_bias_table') and value.ndim == 2 and len(want) == 2
                    and value.shape[1] == want[1] and _is_square(value.shape[0]) and _is_square(want[0])):
                value = _resize_bias_table(value, want[0])
            elif key == 'absolute_pos_embed' and value.ndim == 4 and value.shape[:2] == want[:2]:
                value = F.interpolate(value.float(), size=tuple(want[2:]), mode='bicubic').to(value.dtype)
            elif (key == 'absolute_pos_embed' and value.ndim == 3 and len(want) == 4 and value.shape[0] == 1
                  and value.shape[2] == want[1]):
                # (1, L, C) of a grid that is not square: the model's grid, if it has L positions
                if value.shape[1] != want[2] * want[3]:
                    raise CheckpointError(
                        f'{source} ({fmt} format): absolute_pos_embed has {value.shape[1]} positions, not a square '
                        f'grid, and the model has {want[2]}x{want[3]}: set pretrain_img_size to the size the '
                        f'checkpoint was trained at')
                out[key] = value.transpose(1, 2).reshape(want)
                continue
            else:
                raise CheckpointError(
                    f'{source} ({fmt} format, Swin V{converted.version}) does not fit the model: '
                    f'{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(want)} in the model')
            resized.append(key)
        out[key] = value
    return out, resized, unused


def _listing(keys: List[str], limit: int = 12) -> str:
    shown = ', '.join(keys[:limit])
    return shown if len(keys) <= limit else f'{shown} ... ({len(keys)} in all)'


def load_pretrained(model: nn.Module, filename: str, prefix: Optional[str] = None,
                    map_location: str = 'cpu', unsafe_load: bool = False) -> Dict[str, List[str]]:
    """Loads a Swin checkpoint of any supported format into an mmswin backbone, all or nothing.

    Args:
        model: A ``SwinTransformer`` or ``SwinTransformerV2``.
        filename: Path or URL.
        prefix: Key prefix of the backbone in the file (default: ``backbone.`` if present).
        map_location: Passed to ``torch.load``.
        unsafe_load: Allow arbitrary pickles (trusted files only).

    Returns:
        ``{'resized', 'unused', 'initialised'}`` key lists, as also logged.

    Raises:
        CheckpointError: Unreadable file, not a Swin, other version or size, or no weights of the
            model's body in it. The model is left untouched.
    """
    obj = read_checkpoint(filename, map_location=map_location, unsafe_load=unsafe_load)
    try:
        sd, meta = unwrap_checkpoint(obj)
        converted = convert_state_dict(sd, meta, prefix=prefix)
    except ValueError as error:
        raise CheckpointError(f'{filename}: {error}') from error
    fmt, version = converted.source_format, converted.version
    model_version = getattr(model, 'version', 1)
    if version != model_version:
        raise CheckpointError(f'{filename} holds a Swin V{version} ({fmt} format) but the model is '
                              f'{type(model).__name__} (V{model_version})')
    target = model.state_dict()
    weights, resized, unused = adapt_to_model(converted, target, filename)
    missing = [k for k in target if k not in weights]
    body_missing = [k for k in missing if k.startswith(BODY)]
    body_unused = [k for k in unused if k.startswith(BODY)]
    if not weights:
        raise CheckpointError(f'{filename} ({fmt} format): no weight of the model found in it')
    options = ('is it a model of another depth or other options (qkv biases, patch norm, an absolute position '
               'embedding)?')
    if body_unused:
        raise CheckpointError(
            f'{filename} ({fmt} format, Swin V{version}) holds {len(body_unused)} weights of the backbone that the '
            f'model has no place for, first {body_unused[0]}: {options}')
    if body_missing:
        raise CheckpointError(
            f'{filename} ({fmt} format, Swin V{version}) lacks {len(body_missing)} weights of the model, '
            f'first {body_missing[0]} of shape {tuple(target[body_missing[0]].shape)}: {options}')
    model.load_state_dict(weights, strict=False)
    print_log(f'Loaded {len(weights)} tensors from {filename} ({FORMATS[fmt]}, Swin V{version}).',
              logger='current')
    if resized:
        print_log(f'Resized to the model: {_listing(resized)}', logger='current')
    not_loaded = unused + converted.ignored
    if not_loaded:
        print_log(f'Not part of the backbone, unused: {_listing(not_loaded)}', logger='current')
    if converted.derived:
        print_log(f'Recomputed instead of loaded: {len(converted.derived)} derived buffers '
                  '(relative_position_index, relative_coords_table, attn_mask)', logger='current')
    if missing:
        print_log(f'Not in the checkpoint, kept at initialisation: {_listing(missing)}',
                  logger='current')
    return dict(resized=resized, unused=not_loaded, initialised=missing)
