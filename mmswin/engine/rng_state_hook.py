"""Resuming with the random stream of the interrupted run, so that a resumed run repeats it exactly."""
from typing import List, Optional

import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log

from ..registry import HOOKS

KEY = 'mmswin_rng_state'
WARNING = 30


def _local_state() -> dict:
    """This process's torch random state: the CPU generator's, and every CUDA device's once CUDA is in use."""
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_local_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        if len(state['cuda']) != torch.cuda.device_count():
            print_log(f"The checkpoint holds the random state of {len(state['cuda'])} CUDA devices and this "
                      f'process sees {torch.cuda.device_count()}: their random state is not restored',
                      logger='current', level=WARNING)
            return
        torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves torch's random state (CPU, and CUDA when used) in every checkpoint and restores it on resume.

    mmengine restores weights, optimiser, schedulers and the data position when resuming, but not the
    random state that dropout, stochastic depth and the RPN/RoI samplers draw from, so a resumed run
    diverges from the run it continues. With this hook a run resumed on the same devices with the same
    seed continues with the same losses:

    * the state is restored at the start of training, after mmengine's resume (which seeds anew); a plain
      ``load_from`` (fine-tuning, testing) keeps the new run's own seed;
    * validation leaves the training stream as it found it (its data loaders draw from it), so a run that
      validates after a checkpoint continues from the state that checkpoint holds;
    * under distributed training each process's state is saved (gathered when ``CheckpointHook`` is about
      to save) and each process restores its own; with another number of processes nothing is restored.

    The numpy/python state used by data augmentation is not restored: mmengine's iteration-based loop
    replays the skipped batches through the pipeline, which brings it to the same point by itself.
    """

    # Before CheckpointHook (VERY_LOW) in the same after_train_iter / after_train_epoch: the processes' states
    # are gathered there, before the checkpoint is written by the first process alone.
    priority = 'LOW'

    def __init__(self) -> None:
        self._loaded = False  # after_load_checkpoint ran; before_train decides whether it was a resume
        self._pending: Optional[dict] = None
        self._gathered: Optional[List[dict]] = None  # every process's state at _gathered_at
        self._gathered_at: Optional[tuple] = None
        self._training_state: Optional[dict] = None  # the training stream's state while validating

    # -- saving
    @staticmethod
    def _checkpoint_hook(runner) -> Optional[CheckpointHook]:
        return next((hook for hook in runner.hooks if isinstance(hook, CheckpointHook)), None)

    def _gather(self, runner, state: dict) -> None:
        self._gathered = all_gather_object(state)
        self._gathered_at = (runner.epoch, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        hook = self._checkpoint_hook(runner)
        if get_world_size() > 1 and hook is not None and not hook.by_epoch and (
                hook.every_n_train_iters(runner, hook.interval, getattr(hook, 'save_begin', 0))
                or (hook.save_last and hook.is_last_train_iter(runner))):
            self._gather(runner, _local_state())

    def after_train_epoch(self, runner) -> None:
        hook = self._checkpoint_hook(runner)
        if get_world_size() > 1 and hook is not None and hook.by_epoch and (
                hook.every_n_epochs(runner, hook.interval, getattr(hook, 'save_begin', 0))
                or (hook.save_last and hook.is_last_train_epoch(runner))):
            self._gather(runner, _local_state())

    def before_val(self, runner) -> None:
        self._training_state = _local_state()
        hook = self._checkpoint_hook(runner)
        if get_world_size() > 1 and hook is not None and hook.save_best is not None:  # best checkpoints
            self._gather(runner, self._training_state)

    def after_val(self, runner) -> None:
        if self._training_state is not None:
            _set_local_state(self._training_state)
            self._training_state = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(self._training_state or _local_state(), world_size=get_world_size())
        if state['world_size'] > 1 and self._gathered is not None and runner is not None \
                and self._gathered_at == (runner.epoch, runner.iter):
            state['ranks'] = self._gathered
        checkpoint[KEY] = state

    # -- restoring
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # mmengine calls this for load_from and for resume alike, and a resume then seeds anew: the state is
        # kept for before_train, which knows which it was.
        self._loaded, self._pending = True, checkpoint.get(KEY)

    def before_train(self, runner) -> None:
        if not self._loaded:
            return
        state, self._loaded, self._pending = self._pending, False, None
        if runner.iter == 0 and runner.epoch == 0:  # load_from: weights only, the new run's seed stands
            return
        if state is None:
            print_log('The checkpoint has no random state: the resumed run will not repeat the original',
                      logger='current', level=WARNING)
            return
        world, saved = get_world_size(), state.get('world_size', 1)
        if world > 1 or saved > 1:
            ranks = state.get('ranks')
            if ranks is None or len(ranks) != world:
                held = (f'the random states of {len(ranks)} processes' if ranks is not None else
                        f"only the first of its {saved} processes' random states" if saved > 1 else
                        'the random state of 1 process')
                print_log(f'The checkpoint holds {held} and this run has {world} processes: the random state is '
                          'not restored', logger='current', level=WARNING)
                return
            state = ranks[get_rank()]
        _set_local_state(state)
