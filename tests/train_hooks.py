"""Training hooks for tests: an interrupted run, and a record of every iteration's lr and loss."""
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
