"""tools/model_converters/swin2mmswin.py end to end."""
import os
import subprocess
import sys
from pathlib import Path

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
