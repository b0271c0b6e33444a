"""tools/train.py and tools/test.py: the options of mmdet's and mmseg's tools, and clear argument errors."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from mmengine.config import Config

from mmswin.runner import enable_test_time_augmentation, enable_visualization, prepare_config

ROOT = Path(__file__).resolve().parents[1]
DET_CFG = ROOT / 'configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py'
SEG_CFG = ROOT / 'configs/demo/swin-demo_upernet_demo-shapes-128x128.py'


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argument_error(capsys, fn, argv: list, pattern: str) -> None:
    with pytest.raises(SystemExit) as info:
        fn([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert pattern in err, err


def test_bad_config_and_checkpoint_arguments(tmp_path, capsys):
    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    notes = tmp_path / 'notes.txt'
    notes.write_text('x')
    train, test = tool('train').main, tool('test').main
    argument_error(capsys, train, [tmp_path / 'missing.py'], 'missing.py: no such file')
    argument_error(capsys, train, [tmp_path], 'a directory, not a config file')
    argument_error(capsys, train, [notes], 'notes.txt: a config file ends with one of .py, .json, .yaml, .yml')
    argument_error(capsys, train, [DET_CFG, '--cfg-options', 'foo'], '--cfg-options takes KEY=VALUE pairs')
    argument_error(capsys, train, [DET_CFG, '--cfg-options', 'a=[1,2'], "got 'a=[1,2'")
    argument_error(capsys, test, [DET_CFG, tmp_path / 'nothing.pth'],
                   f'checkpoint {tmp_path / "nothing.pth"}: no such file')
    argument_error(capsys, test, [DET_CFG, tmp_path], 'a directory, not a checkpoint file')
    out_error = '--out ' + str(tmp_path / 'res.json') + ': detection predictions are dumped to a .pkl'
    argument_error(capsys, test, [DET_CFG, ckpt, '--out', tmp_path / 'res.json'], out_error)
    argument_error(capsys, test, [DET_CFG, ckpt, '--tta'], '--tta needs tta_model and tta_pipeline in the config')
    for remote in ('https://example.invalid/x.pth', 'open-mmlab://x', 's3://bucket/x.pth', 'c:s3://bucket/x.pth'):
        # left to mmengine's loaders: the next check is reached
        argument_error(capsys, test, [DET_CFG, remote, '--out', tmp_path / 'res.json'], out_error)


def test_auto_scale_lr_error_names_the_option(tmp_path, capsys):
    cfg = tmp_path / 'no_scale.py'
    cfg.write_text(f"_base_ = '{DET_CFG}'\nauto_scale_lr = None\n")
    argument_error(capsys, tool('train').main, [cfg, '--auto-scale-lr'], '--auto-scale-lr needs auto_scale_lr')


def test_custom_imports_are_kept(tmp_path):
    cfg = Config.fromfile(str(DET_CFG))
    cfg.custom_imports = dict(imports='json', allow_failed_imports=True)
    cfg = prepare_config(cfg, str(DET_CFG), work_dir=str(tmp_path))
    assert cfg.custom_imports == dict(imports=['json', 'mmswin'], allow_failed_imports=True)
    cfg.dump(str(tmp_path / 'dumped.py'))  # the work dir's copy loads again
    assert Config.fromfile(str(tmp_path / 'dumped.py')).custom_imports.imports == ['json', 'mmswin']


def test_show_dir_where_mmdet_and_mmseg_put_it(tmp_path):
    seg = enable_visualization(prepare_config(Config.fromfile(str(SEG_CFG)), str(SEG_CFG)), 'pictures')
    assert seg.visualizer.save_dir == 'pictures' and seg.default_hooks.visualization.draw
    det = enable_visualization(prepare_config(Config.fromfile(str(DET_CFG)), str(DET_CFG)), 'pictures')
    assert det.default_hooks.visualization.test_out_dir == 'pictures' and det.default_hooks.visualization.draw


def test_tta_wraps_the_model_and_replaces_the_test_pipeline():
    cfg = prepare_config(Config.fromfile(str(SEG_CFG)), str(SEG_CFG))
    model, tta_pipeline = cfg.model, cfg.tta_pipeline
    enable_test_time_augmentation(cfg)
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module == model
    assert cfg.test_dataloader.dataset.pipeline == tta_pipeline


def _configs_run(monkeypatch, module, loop: str) -> list:
    """Stubs ``module.build_runner``: the configs it would have run ``loop`` with are appended to the list."""
    built = []
    monkeypatch.setenv('LOCAL_RANK', '0')  # the tools set it where a launcher has not
    monkeypatch.setattr(module, 'build_runner',
                        lambda cfg: built.append(cfg) or SimpleNamespace(**{loop: lambda: None}))
    return built


def test_train_options_reach_the_config(tmp_path, monkeypatch):
    train = tool('train')
    built = _configs_run(monkeypatch, train, 'train')
    ckpt = tmp_path / 'iter_2.pth'
    train.main([str(DET_CFG), '--work-dir', str(tmp_path / 'work'), '--resume', str(ckpt), '--amp',
                '--auto-scale-lr', '--launcher', 'pytorch'])
    train.main([str(DET_CFG), '--resume'])
    train.main([str(DET_CFG)])
    given, auto, plain = built
    assert given.work_dir == str(tmp_path / 'work') and given.launcher == 'pytorch'
    assert given.resume is True and given.load_from == str(ckpt)
    assert given.optim_wrapper.type == 'AmpOptimWrapper' and given.optim_wrapper.loss_scale == 'dynamic'
    assert given.auto_scale_lr == dict(base_batch_size=2, enable=True)
    assert auto.resume is True and auto.load_from is None  # the latest checkpoint in the work dir
    assert plain.work_dir == './work_dirs/mask-rcnn_swin-demo_fpn_demo-shapes-128' and plain.launcher == 'none'
    assert not plain.get('resume') and plain.load_from is None
    assert plain.optim_wrapper.type == 'OptimWrapper' and plain.auto_scale_lr.get('enable', False) is False


@pytest.mark.parametrize('config,out', [(SEG_CFG, 'predictions'), (DET_CFG, 'predictions.pkl')])
def test_test_options_reach_the_config(tmp_path, monkeypatch, config, out):
    """``--out`` as mmdet's and mmseg's test.py: segmentation keeps its result maps in the folder, detection
    adds mmdet's DumpDetResults; ``--show`` shows each picture for ``--wait-time`` seconds."""
    test = tool('test')
    built = _configs_run(monkeypatch, test, 'test')
    ckpt = tmp_path / 'iter_4.pth'
    ckpt.write_bytes(b'')
    test.main([str(config), str(ckpt), '--out', out, '--show', '--wait-time', '5'])
    (cfg,) = built
    assert cfg.load_from == str(ckpt)
    assert cfg.default_hooks.visualization.show is True and cfg.default_hooks.visualization.wait_time == 5
    if config == SEG_CFG:
        assert cfg.test_evaluator.output_dir == out and cfg.test_evaluator.keep_results is True
    else:
        assert cfg.test_evaluator[0].type == 'CocoMetric'
        assert cfg.test_evaluator[1:] == [dict(type='DumpDetResults', out_file_path=out)]


