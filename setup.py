"""Packaging entry point; metadata lives in pyproject.toml.

This file is where the optional C++/CUDA extension from csrc/ will be built (with a clean skip when no compiler
is present or VITFAST_BUILD_EXT=0). Until then it installs the pure-Python package, which runs everywhere.
"""

from setuptools import setup

setup()
