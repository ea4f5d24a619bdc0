"""Loads the optional compiled extension ``vitfast._C`` (csrc/: C++ CPU ops and CUDA kernels).

- ``HAS_EXT``: the extension is loaded (its ops are ``torch.ops.vitfast.preprocess`` / ``layer_norm_ext_*``);
- ``HAS_EXT_CUDA``: it holds the CUDA kernels too (a build without nvcc has the CPU ops only);
- ``reason``: why it is not loaded (a clause: "the compiled extension vitfast._C is ..."), else "".

Nothing else in the package imports the extension directly, so a missing or broken build never stops
``import vitfast``. An installed build is checked before it is loaded: ``setup.py`` writes ``_C_build_info.json``
next to the library, and a build for another torch (major.minor), another CUDA version or another C++ ABI is left
unloaded with one warning (loading a library built against another libtorch can crash the process). Set
``VITFAST_DISABLE_EXT=1`` to hide the extension (the pure-Python paths run).

Without an installed build (a source checkout, an editable install), :func:`load_jit` compiles csrc/ just in time
with ``torch.utils.cpp_extension.load`` (ninja; cached in torch's extension directory, ``$TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["BUILD_INFO_FILE", "HAS_EXT", "HAS_EXT_CUDA", "check_build_info", "load_jit", "reason"]

BUILD_INFO_FILE = "_C_build_info.json"  # written by setup.py next to the library
DISABLE_ENV = "VITFAST_DISABLE_EXT"
REBUILD = (
    "rebuild it for the installed torch (pip install --no-build-isolation --no-deps --force-reinstall <vitfast "
    "source>), or set VITFAST_DISABLE_EXT=1 to silence this; the Triton and PyTorch paths run meanwhile"
)
# Compile flags of load_jit; setup.py uses the same ones.
# -g0: Python's own CFLAGS (which setuptools passes first) carry -g, and debug info for the torch headers doubles
# the compile (eager.cpp: 89 s with it, 43 s without, on a 2-core CI machine); take it out to debug the C++ side.
CXX_FLAGS = ["-O3", "-g0"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_DEFINE = "-DVITFAST_WITH_CUDA"

HAS_EXT = False
HAS_EXT_CUDA = False
reason = ""
module: ModuleType | None = None  # the loaded library (vitfast._C, or the load_jit build)
build_info: dict[str, Any] | None = None  # what setup.py recorded about the installed build


def running_torch() -> dict[str, Any]:
    """The facts of the running torch that a compiled extension must match."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split("+")[0].split(".")[:2])


def check_build_info(info: dict[str, Any], running: dict[str, Any] | None = None) -> str | None:
    """Why a build described by ``info`` (setup.py's build info) cannot be loaded here; None when it can.

    torch's C++ API and ABI change between minor versions (2.10 -> 2.11), not within one; CUDA kernels need the
    CUDA runtime torch ships; the C++ standard library ABI must agree.
    """
    running = running or running_torch()
    built = info.get("torch")
    if not isinstance(built, str) or _major_minor(built) != _major_minor(running["torch"]):
        return f"it was built for torch {built} and torch {running['torch']} is running"
    if info.get("with_cuda") and info.get("cuda") != running["cuda"]:
        return f"its CUDA kernels were built for CUDA {info.get('cuda')} and torch runs CUDA {running['cuda']}"
    if "cxx11_abi" in info and bool(info["cxx11_abi"]) != running["cxx11_abi"]:
        return "it was built with another C++ ABI (_GLIBCXX_USE_CXX11_ABI) than torch"
    return None


def probe(info_path: Path, import_library: Callable[[], ModuleType]) -> tuple[ModuleType | None, str, dict | None]:
    """``(library, "", build info)`` if the build described at ``info_path`` fits the running torch and imports;
    else ``(None, why not, build info or None)``. The build info is read first: the library is imported only when it
    matches."""
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        return None, f"the compiled extension vitfast._C has no build info ({info_path}), so it is not loaded", None
    except (OSError, ValueError) as exc:
        return None, f"the build info of the compiled extension vitfast._C is unreadable ({exc})", None
    mismatch = check_build_info(info)
    if mismatch is not None:
        return None, f"the compiled extension vitfast._C is disabled: {mismatch}", info
    try:
        library = import_library()
    except (ImportError, OSError) as exc:
        return None, f"the compiled extension vitfast._C failed to load ({exc})", info
    return library, "", info


