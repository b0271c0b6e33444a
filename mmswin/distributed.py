"""Distributed training on CPUs with torchrun.

mmengine 0.10.7 cannot distribute a run on a machine without CUDA: it initialises a ``torchrun``
(``launcher='pytorch'``) process group by first calling ``torch.cuda.set_device``, and wraps the model in
DDP with ``device_ids=[LOCAL_RANK]``, which DDP rejects for a CPU model, as it rejects SyncBN layers
(the UperNet and Cascade Mask R-CNN heads have them). :func:`install` (run by ``import mmswin``, i.e.
through a config's ``custom_imports``) initialises such runs with gloo and wraps CPU models without device
ids, their SyncBN layers made plain BN (statistics of each process's own batch), as mmengine does for runs
that are not distributed; runs with CUDA are left to mmengine as they are.
"""
import functools

import torch
import torch.distributed as torch_dist
from mmengine.dist import utils as dist_utils
from mmengine.logging import print_log
from mmengine.model import revert_sync_batchnorm
from mmengine.model.wrappers import MMDistributedDataParallel

_original_init_dist_pytorch = dist_utils._init_dist_pytorch


def _init_dist_pytorch(backend: str = 'nccl', init_backend: str = 'torch', **kwargs) -> None:
    if torch.cuda.is_available() or init_backend != 'torch':
        return _original_init_dist_pytorch(backend, init_backend=init_backend, **kwargs)
    # nccl needs GPUs: on a CPU-only machine the only sensible backend is gloo
    torch_dist.init_process_group(backend='gloo' if backend == 'nccl' else backend, **kwargs)


_original_ddp_init = MMDistributedDataParallel.__init__


@functools.wraps(_original_ddp_init)
def _ddp_init(self, module, detect_anomalous_params: bool = False, **kwargs) -> None:
    if all(p.device.type == 'cpu' for p in module.parameters()):
        if kwargs.get('device_ids'):
            kwargs['device_ids'] = None  # DDP's way of saying "a CPU module"
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
            module = revert_sync_batchnorm(module)
            print_log('SyncBN needs GPUs: on the CPU its layers are plain BN, with the statistics of each '
                      "process's own batch", logger='current', level=30)
    _original_ddp_init(self, module, detect_anomalous_params=detect_anomalous_params, **kwargs)


def install() -> None:
    """Lets mmengine's distributed runs work on CPU-only machines (idempotent)."""
    dist_utils._init_dist_pytorch = _init_dist_pytorch
    MMDistributedDataParallel.__init__ = _ddp_init
