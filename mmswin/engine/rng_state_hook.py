"""Resuming with the random stream of the interrupted run, so that a resumed run repeats it exactly."""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from ..registry import HOOKS

KEY = 'mmswin_rng_state'


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves torch's random state (CPU, and CUDA when used) in every checkpoint and restores it on resume.

    mmengine restores weights, optimiser, schedulers and the data position when resuming, but not the
    random state that dropout, stochastic depth and the RPN/RoI samplers draw from, so a resumed run
    diverges from the run it continues. With this hook a run resumed on the same device with the same
    seed continues with the same losses. The numpy/python state used by data augmentation is not
    restored: mmengine's iteration-based loop replays the skipped batches through the pipeline, which
    brings it to the same point by itself.
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint[KEY] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # mmengine calls this when resuming only; load_from (weights only) keeps the new run's seed.
        state: Optional[dict] = checkpoint.get(KEY)
        if state is None:
            print_log('The checkpoint has no random state: the resumed run will not repeat the original',
                      logger='current', level=30)
            return
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            if len(state['cuda']) != torch.cuda.device_count():
                print_log(f"The checkpoint holds the random state of {len(state['cuda'])} CUDA devices and this "
                          f'process sees {torch.cuda.device_count()}: their random state is not restored',
                          logger='current', level=30)
                return
            torch.cuda.set_rng_state_all(state['cuda'])
