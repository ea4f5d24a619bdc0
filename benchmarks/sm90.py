"""An H100 (sm_90) that is not here: Triton's compiler and launch path run against a stand-in driver, no GPU needed.

Shared by the kernel report (:mod:`benchmarks.kernel_report`: what each kernel compiles to at the launch its launcher
picks) and the host-overhead probe (:mod:`benchmarks.host_overhead`: what an eager call costs before the GPU sees it).

- :class:`Sm90Driver` is the part of Triton's driver interface that compiling and launching use, for
  ``GPUTarget("cuda", 90, 32)``. Its launcher does what Triton's C launcher does with the arguments (reads every
  tensor's ``data_ptr``) and then nothing: the launch itself is a no-op.
- :func:`compile_launch` compiles one recorded launch (``JITFunction.warmup``: compiles, never launches) and reads
  back what decides its speed: registers and local memory from the cubin (``cuobjdump -res-usage``, what the driver
  reports as NUM_REGS / LOCAL_SIZE_BYTES on a GPU), spills from the ``ptxas -v`` log, shared memory from Triton's
  metadata, and the global memory instructions of its PTX (:func:`ptx_memory_profile`).

The toolchain is the triton wheel's own ``ptxas`` / ``cuobjdump``; :func:`toolchain_problem` says why it cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

# H100 SXM (sm_90), CUDA C programming guide, compute capability 9.0: 132 SMs; 227 KB of opt-in shared memory per
# block, 228 KB per SM of which the driver reserves 1 KB per resident block; 64 K 32-bit registers per SM, allocated
# per warp in units of 256; at most 2048 threads and 32 blocks per SM. The H200 is the same chip with faster HBM.
SM_COUNT = 132
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_PER_SM = 228 * 1024
RESERVED_SHARED_PER_BLOCK = 1024
REGISTERS_PER_SM = 64 * 1024
REGISTER_ALLOCATION_UNIT = 256
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
# Peaks a timing is read against: HBM bandwidth (spec sheets: H100 SXM 3.35 TB/s, H200 4.8 TB/s) and dense bf16
# tensor-core rate (~990 TF/s on paper; ~800 TF/s is what large cuBLAS GEMMs reach on an H100, PEERS.md).
PEAKS = {
    "H100": {"bytes_per_s": 3.35e12, "flops_per_s": 800e12},
    "H200": {"bytes_per_s": 4.8e12, "flops_per_s": 800e12},
}

DEVICE = "cuda:0"


def toolchain_problem() -> str | None:
    """Why sm_90 kernels cannot be compiled here (None when they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter replaces @triton.jit, nothing would be compiled"
    try:
        import triton
        from triton import knobs
        from triton.backends import backends
    except ImportError as exc:
        return f"triton (with its knobs / backends modules) cannot be imported: {exc}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        try:
            getattr(knobs.nvidia, tool).path  # noqa: B018 - resolving the tool runs it with --version
        except (RuntimeError, AttributeError) as exc:
            return f"the CUDA tool {tool} is not available to triton {triton.__version__}: {exc}"
    return None


class _NoOpLauncher:
    """Triton's C launcher without the launch: it unpacks the arguments (tensors to device pointers), then returns."""

    def __init__(self, src: Any, metadata: Any) -> None:
        pass

    def __call__(self, *args: Any) -> None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()


class _Utils:
    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        # (module, function, n_regs, n_spills, n_max_threads): handles the no-op launcher never dereferences
        return 1, 1, 0, 0, 1024

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": MAX_SHARED_PER_BLOCK, "multiprocessor_count": SM_COUNT}

    def unload_module(self, module: int) -> None:
        pass


class Sm90Driver:
    """The part of Triton's driver interface that compiling (``warmup``) and launching (``kernel[grid](...)``) use."""

    launcher_cls = _NoOpLauncher

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = _Utils()
        self.launch_driver: tuple[int, ...] | None = None  # native replays' driver functions; None: StandInLaunch.noop

    def direct_launch_driver(self) -> tuple[int, ...]:
        return self.launch_driver if self.launch_driver is not None else StandInLaunch.build().noop

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class _Recorded(ctypes.Structure):
    """One launch the recording launch kept (``Recorded`` in sm90_launch.c)."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared", ctypes.c_uint),
        ("num_attrs", ctypes.c_uint),
        ("stream", ctypes.c_ulonglong),
        ("function", ctypes.c_ulonglong),
        ("attr_id", ctypes.c_int * 4),
        ("attr_value", ctypes.c_int * 4),
        ("num_params", ctypes.c_int),
        ("params", ctypes.c_ulonglong * 64),
    ]


class StandInLaunch:
    """The stand-in driver's launch functions (``sm90_launch.c``, compiled with the system C compiler against the
    triton wheel's ``cuda.h``) for native replays' direct launches, as ``vitfast.ops._triton.direct_launch_driver``
    gives them: ``noop`` (a launch that does nothing, in a thread that has a context), ``recording`` (keeps every
    launch, :meth:`launches`, in a thread that starts without a context, :meth:`context`; :meth:`clear`) and
    ``failing`` (a launch that answers an error). One build per process."""

    _built: StandInLaunch | None = None

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library

        def address(name: str) -> int:
            return ctypes.cast(getattr(library, name), ctypes.c_void_p).value

        context = [address(f"recording_{name}") for name in ("set_current", "retain_primary", "get_device")]
        self.noop = (address("stand_in_launch"), address("stand_in_get_current"), *context)
        self.recording = (address("recording_launch"), address("recording_get_current"), *context)
        self.failing = (address("failing_launch"), address("stand_in_get_current"), *context)
        library.recorded_launch.restype = ctypes.POINTER(_Recorded)

    @classmethod
    def build(cls) -> StandInLaunch:
        if cls._built is None:
            import triton

            include = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")
            source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_launch.c")
            out = os.path.join(tempfile.mkdtemp(prefix="vitfast_sm90_"), "sm90_launch.so")
            compiler = os.environ.get("CC", "cc")
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-I", include, source, "-o", out], check=True,
                           capture_output=True)  # fmt: skip
            cls._built = cls(ctypes.CDLL(out))
        return cls._built

    def launches(self) -> list[dict[str, Any]]:
        """Every launch the recording launch kept since :meth:`clear`: grid, block, shared bytes, stream, function,
        ``attrs`` (``(id, value)``) and ``params`` (each as an unsigned 64-bit cell)."""
        kept = []
        for i in range(self._library.recorded_launches()):
            r = self._library.recorded_launch(i).contents
            kept.append({
                "grid": tuple(r.grid), "block": tuple(r.block), "shared": r.shared, "stream": r.stream,
                "function": r.function, "attrs": [(r.attr_id[a], r.attr_value[a]) for a in range(r.num_attrs)],
                "params": list(r.params[: r.num_params]),
            })  # fmt: skip
        return kept

    def context(self) -> dict[str, int]:
        """What the replays did for a context since :meth:`clear`: ``sets`` (cuCtxSetCurrent calls), ``device`` (the
        one cuDevicePrimaryCtxRetain got: cuDeviceGet's answer, the ordinal + 100) and the current ``context``."""
        sets, device, context = ctypes.c_int(), ctypes.c_int(), ctypes.c_ulonglong()
        self._library.context_state(ctypes.byref(sets), ctypes.byref(device), ctypes.byref(context))
        return {"sets": sets.value, "device": device.value, "context": context.value}

    def clear(self) -> None:
        self._library.clear_recorded()
        self._library.clear_context()


class DevicePointer:
    """A tensor argument as Triton's JIT sees it at a launch: its dtype and its address.

    The address is that of a fresh allocation (the CUDA caching allocator aligns them to 512 bytes) plus the view's
    byte offset, so that views like the ``up`` half of a packed tensor lose the 16-byte alignment attribute exactly as
    they would on a GPU.
    """

    _BASE = 1 << 32

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self._address = self._BASE + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    phase: str = "fwd"  # the pass of the op that made the launch

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def named_args(self) -> dict[str, Any]:
        """Every argument by the kernel's parameter name (constexprs included)."""
        return {**dict(zip(self.kernel.arg_names, self.args, strict=False)), **self.kwargs}


class Recorder:
    """Stands in for ``vitfast.ops._triton.launch`` in the op modules: keeps each launch instead of running it, with
    the pass (``phase``: ``"fwd"`` / ``"bwd"``, set by the caller) it was made in."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.phase = "fwd"

    def __call__(self, kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
        self.launches.append(Launch(kernel, tuple(grid), args, kwargs, self.phase))


def fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A CUDA tensor of this shape: under ``FakeTensorMode`` nothing is allocated; outside it (a run on a real GPU)
    it holds random floats, or zeros for integers (valid indices for the gathers that read them)."""
    from torch._subclasses.fake_tensor import is_fake

    tensor = torch.empty(shape, dtype=dtype, device=DEVICE)
    if not is_fake(tensor):
        tensor.normal_() if tensor.is_floating_point() else tensor.zero_()
    return tensor


# ------------------------------------------------------------------------------------------------------------ PTX

_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")
_ATOMIC = re.compile(r"\b(atom|red)\.global")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")
_TMA = re.compile(r"\bcp\.async\.bulk")
_WIDTH = re.compile(r"\.[bfsu](8|16|32|64)$")


def _access_bits(qualifiers: str) -> int:
    """Bits one ``ld.global`` / ``st.global`` moves per thread: vector length x element width."""
    parts = qualifiers.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    width = next((int(m.group(1)) for p in parts if (m := _WIDTH.search("." + p))), 0)
    return vector * width


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, last)`` line spans of the PTX's loops: a label and a later branch back to it."""
    labels = {}
    spans = []
    for number, line in enumerate(lines):
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = number
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels and labels[branch.group(1)] < number:
            spans.append((labels[branch.group(1)], number))
    return spans


def _memory_ops(lines: list[str]) -> dict[str, Any]:
    loads, stores = Counter(), Counter()
    async_copies = Counter()
    atomics = tma = 0
    for line in lines:
        if (found := _GLOBAL.search(line)) is not None:
            (loads if found.group(1) == "ld" else stores)[_access_bits(found.group(2))] += 1
        elif (found := _CP_ASYNC.search(line)) is not None:
            async_copies[int(found.group(1), 0) * 8] += 1
        elif _TMA.search(line):
            tma += 1
        elif _ATOMIC.search(line):
            atomics += 1
    return {
        "loads": {str(bits): n for bits, n in sorted(loads.items())},
        "stores": {str(bits): n for bits, n in sorted(stores.items())},
        "cp_async": {str(bits): n for bits, n in sorted(async_copies.items())},
        "tma": tma,
        "atomics": atomics,
    }


def ptx_memory_profile(ptx: str) -> dict[str, Any]:
    """Global memory instructions of a kernel's PTX, by width in bits, in the whole kernel and in its main loop.

    Static counts per thread (one instruction per line). ``loads`` / ``stores``: ``ld.global`` / ``st.global``
    (synchronous: the thread waits for a load before it uses the value); ``cp_async``: ``cp.async`` copies
    global -> shared (asynchronous, what Triton's software pipelining emits for tiles that feed ``tl.dot``); ``tma``:
    bulk tensor copies; ``atomics``: ``atom`` / ``red``. The main loop is the longest loop of the PTX (a label and a
    later branch back to it); ``main_loop`` is None for a kernel without loops.
    """
    lines = ptx.splitlines()
    loops = _loops(lines)
    profile = {"kernel": _memory_ops(lines), "loops": len(loops), "main_loop": None}
    if loops:
        first, last = max(loops, key=lambda span: span[1] - span[0])
        profile["main_loop"] = {"lines": last - first, **_memory_ops(lines[first : last + 1])}
    return profile


_GDC_WAIT = re.compile(r"\bgriddepcontrol\.wait\b")
_GDC_TRIGGER = re.compile(r"\bgriddepcontrol\.launch_dependents\b")
# any instruction that may touch global memory: loads / stores / atomics / prefetches whose state space is not one of
# a thread's or CTA's own (a generic address could be global), and every async or bulk copy
_MEMORY_SPACE = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st|atom|red|prefetch|prefetchu|cp)\.([\w.:]+)")
_PRIVATE_SPACES = ("param", "shared", "local", "const")


