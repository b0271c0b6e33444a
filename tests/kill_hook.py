"""A training hook that kills its own process at a given iteration: an interrupted run, for tests."""
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
