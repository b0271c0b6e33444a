"""Installs mmswin. Dependencies beyond torch and mmengine are pinned in requirements/."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r"__version__ = '([^']+)'",
                    (here / 'mmswin' / 'version.py').read_text()).group(1)


def read_requirements(name: str) -> list:
    lines = (here / 'requirements' / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith('#')]


setup(
    name='mmswin',
    version=version,
    description='Swin Transformer V1 and V2 backbones for MMDetection 3.x and MMSegmentation 1.x',
    long_description=(here / 'README.md').read_text() if (here / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmswin', 'mmswin.*']),
    python_requires='>=3.8',
    install_requires=['torch>=2.0'] + read_requirements('runtime.txt'),
    extras_require={
        'mmdet': ['mmcv>=2.0.0,<2.2.0', 'mmdet>=3.0.0'],
        'mmseg': ['mmcv>=2.0.0,<2.2.0', 'mmsegmentation>=1.0.0', 'ftfy', 'regex'],
        'tests': read_requirements('tests.txt'),
    },
    license='Apache-2.0',
    zip_safe=False,
)
