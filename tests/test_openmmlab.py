"""mmswin backbones from mmdet and mmseg configs, through custom_imports and the registry scope."""
import textwrap

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import mmswin
from mmswin.models import SwinTransformer, SwinTransformerV2

BACKBONE = "dict(type='mmswin.{cls}', embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))"


def test_mmengine_root_registry_builds_mmswin_models():
    assert MODELS.build(dict(type='mmswin.SwinTransformer', embed_dims=24, depths=(2, 2, 2, 2),
                             num_heads=(1, 2, 4, 8))).__class__ is SwinTransformer
    from mmswin.registry import MODELS as MMSWIN_MODELS
    assert MMSWIN_MODELS.scope == 'mmswin' and MMSWIN_MODELS.parent is MODELS
    assert MMSWIN_MODELS.get('SwinTransformerV2') is SwinTransformerV2


def test_model_code_imports_neither_mmdet_nor_mmseg():
    import subprocess
    import sys
    code = ('import sys, mmswin; from mmswin.checkpoint import load_pretrained; '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("mmdet", "mmseg", "mmcv")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=str(__import__('pathlib').Path(mmswin.__file__).parents[1]))
    assert out.stdout.strip() == '[]'


def _config(tmp_path, text: str) -> Config:
    path = tmp_path / 'cfg.py'
    path.write_text(textwrap.dedent(text))
    return Config.fromfile(str(path))


@pytest.mark.parametrize('cls', ['SwinTransformer', 'SwinTransformerV2'])
def test_mmdet_mask_rcnn_config(tmp_path, cls):
    cfg = _config(tmp_path, f"""
        _base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']
        custom_imports = dict(imports=['mmswin'], allow_failed_imports=False)
        model = dict(backbone=dict(_delete_=True, **{BACKBONE.format(cls=cls)}),
                     neck=dict(in_channels=[24, 48, 96, 192]))
    """)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS as MMDET_MODELS
    detector = MMDET_MODELS.build(cfg.model)
    assert type(detector.backbone).__name__ == cls
    feats = detector.extract_feat(torch.randn(1, 3, 97, 131))
    assert [f.shape[1] for f in feats] == [256] * 5
    assert feats[0].shape[-2:] == (25, 33)


@pytest.mark.parametrize('cls', ['SwinTransformer', 'SwinTransformerV2'])
def test_mmseg_upernet_config(tmp_path, cls):
    cfg = _config(tmp_path, f"""
        _base_ = ['mmseg::_base_/models/upernet_swin.py']
        custom_imports = dict(imports=['mmswin'], allow_failed_imports=False)
        norm_cfg = dict(type='BN', requires_grad=True)
        model = dict(data_preprocessor=None,
                     backbone=dict(_delete_=True, **{BACKBONE.format(cls=cls)}),
                     decode_head=dict(in_channels=[24, 48, 96, 192], channels=32, num_classes=5, norm_cfg=norm_cfg),
                     auxiliary_head=dict(in_channels=96, channels=16, num_classes=5, norm_cfg=norm_cfg))
    """)
    init_default_scope('mmseg')
    from mmseg.registry import MODELS as MMSEG_MODELS
    segmentor = MMSEG_MODELS.build(cfg.model)
    assert type(segmentor.backbone).__name__ == cls
    logits = segmentor(torch.randn(2, 3, 64, 96), mode='tensor')
    assert logits.shape == (2, 5, 16, 24)


def _runner_at(iteration: int, epoch: int = 0, hooks: tuple = ()) -> object:
    """What RNGStateHook reads of a runner: its position and hooks."""
    from types import SimpleNamespace
    return SimpleNamespace(iter=iteration, epoch=epoch, hooks=list(hooks), max_iters=100)


def _warnings(monkeypatch) -> list:
    from mmengine.logging import MMLogger

    messages = []
    logger = MMLogger.get_current_instance()
    monkeypatch.setattr(logger, 'log', lambda level, msg, *a, **k: messages.append((level, msg)))
    monkeypatch.setattr(logger, 'warning', lambda msg, *a, **k: messages.append((30, msg)))
    return messages