def grid_dependency_order(ptx: str) -> dict[str, Any]:
    """Where a kernel's programmatic-dependent-launch instructions sit in its PTX (line numbers of the kernel text).

    ``waits`` / ``triggers``: ``griddepcontrol.wait`` / ``.launch_dependents`` count; ``first_wait``,
    ``first_trigger``, ``first_global``: the line of the first of each (None if absent); ``globals_before_wait``:
    instructions that may touch global memory before the first wait (must be 0 for a kernel launched with PDL).
    """
    first_wait = first_trigger = first_global = None
    waits = triggers = before = 0
    for number, line in enumerate(ptx.splitlines()):
        if _GDC_WAIT.search(line):
            waits += 1
            first_wait = number if first_wait is None else first_wait
        elif _GDC_TRIGGER.search(line):
            triggers += 1
            first_trigger = number if first_trigger is None else first_trigger
        elif (found := _MEMORY_SPACE.match(line)) is not None:
            space = found.group(2).split(".")[0]
            if found.group(1) == "cp" and not found.group(2).startswith("async"):
                continue
            if space in _PRIVATE_SPACES:
                continue
            first_global = number if first_global is None else first_global
            before += first_wait is None
    return {
        "waits": waits,
        "triggers": triggers,
        "first_wait": first_wait,
        "first_trigger": first_trigger,
        "first_global": first_global,
        "globals_before_wait": before,
    }


