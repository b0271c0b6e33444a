"""frozen_stages, with_cp and norm_eval together under 2-process DDP (gloo, CPU)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mmswin.models import SwinTransformer, SwinTransformerV2

SMALL = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_two_processes(worker, *args) -> dict:
    """``worker(rank, 2, port, *args, out)`` in two spawned processes; what each put in ``out[rank]``."""
    ctx = mp.get_context('spawn')
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(worker, args=(2, _free_port(), *args, out), nprocs=2, join=True, start_method='spawn')
        return dict(out)


def _worker(rank: int, world: int, port: int, version: int, find_unused: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cls = SwinTransformerV2 if version == 2 else SwinTransformer
        model = cls(**SMALL, frozen_stages=1, with_cp=True, norm_eval=True, out_indices=(1, 2, 3))
        ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
        ddp.train()
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
        torch.manual_seed(100 + rank)  # each rank its own data
        for _ in range(2):
            outs = ddp(torch.randn(2, 3, 64, 80))
            loss = sum(o.square().mean() for o in outs)
            opt.zero_grad()
            loss.backward()
            opt.step()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        frozen_have_grad = any(p.grad is not None for p in model.layers[0].parameters())
        out[rank] = (grad, frozen_have_grad, model.patch_embed.training, model.norm1.training)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('version', [1, 2])
@pytest.mark.parametrize('find_unused', [False, True])
def test_ddp_with_frozen_stages_checkpointing_and_norm_eval(version, find_unused):
    results = _run_two_processes(_worker, version, find_unused)
    (g0, frozen0, pe0, n0), (g1, frozen1, _, _) = results[0], results[1]
    assert torch.equal(g0, g1)  # gradients were all-reduced, identically on both ranks
    assert g0.abs().sum() > 0
    assert not frozen0 and not frozen1  # frozen stage 0 never got a gradient
    assert not pe0 and not n0  # frozen patch embedding and (norm_eval) norms stayed in eval mode


def _rng_worker(rank: int, world: int, port: int, out: dict) -> None:
    """Saves a checkpoint's random state as a 2-process iteration-based run does (CheckpointHook every 2
    iterations; the first process writes the file), then resumes from it in the same processes."""
    from types import SimpleNamespace

    from mmengine.hooks import CheckpointHook

    from mmswin.engine.rng_state_hook import RNGStateHook

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        runner = SimpleNamespace(iter=1, epoch=0, max_iters=10, hooks=[CheckpointHook(interval=2, by_epoch=False)])
        torch.manual_seed(0)
        torch.rand(10 + 5 * rank)  # the processes' streams part (their samplers draw what their images need)
        hook = RNGStateHook()
        hook.after_train_iter(runner, batch_idx=1)  # iteration 2: CheckpointHook saves after this
        checkpoint = [{}]
        if rank == 0:
            hook.before_save_checkpoint(runner, checkpoint[0])
        continued = torch.rand(3)  # what the interrupted run draws next
        dist.broadcast_object_list(checkpoint, src=0)  # every process resumes from the one file

        resumed = RNGStateHook()
        resumed.after_load_checkpoint(runner, checkpoint[0])
        torch.manual_seed(0)  # Runner.resume seeds again
        resumed.before_train(SimpleNamespace(iter=2, epoch=0))
        out[rank] = (continued, torch.rand(3))
    finally:
        dist.destroy_process_group()


def test_rng_state_hook_resumes_each_process_with_its_own_stream():
    results = _run_two_processes(_rng_worker)
    for rank in (0, 1):
        continued, resumed = results[rank]
        assert torch.equal(resumed, continued), rank
    assert not torch.equal(results[0][0], results[1][0])  # two streams, each resumed as its own


def _syncbn_worker(rank: int, world: int, port: int, out: dict) -> None:
    """mmengine's wrapper (what its Runner builds under torchrun) around a model with SyncBN, on the CPU."""
    from mmengine.model.wrappers import MMDistributedDataParallel

    import mmswin  # noqa: F401 - what a config's custom_imports does

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4), torch.nn.ReLU())
        conv_weight, bn_weight = model[0].weight, model[1].weight
        ddp = MMDistributedDataParallel(module=model, device_ids=[rank], broadcast_buffers=False)
        torch.manual_seed(10 + rank)
        ddp(torch.randn(2, 3, 8, 8)).mean().backward()
        norm = ddp.module[1]
        out[rank] = (type(norm).__name__, norm.weight is bn_weight, ddp.module[0].weight is conv_weight,
                     norm.weight.grad.clone(), norm.running_mean.clone())
    finally:
        dist.destroy_process_group()


def test_cpu_ddp_takes_syncbn_as_bn():
    """DDP refuses SyncBN layers in a CPU module; they become BN with the same parameters (an optimiser built
    before still trains them), gradients all-reduced, statistics each process's own."""
    results = _run_two_processes(_syncbn_worker)
    for rank in (0, 1):
        name, same_norm_weight, same_conv_weight, _, _ = results[rank]
        assert name == '_BatchNormXd' and same_norm_weight and same_conv_weight
    assert torch.equal(results[0][3], results[1][3])  # gradients all-reduced
    assert not torch.equal(results[0][4], results[1][4])  # running statistics of each process's batch
