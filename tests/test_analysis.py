"""FLOP counting agrees with the Swin papers' tables; the get_flops tool reports them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmswin.analysis import backbone_flops
from mmswin.models import SwinTransformer, SwinTransformerV2

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('cls,arch,size,paper_gflops', [
    (SwinTransformer, 'tiny', 224, 4.5),  # Swin paper, Table 1
    (SwinTransformer, 'small', 224, 8.7),
    (SwinTransformerV2, 'tiny', 256, 5.9),  # SwinV2 model zoo, window 8
])
def test_backbone_flops_match_published(cls, arch, size, paper_gflops):
    kwargs = dict(window_size=8) if cls is SwinTransformerV2 else {}
    gflops = backbone_flops(cls(arch=arch, **kwargs), size, size) / 1e9
    assert gflops == pytest.approx(paper_gflops, abs=0.1)


def test_get_flops_tool_on_a_config():
    cfg = ROOT / 'configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
    out = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/get_flops.py'), str(cfg), '--json',
                          '--shape', '256', '256'], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['input_shape'] == [1, 3, 256, 256]
    assert result['params'] == pytest.approx(59.9e6, rel=0.01)  # UperNet Swin-T: 60M in the paper
    # the official table gives 945G at 512x2048; FLOPs scale with the area (16x smaller here)
    assert result['flops'] / 1e9 == pytest.approx(945 / 16, rel=0.05)
