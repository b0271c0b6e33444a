"""Checkpoint formats, conversion and safe loading."""
from .formats import (FORMATS, Converted, convert_state_dict, detect_format, merge_official_to_unfold,
                      merge_unfold_to_official, unwrap_checkpoint)
from .loading import CheckpointError, load_pretrained, read_checkpoint
from .safe_unpickle import RestrictedUnpicklingError, install, restricted_load, safe_load

__all__ = [
    'FORMATS', 'Converted', 'convert_state_dict', 'detect_format', 'merge_official_to_unfold',
    'merge_unfold_to_official', 'unwrap_checkpoint', 'CheckpointError', 'load_pretrained',
    'read_checkpoint', 'RestrictedUnpicklingError', 'install', 'restricted_load', 'safe_load'
]