# -------------------------------------------------------------------------------------------------------- compiling


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """Registers and stack frame (local memory, where spills go) per thread of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run(
            [cuobjdump, "-res-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", listing)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{listing}")
    regs, stack, _static_shared, local = (int(value) for value in usage.groups())
    return {"regs": regs, "local_bytes": stack + local}


def _spills(ptxas_log: str) -> dict[str, int]:
    """Spill stores / loads (bytes per thread) from ``ptxas -v``; Triton prints its log with TRITON_DUMP_PTXAS_LOG."""
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if found is None:
        raise RuntimeError(f"no spill line in the ptxas log (is TRITON_DUMP_PTXAS_LOG honoured?):\n{ptxas_log}")
    return {"spill_stores": int(found.group(1)), "spill_loads": int(found.group(2))}


def resident_programs(num_warps: int, regs: int, shared: int) -> int:
    """Programs of one kernel an SM holds at once: the tightest of threads, registers and shared memory."""
    registers_per_warp = -(-regs * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    return min(
        MAX_BLOCKS_PER_SM,
        MAX_THREADS_PER_SM // (32 * num_warps),
        REGISTERS_PER_SM // (registers_per_warp * num_warps),
        SHARED_PER_SM // (shared + RESERVED_SHARED_PER_BLOCK),
    )


class Compiler:
    """Compiles recorded launches for sm_90; a specialization compiled before is read from memory, not recompiled.

    Use inside :func:`offline_sm90` (stand-in driver, cold Triton cache, ptxas log on).
    """

    def __init__(self) -> None:
        from triton import knobs

        self._cuobjdump = knobs.nvidia.cuobjdump.path
        self._compiled: dict[int, dict] = {}

    def __call__(self, launch: Launch) -> dict[str, Any]:
        wrapped = [DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
        ptxas_log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(ptxas_log):
            compiled = launch.kernel.warmup(*wrapped, grid=launch.grid, **launch.kwargs)
        seconds = time.perf_counter() - start
        if id(compiled) in self._compiled:  # an earlier launch's specialization: warmup reused its kernel
            return {**self._compiled[id(compiled)], "seconds": 0.0, "reused": True}
        metadata = compiled.metadata
        result = {
            "shared": int(metadata.shared),
            "num_warps": int(metadata.num_warps),
            "num_stages": int(metadata.num_stages),
            "target": f"{metadata.target.backend}:{metadata.target.arch}",
            "seconds": round(seconds, 2),
            **_resource_usage(compiled.asm["cubin"], self._cuobjdump),
            **_spills(ptxas_log.getvalue()),
            "ptx": ptx_memory_profile(compiled.asm["ptx"]),
            "grid_dependency": grid_dependency_order(compiled.asm["ptx"]),
            "launch_pdl": bool(getattr(metadata, "launch_pdl", False)),
        }
        result["programs_per_sm"] = resident_programs(result["num_warps"], result["regs"], result["shared"])
        self._compiled[id(compiled)] = result
        return result


@contextlib.contextmanager
def offline_sm90(op_modules: list[Any], launch: Any, sm_count: int = SM_COUNT):
    """Compile (and launch, as a no-op) for an H100 that is not here.

    Sets Triton's active driver to :class:`Sm90Driver`, a cold cache (so that ptxas runs and prints its log), the
    launch function of ``op_modules`` to ``launch`` (a :class:`Recorder`, or anything else with the same signature),
    the SM count the launchers read, and the stand-in's driver functions for native replays' direct launches
    (:class:`StandInLaunch`; the driver's ``launch_driver`` picks others); everything is restored on exit.
    """
    from triton.runtime.driver import driver

    import vitfast.ops._triton as triton_helpers

    saved_launches = [(module, module.launch) for module in op_modules]
    saved_sm_count = triton_helpers._sm_count
    saved_driver_functions = triton_helpers.direct_launch_driver

    def direct_launch_driver(active: Any) -> tuple[int, ...] | None:
        if isinstance(active, Sm90Driver) and os.environ.get(triton_helpers.DIRECT_ENV, "").strip() != "0":
            return active.direct_launch_driver()
        return saved_driver_functions(active)

    saved_env = {key: os.environ.get(key) for key in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        saved_driver = driver._active
        driver.set_active(Sm90Driver())
        triton_helpers._sm_count = lambda _index: sm_count
        triton_helpers.direct_launch_driver = direct_launch_driver
        for module, _ in saved_launches:
            module.launch = launch
        try:
            yield
        finally:
            for module, saved in saved_launches:
                module.launch = saved
            triton_helpers._sm_count = saved_sm_count
            triton_helpers.direct_launch_driver = saved_driver_functions
            driver._active = saved_driver  # reset_active() would create the real driver, which needs a GPU
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
