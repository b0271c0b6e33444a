"""tools/model_converters/swin2mmswin.py end to end."""
import importlib.util
import os
import stat
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from mmswin.checkpoint import load_pretrained
from mmswin.models import SwinTransformer

from .conftest import DATA, SMALL, CodePayload

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'model_converters' / 'swin2mmswin.py'


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_converts_and_verifies(tmp_path):
    dst = tmp_path / 'out' / 'swin.pth'
    result = run_tool(DATA / 'v1_official_cls.pth', dst, '--verify')
    assert result.returncode == 0, result.stderr
    assert 'verify: max abs difference of the outputs 0' in result.stdout
    assert 'unverified' not in result.stdout + result.stderr  # the staged file's name is not shown
    ckpt = torch.load(dst, weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert ckpt['meta']['arch']['depths'] == [2, 2, 2, 2] and ckpt['meta']['arch']['window_size'] == [7] * 4
    model = SwinTransformer(**SMALL, convert_weights=False)
    assert load_pretrained(model, str(dst))['unused'] == []
    assert [p.name for p in dst.parent.iterdir()] == ['swin.pth']  # no temporary file left behind


def test_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / 'v2.pth'
    src.write_bytes((DATA / 'v2_official_cls.pth').read_bytes())
    before = src.read_bytes()
    result = run_tool(src, src)
    assert result.returncode == 2 and 'refusing to overwrite' in result.stderr
    assert src.read_bytes() == before


def test_bad_input_is_reported_and_nothing_written(tmp_path):
    src = tmp_path / 'notes.txt'
    src.write_text('not a checkpoint')
    dst = tmp_path / 'out.pth'
    result = run_tool(src, dst)
    assert result.returncode == 2 and 'notes.txt' in result.stderr and 'not a readable checkpoint' in result.stderr
    assert not dst.exists()


def test_unsafe_load_is_an_explicit_opt_in(tmp_path):
    marker = tmp_path / 'ran'
    src = tmp_path / 'legacy.pth'
    sd = torch.load(DATA / 'v1_official_cls.pth', weights_only=True)
    sd['extra'] = CodePayload(marker)
    torch.save(sd, src)
    refused = run_tool(src, tmp_path / 'out.pth')
    assert refused.returncode == 2 and '--unsafe-load' in refused.stderr and 'legacy.pth' in refused.stderr
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()
    accepted = run_tool(src, tmp_path / 'out.pth', '--unsafe-load')
    assert accepted.returncode == 0, accepted.stderr
    assert marker.exists() and (tmp_path / 'out.pth').exists()


def _load_tool():
    spec = importlib.util.spec_from_file_location('swin2mmswin', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()  # the converter in this process, for the cases that need no subprocess or a patch


def _partial(tmp_path: Path, name: str, drop) -> Path:
    """The golden V1 checkpoint without the keys for which ``drop(key)`` is true."""
    sd = torch.load(DATA / 'v1_official_cls.pth', weights_only=True)['model']
    path = tmp_path / name
    torch.save({k: v for k, v in sd.items() if not drop(k)}, path)
    return path


def test_missing_src_is_named_even_when_dst_exists(tmp_path, capsys):
    dst = tmp_path / 'exists.pth'
    dst.write_bytes(b'old')
    assert tool.main([str(tmp_path / 'nonexist.pth'), str(dst)]) == 2
    err = capsys.readouterr().err
    assert 'error: SRC' in err and 'nonexist.pth' in err and 'no such file' in err and 'Traceback' not in err
    assert dst.read_bytes() == b'old'
    assert tool.main([str(tmp_path), str(tmp_path / 'out.pth')]) == 2  # SRC a directory
    assert 'error: SRC' in capsys.readouterr().err and not (tmp_path / 'out.pth').exists()


def test_missing_local_src_is_not_a_failed_download(tmp_path):
    from mmswin.checkpoint.convert import convert_checkpoint
    with pytest.raises(FileNotFoundError, match='nonexist.pth'):
        convert_checkpoint(str(tmp_path / 'nonexist.pth'))


def test_missing_src_in_a_subprocess_is_not_a_traceback(tmp_path):
    dst = tmp_path / 'exists.pth'
    dst.write_bytes(b'old')
    result = run_tool('nonexist.pth', dst)
    assert result.returncode == 2 and 'error: SRC nonexist.pth' in result.stderr
    assert 'Traceback' not in result.stderr and dst.read_bytes() == b'old'


def test_unwritable_dst_is_an_error_and_nothing_is_written(tmp_path, capsys):
    src = str(DATA / 'v1_official_cls.pth')
    folder = tmp_path / 'adir'
    folder.mkdir()
    a_file = tmp_path / 'afile'
    a_file.write_text('x')
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    cases = {str(folder): 'is a directory', str(folder) + os.sep: 'is a directory', '': 'DST is empty',
             str(a_file / 'x.pth'): 'is not a directory', str(a_file / 'sub' / 'x.pth'): 'is not a directory',
             str(fifo): 'not a regular file'}
    for dst, reason in cases.items():
        assert tool.main([src, dst]) == 2, dst
        err = capsys.readouterr().err
        assert err.startswith('error: DST') and reason in err and 'Traceback' not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['adir', 'afile', 'fifo'] and not any(folder.iterdir())
    assert a_file.read_text() == 'x'


def test_write_failure_is_reported_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', fail)
    dst = tmp_path / 'new' / 'out.pth'
    assert tool.main([str(DATA / 'v1_official_cls.pth'), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: DST {dst} cannot be written') and 'No space left' in err
    assert list(tmp_path.iterdir()) == []  # neither the file, its temporary, nor the folder made for it


def test_verify_compares_the_converted_file_with_the_source(tmp_path, capsys, monkeypatch):
    """A conversion that changed one weight is caught by the real verification, not only a faked one."""
    convert = tool.convert_checkpoint

    def one_weight_off(*args, **kwargs):
        ckpt = convert(*args, **kwargs)
        ckpt['state_dict']['layers.1.blocks.0.mlp.fc1.weight'] += 0.1
        return ckpt

    monkeypatch.setattr(tool, 'convert_checkpoint', one_weight_off)
    dst = tmp_path / 'swin.pth'
    assert tool.main([str(DATA / 'v1_official_cls.pth'), str(dst), '--verify']) == 1
    assert 'gives different outputs (max abs difference ' in capsys.readouterr().err
    assert not dst.exists()


def test_failed_verification_writes_nothing_and_keeps_dst(tmp_path, capsys, monkeypatch):
    src = str(DATA / 'v1_official_cls.pth')
    seen = []

    def differs(src, staged, *args):
        seen.append((staged, os.path.exists(staged), dst.exists() and dst.read_bytes()))
        return 0.5

    def crashes(*args):
        raise RuntimeError('boom')

    for existing in (None, b'old'):
        dst = tmp_path / 'out' / 'swin.pth'
        if existing is not None:
            dst.parent.mkdir()
            dst.write_bytes(existing)
        for fake, message in ((differs, 'gives different outputs (max abs difference 0.5)'),
                              (crashes, 'could not verify the converted checkpoint: RuntimeError: boom')):
            monkeypatch.setattr(tool, 'verify', fake)
            assert tool.main([src, str(dst), '--verify']) == 1
            err = capsys.readouterr().err
            assert message in err and ('left as it was' if existing else 'not written') in err, err
            if existing is None:
                assert not tmp_path.joinpath('out').exists()  # nor the folder made for it
            else:
                assert dst.read_bytes() == existing and [p.name for p in dst.parent.iterdir()] == ['swin.pth']
    # verification ran on the complete converted file beside DST, before DST was touched
    assert [(os.path.dirname(s), exists, before) for s, exists, before in seen] == \
        [(str(tmp_path / 'out'), True, False), (str(tmp_path / 'out'), True, b'old')]


def test_verified_dst_gets_the_permissions_of_a_plain_write(tmp_path, capsys):
    src = str(DATA / 'v1_official_cls.pth')
    umask = os.umask(0o022)
    os.umask(umask)
    dst = tmp_path / 'new.pth'
    assert tool.main([src, str(dst), '--verify']) == 0, capsys.readouterr().err
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~umask
    dst.write_bytes(b'old')
    dst.chmod(0o640)
    assert tool.main([src, str(dst), '--verify']) == 0, capsys.readouterr().err
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert set(torch.load(dst, weights_only=True)) == {'state_dict', 'meta'}
    assert [p.name for p in tmp_path.iterdir()] == ['new.pth']


@pytest.mark.parametrize('flags', [[], ['--verify']])
def test_dst_that_is_a_symbolic_link_stays_one(tmp_path, capsys, flags):
    """The link is kept and the file it points to replaced, with or without verification."""
    target, link = tmp_path / 'v3.pth', tmp_path / 'latest.pth'
    target.write_bytes(b'old')
    link.symlink_to(target.name)
    assert tool.main([str(DATA / 'v1_official_cls.pth'), str(link), *flags]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == 'v3.pth'
    assert set(torch.load(target, weights_only=True)) == {'state_dict', 'meta'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['latest.pth', 'v3.pth']


def test_verify_passes_on_a_checkpoint_of_two_stages(tmp_path, capsys):
    later = ('layers.2.', 'layers.3.', 'layers.1.downsample.')
    src = _partial(tmp_path, 'two_stages.pth', lambda k: k.startswith(later))
    dst = tmp_path / 'two.pth'
    assert tool.main([str(src), str(dst), '--verify']) == 0, capsys.readouterr().err
    assert 'verify: max abs difference of the outputs 0' in capsys.readouterr().out
    arch = torch.load(dst, weights_only=True)['meta']['arch']
    assert arch['depths'] == [2, 2] and arch['out_indices'] == [0, 1]
    model = SwinTransformer(**arch)
    assert load_pretrained(model, str(dst))['unused'] == []
    assert [tuple(o.shape) for o in model(torch.zeros(1, 3, 64, 64))] == [(1, 24, 16, 16), (1, 48, 8, 8)]


def test_failed_download_names_the_url(tmp_path, capsys, monkeypatch):
    url = 'https://example.invalid/models/swin_tiny.pth'

    def refuse(request, *args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, 'Connection refused'))

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))  # nothing cached under the URL's name
    monkeypatch.setattr(urllib.request, 'urlopen', refuse)
    assert tool.main([url, str(tmp_path / 'out.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: could not download {url}') and 'Connection refused' in err, err
    assert not (tmp_path / 'out.pth').exists()


def test_failed_download_in_a_subprocess(tmp_path):
    url = 'http://127.0.0.1:9/x.pth'  # the discard port: refused at once, no network needed
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_HOME=str(tmp_path / 'hub'))
    result = subprocess.run([sys.executable, str(TOOL), url, str(tmp_path / 'out.pth')], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert result.returncode == 2 and f'error: could not download {url}' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('name,drop,missing', [
    ('no_patch_embed', lambda k: k == 'patch_embed.proj.weight', 'patch_embed.proj.weight'),
    ('no_fc2', lambda k: k == 'layers.1.blocks.1.mlp.fc2.weight', 'layers.1.blocks.1.mlp.fc2.weight'),
    ('no_tables', lambda k: k.endswith('relative_position_bias_table'),
     'layers.0.blocks.0.attn.relative_position_bias_table'),
    ('no_merge', lambda k: k.startswith('layers.1.downsample.'), 'layers.1.downsample.'),
    ('no_last_stage', lambda k: k.startswith('layers.3.'), 'layers.3.blocks.0.*'),
    ('no_block', lambda k: k.startswith('layers.2.blocks.0.'), 'layers.2.blocks.0.'),
    ('no_merges', lambda k: '.downsample.' in k, 'layers.0.downsample.reduction.weight'),
])
def test_partial_checkpoint_names_the_missing_key(tmp_path, capsys, name, drop, missing):
    src = _partial(tmp_path, f'{name}.pth', drop)
    dst = tmp_path / 'out.pth'
    assert tool.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f'{name}.pth (official format, Swin V1) looks incomplete: the backbone key {missing}' in err, err
    assert 'is missing' in err and not dst.exists()


def test_prefix_matching_nothing_shows_the_first_keys(tmp_path, capsys):
    dst = tmp_path / 'out.pth'
    assert tool.main([str(DATA / 'v1_official_cls.pth'), str(dst), '--prefix', 'backbone']) == 2
    err = capsys.readouterr().err
    assert "no key starts with the prefix 'backbone'" in err and '(first keys: patch_embed.proj.weight, ' in err
    assert not dst.exists()


def test_converts_from_a_store(tmp_path, capsys, store):
    """SRC may be an s3:// or petrel:// file, read through mmengine's storage backend."""
    store['s3://bucket/swin.pth'] = (DATA / 'v1_official_cls.pth').read_bytes()
    dst = tmp_path / 'swin.pth'
    assert tool.main(['s3://bucket/swin.pth', str(dst), '--verify']) == 0, capsys.readouterr().err
    assert 'verify: max abs difference of the outputs 0' in capsys.readouterr().out
    assert load_pretrained(SwinTransformer(**SMALL, convert_weights=False), str(dst))['unused'] == []


def test_scheme_it_cannot_read_is_named(tmp_path, capsys):
    assert tool.main(['open-mmlab://resnet50', str(tmp_path / 'out.pth')]) == 2
    assert 'error: open-mmlab://resnet50: open-mmlab:// is not a scheme this loader reads' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