def _activate(library: ModuleType, info: dict | None) -> None:
    global HAS_EXT, HAS_EXT_CUDA, reason, module, build_info
    module, build_info = library, info
    HAS_EXT, HAS_EXT_CUDA, reason = True, bool(library.with_cuda()), ""


def _load_installed() -> None:
    global reason, build_info
    if os.environ.get(DISABLE_ENV, "").strip() == "1":
        reason = f"the compiled extension vitfast._C is hidden by {DISABLE_ENV}=1"
        return
    spec = importlib.util.find_spec("vitfast._C")
    if spec is None or spec.origin is None:
        reason = (
            "the compiled extension vitfast._C is not installed (a pure-Python install: see setup.py for how to "
            "build it, or vitfast._ext.load_jit() in a source checkout)"
        )
        return
    library, why, info = probe(
        Path(spec.origin).with_name(BUILD_INFO_FILE), lambda: importlib.import_module("vitfast._C")
    )
    if library is None:
        reason, build_info = why, info
        # present but unusable: say so once (an absent extension is the normal pure-Python install, and silent)
        warnings.warn(f"vitfast: {why}; {REBUILD}.", RuntimeWarning, stacklevel=2)
        return
    _activate(library, info)


def load_jit(verbose: bool = False, with_cuda: bool | None = None) -> ModuleType:
    """Compile csrc/ just in time and load it (a source checkout; the tests), then register the ops' Python side.

    ``with_cuda``: also compile the CUDA kernels (default: when a GPU is visible and nvcc is found; nvcc compiles for
    ``$TORCH_CUDA_ARCH_LIST``, else for the visible GPUs). Builds are cached by torch (``$TORCH_EXTENSIONS_DIR``,
    default ``~/.cache/torch_extensions``) and rebuilt when a source changes. A process loads the extension once:
    with an installed build loaded, that build is returned. Raises RuntimeError when csrc/ is missing or the
    extension is hidden, and the compiler's error when the build fails.
    """
    if HAS_EXT:
        if with_cuda and not HAS_EXT_CUDA:
            raise RuntimeError(
                "vitfast's extension is already loaded without its CUDA kernels, and a process can load it only "
                "once; call load_jit(with_cuda=True) in a fresh process."
            )
        return module
    if os.environ.get(DISABLE_ENV, "").strip() == "1":
        raise RuntimeError(f"vitfast's compiled extension is hidden by {DISABLE_ENV}=1; unset it to load it.")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if not csrc.is_dir():
        raise RuntimeError(f"load_jit compiles vitfast's C++ sources, which only a source checkout has ({csrc}).")
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = sorted(csrc.glob("*.cpp")) + (sorted((csrc / "cuda").glob("*.cu")) if with_cuda else [])
    defines = [CUDA_DEFINE] if with_cuda else []
    library = cpp_extension.load(
        name="vitfast_C_cuda" if with_cuda else "vitfast_C_cpu",
        sources=[str(path) for path in sources],
        extra_cflags=[*CXX_FLAGS, *defines],
        extra_cuda_cflags=[*NVCC_FLAGS, *defines],
        extra_include_paths=[str(csrc)],
        with_cuda=with_cuda,
        verbose=verbose,
    )
    _activate(library, None)
    register_ops()
    return library


# the op modules with a Python side for the extension (``register_ext``: its C++ ops, or their native eager paths)
OP_MODULES = (
    "vitfast.ops.preprocess",
    "vitfast.ops.layer_norm_ext",
    "vitfast.ops.layer_norm",
    "vitfast.ops.attention",
    "vitfast.ops.swiglu",
    "vitfast.ops.rope",
    "vitfast.ops.linear",
    "vitfast.ops.patch_embed",
)


def register_ops() -> None:
    """Register every op module's Python side for the loaded extension (a native eager path starts without plans)."""
    for op_module in OP_MODULES:
        importlib.import_module(op_module).register_ext()


_load_installed()