def test_rng_state_hook_restores_torch_state_and_skips_another_cuda_count(monkeypatch):
    """Resumed with fewer CUDA devices than the run that saved: torch's CPU state is restored, the CUDA
    states are left alone with a warning instead of failing inside ``set_rng_state_all``."""
    from mmswin.engine.rng_state_hook import KEY, RNGStateHook

    hook, checkpoint = RNGStateHook(), {}
    torch.manual_seed(5)
    hook.before_save_checkpoint(_runner_at(2), checkpoint)
    expected = torch.rand(3)
    checkpoint[KEY]['cuda'] = [torch.zeros(16, dtype=torch.uint8)] * 2
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: pytest.fail('CUDA states set'))
    messages = _warnings(monkeypatch)
    hook.after_load_checkpoint(_runner_at(2), checkpoint)
    torch.manual_seed(6)  # Runner.resume seeds anew after loading the checkpoint
    hook.before_train(_runner_at(2))
    assert torch.equal(torch.rand(3), expected)
    assert any('random state of 2 CUDA devices' in msg and 'sees 1' in msg for _, msg in messages), messages


def test_rng_state_hook_restores_on_resume_only(monkeypatch):
    """mmengine calls after_load_checkpoint for load_from too: fine-tuning or testing from a checkpoint keeps the
    new run's seed and warns of nothing; a resume gets the saved stream even where mmengine seeds again after
    loading (configs without a fixed seed reseed with the checkpoint's seed)."""
    from mmswin.engine.rng_state_hook import RNGStateHook

    checkpoint = {}
    torch.manual_seed(5)
    RNGStateHook().before_save_checkpoint(_runner_at(2), checkpoint)
    saved_stream = torch.rand(3)
    messages = _warnings(monkeypatch)

    hook = RNGStateHook()
    hook.after_load_checkpoint(_runner_at(0), checkpoint)  # load_from: the loop starts at iteration 0
    torch.manual_seed(1)
    own_stream = torch.rand(3)
    torch.manual_seed(1)
    hook.before_train(_runner_at(0))
    assert torch.equal(torch.rand(3), own_stream)
    hook.after_load_checkpoint(_runner_at(0), {})  # a checkpoint without the state, for testing
    hook.before_train(_runner_at(0))
    assert messages == []

    hook.after_load_checkpoint(_runner_at(2), checkpoint)  # resume; then mmengine seeds with the file's seed
    torch.manual_seed(7)
    hook.before_train(_runner_at(2))
    assert torch.equal(torch.rand(3), saved_stream)
    hook.after_load_checkpoint(_runner_at(2), {})
    hook.before_train(_runner_at(2))
    assert [msg for _, msg in messages] == ['The checkpoint has no random state: the resumed run will not repeat '
                                            'the original']


def test_rng_state_hook_keeps_validation_out_of_the_training_stream():
    """Validation follows a checkpoint and its data loaders draw from torch's generator: the training stream
    continues as if it had not run, so a run resumed from that checkpoint continues as the original did; a best
    checkpoint saved during validation holds the training stream's state."""
    from mmswin.engine.rng_state_hook import KEY, RNGStateHook

    hook, runner = RNGStateHook(), _runner_at(4)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    hook.before_val(runner)
    torch.rand(100)  # the validation's draws
    best = {}
    hook.before_save_checkpoint(runner, best)
    hook.after_val(runner)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(best[KEY]['torch'], before)


def test_rng_state_hook_saves_and_restores_the_cuda_states(monkeypatch):
    """Once CUDA is in use its generators' states are saved and, on as many devices, restored."""
    from mmswin.engine.rng_state_hook import KEY, RNGStateHook

    states, restored = [torch.arange(16, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: states)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.append)
    hook, checkpoint = RNGStateHook(), {}
    hook.before_save_checkpoint(_runner_at(2), checkpoint)
    assert checkpoint[KEY]['cuda'] == states
    hook.after_load_checkpoint(_runner_at(2), checkpoint)
    hook.before_train(_runner_at(2))
    assert restored == [states]