def test_tta_reaches_the_dataset_inside_wrappers():
    cfg = prepare_config(Config.fromfile(str(SEG_CFG)), str(SEG_CFG))
    inner = dict(cfg.test_dataloader.dataset, batch_shapes_cfg=dict(size=64))
    cfg.test_dataloader.dataset = dict(type='RepeatDataset', times=2, dataset=inner)
    enable_test_time_augmentation(cfg)
    inner = cfg.test_dataloader.dataset.dataset
    assert inner.pipeline == cfg.tta_pipeline and inner.batch_shapes_cfg is None
    assert cfg.test_dataloader.dataset.type == 'RepeatDataset'


def test_runner_type_is_built(tmp_path, monkeypatch):
    from mmengine.registry import RUNNERS
    from mmswin import runner

    built = []
    monkeypatch.setattr(RUNNERS, 'build', lambda cfg: built.append(cfg.runner_type) or 'runner')
    cfg = Config(dict(runner_type='FlexibleRunner'))
    assert runner.build_runner(cfg) == 'runner' and built == ['FlexibleRunner']


def test_dist_scripts_print_their_usage():
    import subprocess
    for script, usage in (('dist_train.sh', 'CONFIG NUM_PROCS'), ('dist_test.sh', 'CONFIG CHECKPOINT NUM_PROCS')):
        result = subprocess.run(['bash', str(ROOT / 'tools' / script), 'only.py'], capture_output=True, text=True)
        assert result.returncode == 2 and f'usage: {ROOT / "tools" / script} {usage}' in result.stderr
