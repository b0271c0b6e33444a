"""The install: every installed distribution satisfies what torch, the OpenMMLab stack and mmswin require, the
scripts refuse what they cannot install, and the source distribution carries what ``setup.py`` reads."""
import importlib.metadata as metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('dist', ['mmswin', 'torch', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation'])
def test_installed_versions_satisfy_the_requirements(dist):
    """As ``pip check`` for these distributions (torch 2.13 asks for setuptools >= 77.0.3, mmengine's
    ``mmdet::`` bases for pkg_resources, gone in setuptools 82)."""
    unmet = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({'extra': ''}):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f'{req} (not installed)')
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f'{req} (installed {version})')
    assert not unmet, f'{dist} requires {unmet}'


def test_install_script_refuses_an_unsupported_python(tmp_path):
    result = subprocess.run(['bash', str(ROOT / 'tools' / 'install_deps.sh')], capture_output=True, text=True,
                            env=dict(os.environ, PYTHON='/usr/bin/false', VENV=str(tmp_path / 'venv')))
    assert result.returncode == 1
    assert 'needs Python 3.10, 3.11 or 3.12' in result.stderr, result.stderr
    assert not (tmp_path / 'venv').exists()


def test_makefile_refuses_a_venv_path_with_spaces():
    result = subprocess.run(['make', '-n', 'test', 'VENV=my env'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "VENV must be a path without spaces, got 'my env'" in result.stderr


def test_source_distribution_carries_what_setup_py_reads(tmp_path):
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, MMSWIN_WITH_OPS='0'))
    (sdist,) = tmp_path.glob('mmswin-*.tar.gz')
    with tarfile.open(sdist) as tar:
        names = {name.split('/', 1)[1] for name in tar.getnames() if '/' in name}
    needed = {str(p.relative_to(ROOT)) for pattern in ('requirements/*.txt', 'mmswin/csrc/*')
              for p in ROOT.glob(pattern)}
    assert needed <= names, sorted(needed - names)
