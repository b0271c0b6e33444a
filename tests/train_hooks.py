"""Hooks for tests: an interrupted run, a record of every training iteration's lr and loss, and a record of
every validation or test prediction."""
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class KillAtIterHook(Hook):
    """SIGKILLs the process after ``kill_after`` training iterations (no clean-up of any kind)."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module(force=True)
class RecordLossHook(Hook):
    """Appends ``iteration, lr, loss`` of every training iteration to ``path`` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        import json
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(iter=runner.iter + 1, lr=lr, loss=float(outputs['loss']))) + '\n')


@HOOKS.register_module(force=True)
class RecordPredictionsHook(Hook):
    """Saves what the detector predicted for every image of a validation or test run to ``path`` (``torch.save``
    of one dict per image, in loading order: ``img_id`` and the predicted ``bboxes``, ``scores``, ``labels``
    and ``masks``). A later validation overwrites the file. ``{rank}`` in ``path`` becomes the process's rank."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records = []

    def _record(self, outputs) -> None:
        for sample in outputs:
            pred = sample.pred_instances
            self.records.append(dict(img_id=sample.img_id, **{k: pred[k].detach().cpu() for k in pred.keys()}))

    def _save(self) -> None:
        import torch
        from mmengine.dist import get_rank
        torch.save(self.records, self.path.format(rank=get_rank()))
        self.records = []

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._record(outputs)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._record(outputs)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._save()

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._save()