def test_rng_state_hook_restores_nothing_with_another_number_of_processes(monkeypatch):
    """A checkpoint of 2 processes resumed by 1: the saved states belong to other processes' streams."""
    from mmswin.engine.rng_state_hook import KEY, RNGStateHook

    torch.manual_seed(0)
    saved = torch.get_rng_state()
    checkpoint = {KEY: dict(torch=saved, world_size=2, ranks=[dict(torch=saved), dict(torch=saved)])}
    messages = _warnings(monkeypatch)
    hook = RNGStateHook()
    hook.after_load_checkpoint(_runner_at(2), checkpoint)
    torch.manual_seed(1)
    own = torch.get_rng_state()
    hook.before_train(_runner_at(2))
    assert torch.equal(torch.get_rng_state(), own)
    assert [msg for _, msg in messages] == ['The checkpoint holds the random states of 2 processes and this run has '
                                            '1 processes: the random state is not restored']


def test_rng_state_hook_runs_before_the_checkpoint_hook():
    """It gathers the processes' states in the same after_train_iter in which CheckpointHook saves them."""
    from mmengine.hooks import CheckpointHook
    from mmengine.runner.priority import get_priority

    from mmswin.engine.rng_state_hook import RNGStateHook
    assert get_priority(RNGStateHook.priority) < get_priority(CheckpointHook.priority)


def test_rng_state_hook_gathers_the_processes_states_for_every_save(monkeypatch):
    """Epoch- and iteration-based checkpoints, the last one (save_last) and best ones hold every process's state;
    a save at another position than the last gathering holds none (they would be stale)."""
    from mmengine.hooks import CheckpointHook

    from mmswin.engine import rng_state_hook
    monkeypatch.setattr(rng_state_hook, 'get_world_size', lambda: 2)
    monkeypatch.setattr(rng_state_hook, 'all_gather_object', lambda state: [state, dict(torch=torch.zeros(2))])

    def ranks_saved(checkpoint_hook: CheckpointHook, iteration: int, epoch: int, event) -> bool:
        hook, runner = rng_state_hook.RNGStateHook(), _runner_at(iteration, epoch, hooks=(checkpoint_hook,))
        runner.max_epochs = 3
        event(hook, runner)
        checkpoint = {}
        hook.before_save_checkpoint(runner, checkpoint)
        return 'ranks' in checkpoint[rng_state_hook.KEY]

    every_epoch = CheckpointHook(interval=1, by_epoch=True)
    assert ranks_saved(every_epoch, 5, 0, lambda hook, runner: hook.after_train_epoch(runner))
    last = CheckpointHook(interval=7, by_epoch=False, save_last=True)  # the 100th iteration is not a 7th
    assert ranks_saved(last, 99, 0, lambda hook, runner: hook.after_train_iter(runner, batch_idx=99))
    every_4 = CheckpointHook(interval=4, by_epoch=False)
    assert ranks_saved(every_4, 3, 0, lambda hook, runner: hook.after_train_iter(runner, batch_idx=3))
    assert not ranks_saved(every_4, 4, 0, lambda hook, runner: hook.after_train_iter(runner, batch_idx=4))
    best = CheckpointHook(interval=4, by_epoch=False, save_best='auto')
    assert ranks_saved(best, 5, 0, lambda hook, runner: hook.before_val(runner))

    hook = rng_state_hook.RNGStateHook()
    hook.after_train_iter(_runner_at(3, hooks=(every_4,)), batch_idx=3)  # gathered for a save at iteration 4
    stale, fresh = {}, {}
    hook.before_save_checkpoint(_runner_at(7), stale)
    hook.before_save_checkpoint(_runner_at(3), fresh)
    assert 'ranks' not in stale[rng_state_hook.KEY] and len(fresh[rng_state_hook.KEY]['ranks']) == 2
