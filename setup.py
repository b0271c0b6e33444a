"""Installs mmswin. Dependencies beyond torch and mmengine are pinned in requirements/.

On Linux, when torch is importable at build time (``pip install --no-build-isolation``), the fused CPU
kernels in ``mmswin/csrc`` are compiled into ``mmswin._C``; ``MMSWIN_WITH_OPS=0`` skips them. Without them
mmswin runs the same models through PyTorch's operators.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r"__version__ = '([^']+)'",
                    (here / 'mmswin' / 'version.py').read_text()).group(1)


def read_requirements(name: str) -> list:
    lines = (here / 'requirements' / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith('#')]


def extensions() -> dict:
    """``ext_modules`` and ``cmdclass`` for the fused CPU kernels, or nothing where they are not built."""
    if os.environ.get('MMSWIN_WITH_OPS', '1') == '0' or not sys.platform.startswith('linux'):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build without torch: the package works without the kernels
        return {}
    sources = sorted(str(p.relative_to(here)) for p in (here / 'mmswin' / 'csrc').glob('*.cpp'))
    # -fopenmp: at::parallel_for is OpenMP in the caller's code; torch's libgomp, already loaded, serves it
    ext = CppExtension('mmswin._C', sources, extra_compile_args=['-O3', '-fopenmp', '-ffp-contract=off'],
                       extra_link_args=['-fopenmp'])
    return dict(ext_modules=[ext], cmdclass={'build_ext': BuildExtension})


setup(
    name='mmswin',
    version=version,
    description='Swin Transformer V1 and V2 backbones for MMDetection 3.x and MMSegmentation 1.x',
    long_description=(here / 'README.md').read_text() if (here / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmswin', 'mmswin.*']),
    python_requires='>=3.10',
    install_requires=['torch>=2.4'] + read_requirements('runtime.txt'),  # torch.get_autocast_dtype, 2.4
    extras_require={
        'mmdet': ['mmcv>=2.0.0,<2.2.0', 'mmdet>=3.0.0'],
        'mmseg': ['mmcv>=2.0.0,<2.2.0', 'mmsegmentation>=1.0.0', 'ftfy', 'regex'],
        'tests': read_requirements('tests.txt'),
    },
    license='Apache-2.0',
    zip_safe=False,
    **extensions(),
)
