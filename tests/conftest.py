import os

import torch

# Without a GPU, Triton kernels are tested through the interpreter, which must be selected before triton is imported.
# With a GPU the real compiler runs (torch.compile's own kernels would fail under the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot runs on numpy's BLAS; its threads fight pytest's and torch's on a small machine (a tiny
# matmul went from 0.05 ms to 23 ms). torch itself uses MKL, which this does not touch.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import vitfast.backend  # noqa: E402

# Under pytest-xdist (`-n 2`, the README's test command) each worker gets its share of the cores: torch's default of
# one thread per core in every worker oversubscribes them, and its thread pools then spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# The longest test files first: the README's command hands whole files to its workers (`--dist loadfile`) in
# collection order, and a long file handed out last leaves the other worker idle while it runs (33 s of a 9.5 min run
# on two cores, 2026-12-01, with the kernel-report compile file, 117 s, starting mid-run). Measured worker-seconds then:
# parity 236, kernel compile 117, patch 79, attention 63, engine 60, export 57.
_LONGEST_FIRST = (
    "tests/ops/test_kernels_compile.py",
    "tests/models/test_parity_timm.py",
    "tests/test_patch.py",
    "tests/ops/test_attention.py",
    "tests/test_engine.py",
    "tests/test_export.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order


def _language_namespaces() -> dict:
    """What Triton's interpreter patches: ``triton.language``, its ``core``, ``math`` and tensor classes, by name."""
    try:
        import triton.language as tl
    except ImportError:
        return {}
    owners = (tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None))
    return {owner: dict(vars(owner)) for owner in owners if owner is not None}


_PRISTINE_LANGUAGE = _language_namespaces()  # before any test has run a kernel through the interpreter


@pytest.fixture
def pristine_triton_language():
    """``triton.language`` as imported, for a test that compiles real kernels in this interpreter-mode process.

    Triton 3.8's interpreter leaves ``triton.language.core`` patched with its own builtins after any kernel that
    calls one of ``triton.language.standard``'s ``@jit`` functions (``tl.sum``, ``tl.max``, ...):
    ``InterpretedFunction.__call__`` patches the language seen from the callee's module and never restores it. A
    real compile in the same worker then fails (``'ir.value' object has no attribute 'dtype'``), depending on which
    test files ran there before. Restored for the test, put back as found after it.
    """
    with pytest.MonkeyPatch.context() as patch:
        for owner, pristine in _PRISTINE_LANGUAGE.items():
            current = vars(owner)
            for name, value in pristine.items():
                if current.get(name) is not value:
                    patch.setattr(owner, name, value)
        yield


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_bf16_to_nearest():
    """Make Triton's interpreter round fp32 -> bf16 casts to nearest even, as GPUs (and torch) do.

    Triton 3.8's interpreter truncates them (``_convert_float`` without a rounding mode): a bias of up to one bf16 ulp
    on every rounded tile that no GPU kernel has. fp16 casts (numpy) already round.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    truncating_cast = getattr(builder, "cast_impl", None)
    if os.environ.get("TRITON_INTERPRET") != "1" or truncating_cast is None:
        yield
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == interpreter.tl.float32 and dst_type.scalar == interpreter.tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = truncating_cast


@pytest.fixture(autouse=True)
def _isolated_backend_and_seed():
    """Each test starts from the default backend and a fixed seed, whatever the previous test did."""
    vitfast.backend._current = None
    torch.manual_seed(0)
    yield
    vitfast.backend._current = None


@pytest.fixture(autouse=True)
def _fresh_native_plans():
    """Each test starts with no native eager plans (csrc/eager.cpp). A plan replays what an op's Python path did at
    its key's first call, so a test that patches that path (a module's ``launch``, a plan setting) must not meet a
    plan that an earlier test in the same worker made."""
    from vitfast import _ext

    _ext.register_ops()
    yield
