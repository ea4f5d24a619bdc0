"""Packaging entry point; metadata lives in pyproject.toml. Builds the optional compiled extension ``vitfast._C``.

The extension (csrc/: C++ CPU ops, plus CUDA kernels when it can) is built with torch.utils.cpp_extension and ninja
against the torch installed at build time, so it needs that torch importable while building. torch is deliberately
not a build requirement (pinning one torch in [build-system] breaks users with another; REFERENCE.md section 5
item 8). Whatever happens, installation succeeds:

- ``VITFAST_BUILD_EXT=0``: no extension;
- torch not importable (pip's default build isolation), or no C++ compiler: no extension, and a warning saying how
  to build it (``pip install --no-build-isolation .``);
- CUDA kernels too when torch is a CUDA build and nvcc (``$CUDA_HOME/bin/nvcc``) of the same CUDA major version is
  found with the toolkit's libcudart, unless ``VITFAST_BUILD_CUDA=0``; for the GPU architectures in
  ``$TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``: A100, H100, and PTX that newer GPUs compile when they load it);
- a failed compile: a warning with the compiler's reason, and the pure-Python package.

A successful build writes ``vitfast/_C_build_info.json`` next to the library (torch, CUDA, compiler, architectures);
``vitfast._ext`` compares it with the running torch at import and leaves a mismatched build unloaded. Without an
installed build, ``vitfast._ext.load_jit()`` compiles the same sources just in time (source checkouts, tests).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO_FILE = "_C_build_info.json"  # read by vitfast/_ext.py
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
HOW_TO_BUILD = (
    "to build it, install torch first, then vitfast without build isolation: "
    "pip install --no-build-isolation --no-deps --force-reinstall <this source tree or sdist>"
)
# Compile flags; vitfast/_ext.py (load_jit) uses the same ones.
# -g0: Python's own CFLAGS (which setuptools passes first) carry -g, and debug info for the torch headers doubles
# the compile (eager.cpp: 89 s with it, 43 s without, on a 2-core CI machine); take it out to debug the C++ side.
CXX_FLAGS = ["-O3", "-g0"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_DEFINE = "-DVITFAST_WITH_CUDA"


def _warn(message: str) -> None:
    print(f"vitfast setup.py: WARNING: {message}", file=sys.stderr, flush=True)


def _version_of(command: list[str]) -> str | None:
    """First line of ``command``'s output (a compiler's ``--version``), None if it cannot run."""
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return output.strip().splitlines()[0] if output.strip() else None


def _nvcc_version(cuda_home: str | None) -> str | None:
    if cuda_home is None:
        return None
    try:
        output = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", output)
    return match.group(1) if match else None


def extension_plan(env: Mapping[str, str] = os.environ) -> tuple[bool, bool, str]:
    """``(build the extension, with its CUDA kernels, why not or what is left out)`` for this build environment."""
    if env.get("VITFAST_BUILD_EXT", "").strip() == "0":
        return False, False, "VITFAST_BUILD_EXT=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return (
            False,
            False,
            f"torch is not importable at build time ({exc}); pip builds in an isolated environment without it "
            f"unless given --no-build-isolation; {HOW_TO_BUILD}",
        )
    compiler = env.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, False, f"no C++ compiler ({compiler!r} is not on PATH; set CXX); {HOW_TO_BUILD}"
    if torch.version.cuda is None:
        return True, False, "torch is a CPU-only build: CPU ops only"
    if env.get("VITFAST_BUILD_CUDA", "").strip() == "0":
        return True, False, "VITFAST_BUILD_CUDA=0: CPU ops only"
    nvcc = _nvcc_version(CUDA_HOME)
    if nvcc is None:
        return True, False, "nvcc not found (set CUDA_HOME to a CUDA toolkit): CPU ops only"
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return True, False, f"nvcc {nvcc} and torch's CUDA {torch.version.cuda} differ in major version: CPU ops only"
    # the library links against $CUDA_HOME/lib64 (or lib)/libcudart; an nvcc found on PATH outside a toolkit root
    # (e.g. /usr/local/bin/nvcc, CUDA_HOME=/usr/local) compiles but cannot link
    if not [path for lib in ("lib64", "lib") for path in (Path(CUDA_HOME) / lib).glob("libcudart.so*")]:
        return (
            True,
            False,
            f"CUDA_HOME={CUDA_HOME} has no lib64/libcudart.so (set CUDA_HOME to the CUDA toolkit's root): CPU ops only",
        )
    return True, True, ""


def _build_info(with_cuda: bool) -> dict[str, object]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "nvcc": _nvcc_version(CUDA_HOME) if with_cuda else None,
        "compiler": _version_of([os.environ.get("CXX", "c++"), "--version"]),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.version.split()[0],
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _extension_setup(with_cuda: bool) -> dict[str, object]:
    """The ``ext_modules`` and ``cmdclass`` arguments of ``setup()`` that build vitfast._C."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # headers: rebuild triggers, and setuptools ships `depends` in an sdist
    headers = sorted(
        str(p.relative_to(ROOT)) for pattern in ("*.h", "cuda/*.cuh") for p in (ROOT / "csrc").glob(pattern)
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        extension = CUDAExtension(
            "vitfast._C",
            sources,
            depends=headers,
            extra_compile_args={"cxx": [*CXX_FLAGS, CUDA_DEFINE], "nvcc": [*NVCC_FLAGS, CUDA_DEFINE]},
        )
    else:
        extension = CppExtension("vitfast._C", sources, depends=headers, extra_compile_args={"cxx": CXX_FLAGS})
    extension.optional = True  # setuptools then skips a missing library when copying builds into the source tree

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failure is a warning, and which writes the build info next to the library."""

        def run(self) -> None:
            # BuildExtension checks the compiler and its ABI before compiling anything, so failures are caught
            # around the whole command; an in-place / editable build then copies nothing into the source tree
            try:
                super().run()
            except Exception as exc:  # any compiler or toolchain failure: the extension is optional
                _warn(
                    f"building the optional extension vitfast._C failed, vitfast installs without it ({exc}); "
                    f"{HOW_TO_BUILD}"
                )

        def build_extension(self, ext) -> None:
            super().build_extension(ext)
            info_path = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_INFO_FILE)
            info_path.write_text(json.dumps(_build_info(with_cuda), indent=2) + "\n")

        def copy_extensions_to_source(self) -> None:  # in-place and editable builds
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                info = Path(regular_file).with_name(BUILD_INFO_FILE)
                if Path(regular_file).exists() and info.exists():
                    shutil.copyfile(info, Path(inplace_file).with_name(BUILD_INFO_FILE))

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


def main() -> None:
    build, with_cuda, note = extension_plan()
    if not build:
        if note != "VITFAST_BUILD_EXT=0":
            _warn(f"the optional compiled extension vitfast._C is not built: {note}")
        setup()
        return
    if note:
        print(f"vitfast setup.py: building vitfast._C: {note}", file=sys.stderr, flush=True)
    setup(**_extension_setup(with_cuda))


if __name__ == "__main__":
    main()
