// The native half of the eager launch path (vitfast/ops/_triton.py): an eager op call whose host work is C++.
//
// On the Python eager path one LayerNorm call costs ~30 us of host time at best against ~7 us for aten's
// F.layer_norm (benchmarks/results/2026-12-01_host_overhead_lean.md): the autograd node of torch.autograd.Function
// alone costs more than aten's whole op, and each output allocation ~2 us. Here one mechanism serves every op that
// registers (_triton.register_native): the call's key, its allocations, its launches and its autograd node are C++.
// It knows nothing of any op. What it replays, the Python path decides and records, once per specialization:
//
// - the key: everything of a call but its tensors' contents and addresses: the launch state's token (the driver,
//   device, debug knobs, PDL, the op's settings and kernel globals), and per argument its type and value (ints,
//   floats, bools, None) or, for a tensor, its dtype, sizes, strides, 16-byte alignment, whether it wants a gradient
//   and which earlier argument shares its address. The Python path is a function of exactly these (its checks, its
//   launch plans, its allocations), so what it did for one call it does for every call with the same key.
// - the plan ("fill", a Python callback, at a key's first call): the Python path runs once, its launches recorded,
//   under a dispatch mode that sees every aten op it runs. A plan exists only when that path allocated and viewed
//   tensors and launched kernels, nothing else (no copy, no arithmetic, no host read of a tensor): then its outputs
//   hold what its launches wrote, and replaying the launches into fresh allocations of the same layouts computes
//   the same thing. Each launch argument is a call argument (by address), a fresh allocation ("buffer": an output or
//   a temporary), or a constant of the key. The autograd node saves what the op's setup_context saved (inputs and
//   outputs by identity) and keeps its attributes (constants of the key) for the op's Python backward.
// - the launch: on Triton's CUDA driver, cuLaunchKernelEx called from here with the kernel's parameters packed as
//   Triton's launcher packs them (_triton._direct_launch derives them from the compiled kernel's signature and
//   checks them against its PTX), so a replay calls no Python per launch; otherwise (another driver, a kernel with
//   scratch memory or clusters, VITFAST_DIRECT_LAUNCH=0) the compiled kernel's own launcher (Triton's), called with
//   exactly the arguments JITFunction.run passes (the replay contract of _triton.LaunchCache). Under Triton's
//   interpreter the "launcher" is a Python closure over kernel[grid].
// - the launch state (a Python callback, once per call): whether a replay is allowed now (no launch hooks), the
//   token, the stream, the hooks to pass on. Tracing (dynamo, fake tensors, functorch, jit.trace) is refused by the
//   Python caller before this runs.
//
// A call this path does not take (a tensor subclass or sparse tensor, tensors on several devices or on one the
// kernels cannot run on, an argument of another type, an op's coverage check saying no) returns NotImplemented, and
// the Python path runs: its checks raise the errors, this file raises none of its own.
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace vitfast::eager {

namespace {

using torch::autograd::variable_list;

// An owned Python reference.
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject* object) : object_(object) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  Ref(Ref&& other) noexcept : object_(other.object_) { other.object_ = nullptr; }
  Ref& operator=(Ref&& other) noexcept {
    if (this != &other) {
      Py_XDECREF(object_);
      object_ = other.object_;
      other.object_ = nullptr;
    }
    return *this;
  }
  ~Ref() { Py_XDECREF(object_); }
  PyObject* get() const { return object_; }
  explicit operator bool() const { return object_ != nullptr; }
  void leak() { object_ = nullptr; }
  PyObject* release() {
    PyObject* object = object_;
    object_ = nullptr;
    return object;
  }  // past the interpreter's finalization: no reference may be dropped

 private:
  PyObject* object_ = nullptr;
};

Ref borrowed(PyObject* object) {
  Py_XINCREF(object);
  return Ref(object);
}

Ref checked(PyObject* object) {
  if (object == nullptr) {
    throw python_error();
  }
  return Ref(object);
}

[[noreturn]] void plan_error(const char* what) {
  PyErr_Format(PyExc_TypeError, "vitfast: a native plan is malformed (%s)", what);
  throw python_error();
}

int64_t as_int(PyObject* object, const char* what) {
  if (!PyLong_Check(object)) {
    plan_error(what);
  }
  int64_t value = PyLong_AsLongLong(object);
  if (value == -1 && PyErr_Occurred()) {
    throw python_error();
  }
  return value;
}

PyObject* item(PyObject* tuple, Py_ssize_t i, Py_ssize_t size, const char* what) {
  if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != size) {
    plan_error(what);
  }
  return PyTuple_GET_ITEM(tuple, i);
}

std::vector<int64_t> int_list(PyObject* tuple, const char* what) {
  if (!PyTuple_Check(tuple)) {
    plan_error(what);
  }
  std::vector<int64_t> values;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); ++i) {
    values.push_back(as_int(PyTuple_GET_ITEM(tuple, i), what));
  }
  return values;
}

bool aligned(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

int64_t float_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// ------------------------------------------------------------------------------------------------------- the plan

// An argument of a recorded launch, or a tensor the autograd node saves.
struct Slot {
  // saved: kBuffer means an output, kConstant None. kView: a view of buffer ``index`` at another storage offset
  enum Kind : int64_t { kInput = 0, kBuffer = 1, kConstant = 2, kView = 3 };
  int64_t kind = kConstant;
  int64_t index = 0;
  PyObject* value = nullptr;  // kConstant (borrowed from the plan's tuple)
  std::vector<int64_t> sizes, strides;  // kView
  int64_t offset = 0;
};

// A fresh allocation of the Python path (an output or a temporary): its storage's length and the view of it that
// the launches (or the caller) got.
struct Buffer {
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0, elements = 0;
  bool exact = false;     // empty_strided(sizes, strides) allocates exactly that storage
  bool aligned = false;   // its address was 16-byte aligned (a launch was specialized on it)
  bool zeroed = false;    // the Python path allocated it zero-filled (torch.zeros): so does the replay
  bool launched = false;  // an argument of a launcher's call (wrapped as a Python tensor per call)
};

// The CUDA driver's launch, as cuda.h declares it (the ABI of the driver API, stable across CUDA versions):
// cuLaunchKernelEx(const CUlaunchConfig*, CUfunction, void** kernelParams, void** extra) -> CUresult.
struct LaunchAttribute {
  int32_t id;  // CUlaunchAttributeID
  char pad[4];
  union {
    char bytes[64];
    int32_t flag;  // programmaticStreamSerializationAllowed, cooperative, ...
  } value;
};
static_assert(sizeof(LaunchAttribute) == 72, "CUlaunchAttribute is 72 bytes");
struct LaunchConfig {
  uint32_t grid_x, grid_y, grid_z, block_x, block_y, block_z, shared;
  void* stream;  // CUstream
  LaunchAttribute* attrs;
  uint32_t num_attrs;
};
static_assert(sizeof(LaunchConfig) == 56, "CUlaunchConfig is 56 bytes");
constexpr int32_t kProgrammaticStreamSerialization = 6;  // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

// The driver functions a direct launch calls (each returns a CUresult), in the order _triton.direct_launch_driver
// gives their addresses: the launch, and what Triton's launcher does first (ensureCudaContext): a thread without a
// current context (the autograd engine's, say) gets its device's primary context.
struct Driver {
  int (*launch)(const LaunchConfig*, void* function, void** params, void** extra) = nullptr;  // cuLaunchKernelEx
  int (*get_current)(void** context) = nullptr;                                               // cuCtxGetCurrent
  int (*set_current)(void* context) = nullptr;                                                // cuCtxSetCurrent
  int (*retain_primary)(void** context, int device) = nullptr;  // cuDevicePrimaryCtxRetain
  int (*get_device)(int* device, int ordinal) = nullptr;        // cuDeviceGet
};

// A launch the replay makes itself, as Triton's launcher makes it (_triton._direct_launch): cuLaunchKernelEx with
// the kernel's parameters packed from the step's arguments, no Python call, no tensor wrapped.
struct Direct {
  Driver driver;
  void* function = nullptr;  // CUfunction
  uint32_t block = 0, shared = 0;
  bool pdl = false;
  std::vector<int64_t> pointer;  // per kernel parameter: the step argument whose address it is, or -1 (bits)
  std::vector<uint64_t> bits;    // per kernel parameter: a constant's bits, little-endian in the parameter's size
};

// One recorded launch: what the Python launch cache replays for it (_triton._CompiledLaunch), with slots for its
// positional arguments; ``direct``: the replay launches it itself (else it calls the launcher).
struct Step {
  std::array<PyObject*, 3> grid{};
  std::array<uint32_t, 3> dims{};
  PyObject* launcher = nullptr;
  PyObject* function = nullptr;
  PyObject* metadata = nullptr;
  std::vector<PyObject*> constexprs;
  std::vector<Slot> args;
  std::optional<Direct> direct;
};

// What one key replays. Its Python objects are borrowed from ``source`` (the fill's answer), which it owns; a node
// of a call that wants a gradient holds it too (the op's backward callback and attributes), so a plan outlives its
// op's cache when needed, and takes the GIL to drop its references.
struct Plan : torch::CustomClassHolder {
  Ref source, backward;
  bool single = false;  // the op returns one tensor, not a tuple
  std::vector<Buffer> buffers;
  std::vector<int64_t> outputs;  // the buffer of each output
  std::vector<Step> steps;
  // a call that wants a gradient: what its node saves, which outputs are differentiable, the ctx's attributes (a
  // dict), the positions of the tensor arguments (the node's inputs) among the op's arguments
  std::vector<Slot> saved;
  std::vector<bool> differentiable;
  PyObject* attrs = nullptr;
  std::vector<int64_t> tensor_args;
  int64_t nargs = 0;

  ~Plan() override {
    if (!Py_IsInitialized()) {
      source.leak();
      backward.leak();
      return;
    }
    pybind11::gil_scoped_acquire gil;  // a node may be freed by the autograd engine, without the GIL
    source = Ref();
    backward = Ref();
  }
};

// Buffer ``(dtype, sizes, strides, storage offset, storage elements, aligned, zeroed)``.
Buffer parse_buffer(PyObject* spec) {
  Buffer b;
  PyObject* dtype = item(spec, 0, 7, "buffer");
  if (!THPDtype_Check(dtype)) {
    plan_error("buffer dtype");
  }
  b.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  b.sizes = int_list(PyTuple_GET_ITEM(spec, 1), "buffer sizes");
  b.strides = int_list(PyTuple_GET_ITEM(spec, 2), "buffer strides");
  b.offset = as_int(PyTuple_GET_ITEM(spec, 3), "buffer offset");
  b.elements = as_int(PyTuple_GET_ITEM(spec, 4), "buffer elements");
  b.aligned = PyTuple_GET_ITEM(spec, 5) == Py_True;
  b.zeroed = PyTuple_GET_ITEM(spec, 6) == Py_True;
  if (b.sizes.size() != b.strides.size()) {
    plan_error("buffer rank");
  }
  int64_t extent = 1;
  for (size_t d = 0; d < b.sizes.size(); ++d) {
    if (b.sizes[d] == 0) {
      extent = 0;
      break;
    }
    extent += (b.sizes[d] - 1) * b.strides[d];
  }
  b.exact = b.offset == 0 && b.elements == extent;
  return b;
}

// (kind, index or constant), or (kView, buffer, sizes, strides, storage offset)
Slot parse_slot(PyObject* spec, size_t inputs, size_t buffers) {
  Slot s;
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 2) {
    plan_error("slot");
  }
  s.kind = as_int(PyTuple_GET_ITEM(spec, 0), "slot kind");
  if (s.kind == Slot::kConstant) {
    s.value = item(spec, 1, 2, "slot");
    return s;
  }
  s.index = as_int(item(spec, 1, s.kind == Slot::kView ? 5 : 2, "slot"), "slot index");
  if (s.kind == Slot::kView) {
    s.sizes = int_list(PyTuple_GET_ITEM(spec, 2), "view sizes");
    s.strides = int_list(PyTuple_GET_ITEM(spec, 3), "view strides");
    s.offset = as_int(PyTuple_GET_ITEM(spec, 4), "view offset");
    if (s.sizes.size() != s.strides.size()) {
      plan_error("view rank");
    }
  }
  size_t bound = s.kind == Slot::kInput ? inputs : s.kind == Slot::kBuffer || s.kind == Slot::kView ? buffers : 0;
  if (s.index < 0 || static_cast<size_t>(s.index) >= bound) {
    plan_error("slot index");
  }
  return s;
}

template <typename F>
void set_function(F& f, PyObject* address) {
  uint64_t value = PyLong_AsUnsignedLongLong(address);
  if (PyErr_Occurred()) {
    throw python_error();
  }
  if (value == 0) {
    plan_error("a null driver function");
  }
  f = reinterpret_cast<F>(static_cast<uintptr_t>(value));
}

// A step's direct launch: (the driver functions' addresses, CUfunction, threads per block, shared bytes, PDL,
// parameters), where a parameter is (0, bits) or (1, the step argument whose address it is: a tensor's slot).
Direct parse_direct(PyObject* spec, const std::vector<Slot>& args) {
  Direct d;
  PyObject* driver = item(spec, 0, 6, "direct launch");
  item(driver, 0, 5, "direct launch driver");
  set_function(d.driver.launch, PyTuple_GET_ITEM(driver, 0));
  set_function(d.driver.get_current, PyTuple_GET_ITEM(driver, 1));
  set_function(d.driver.set_current, PyTuple_GET_ITEM(driver, 2));
  set_function(d.driver.retain_primary, PyTuple_GET_ITEM(driver, 3));
  set_function(d.driver.get_device, PyTuple_GET_ITEM(driver, 4));
  uint64_t function = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(spec, 1));
  if (PyErr_Occurred()) {
    throw python_error();
  }
  d.function = reinterpret_cast<void*>(static_cast<uintptr_t>(function));
  d.block = static_cast<uint32_t>(as_int(PyTuple_GET_ITEM(spec, 2), "direct block"));
  d.shared = static_cast<uint32_t>(as_int(PyTuple_GET_ITEM(spec, 3), "direct shared memory"));
  d.pdl = PyTuple_GET_ITEM(spec, 4) == Py_True;
  PyObject* params = PyTuple_GET_ITEM(spec, 5);
  if (!PyTuple_Check(params)) {
    plan_error("direct launch fields");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(params); ++i) {
    PyObject* p = PyTuple_GET_ITEM(params, i);
    int64_t kind = as_int(item(p, 0, 2, "direct parameter"), "direct parameter kind");
    if (kind == 1) {
      int64_t arg = as_int(PyTuple_GET_ITEM(p, 1), "direct parameter argument");
      if (arg < 0 || static_cast<size_t>(arg) >= args.size() || args[arg].kind == Slot::kConstant) {
        plan_error("direct parameter argument");
      }
      d.pointer.push_back(arg);
      d.bits.push_back(0);
    } else if (kind == 0) {
      uint64_t bits = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(p, 1));
      if (PyErr_Occurred()) {
        throw python_error();
      }
      d.pointer.push_back(-1);
      d.bits.push_back(bits);
    } else {
      plan_error("direct parameter kind");
    }
  }
  return d;
}

// The fill's plan: (single, buffers, outputs, steps, saved, differentiable, attrs), where a step is (grid, launcher,
// function, packed metadata, constexprs, argument slots, direct launch or None) and a slot (kind, index or
// constant).
c10::intrusive_ptr<Plan> parse_plan(PyObject* spec, size_t nargs, Ref backward) {
  auto plan = c10::make_intrusive<Plan>();
  plan->source = borrowed(spec);
  plan->backward = std::move(backward);
  plan->nargs = static_cast<int64_t>(nargs);
  plan->single = item(spec, 0, 7, "plan") == Py_True;
  PyObject* buffers = PyTuple_GET_ITEM(spec, 1);
  PyObject* outputs = PyTuple_GET_ITEM(spec, 2);
  PyObject* steps = PyTuple_GET_ITEM(spec, 3);
  PyObject* saved = PyTuple_GET_ITEM(spec, 4);
  PyObject* differentiable = PyTuple_GET_ITEM(spec, 5);
  plan->attrs = PyTuple_GET_ITEM(spec, 6);
  if (!PyTuple_Check(buffers) || !PyTuple_Check(steps) || !PyTuple_Check(saved) || !PyTuple_Check(differentiable) ||
      !PyDict_Check(plan->attrs)) {
    plan_error("plan fields");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(buffers); ++i) {
    plan->buffers.push_back(parse_buffer(PyTuple_GET_ITEM(buffers, i)));
  }
  plan->outputs = int_list(outputs, "outputs");
  for (int64_t b : plan->outputs) {
    if (b < 0 || static_cast<size_t>(b) >= plan->buffers.size()) {
      plan_error("output buffer");
    }
  }
  if (plan->outputs.empty() || (plan->single && plan->outputs.size() != 1)) {
    plan_error("outputs");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(steps); ++i) {
    PyObject* s = PyTuple_GET_ITEM(steps, i);
    Step step;
    PyObject* grid = item(s, 0, 7, "step");
    for (Py_ssize_t d = 0; d < 3; ++d) {
      step.grid[d] = item(grid, d, 3, "grid");
      int64_t dim = as_int(step.grid[d], "grid");
      if (dim < 0 || dim > UINT32_MAX) {
        plan_error("grid");
      }
      step.dims[d] = static_cast<uint32_t>(dim);
    }
    step.launcher = PyTuple_GET_ITEM(s, 1);
    step.function = PyTuple_GET_ITEM(s, 2);
    step.metadata = PyTuple_GET_ITEM(s, 3);
    PyObject* constexprs = PyTuple_GET_ITEM(s, 4);
    PyObject* args = PyTuple_GET_ITEM(s, 5);
    if (!PyTuple_Check(constexprs) || !PyTuple_Check(args)) {
      plan_error("step fields");
    }
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(constexprs); ++j) {
      step.constexprs.push_back(PyTuple_GET_ITEM(constexprs, j));
    }
    PyObject* direct = PyTuple_GET_ITEM(s, 6);
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(args); ++j) {
      Slot slot = parse_slot(PyTuple_GET_ITEM(args, j), nargs, plan->buffers.size());
      if (slot.kind == Slot::kBuffer && direct == Py_None) {
        plan->buffers[slot.index].launched = true;
      }
      step.args.push_back(slot);
    }
    if (direct != Py_None) {
      step.direct = parse_direct(direct, step.args);
    }
    plan->steps.push_back(std::move(step));
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(saved); ++i) {
    plan->saved.push_back(parse_slot(PyTuple_GET_ITEM(saved, i), nargs, plan->outputs.size()));
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(differentiable); ++i) {
    plan->differentiable.push_back(PyTuple_GET_ITEM(differentiable, i) == Py_True);
  }
  if (!plan->differentiable.empty() && plan->differentiable.size() != plan->outputs.size()) {
    plan_error("differentiable");
  }
  return plan;
}

// ----------------------------------------------------------------------------------------------------- one call

// The launch state of one call (the state callback's answer): (token, stream, enter hook, exit hook).
struct State {
  int64_t token = 0;
  Ref stream, enter_hook, exit_hook;
};

// Calls the state callback: false when the native path may not launch now.
bool launch_state(PyObject* callback, State& state) {
  Ref answer = checked(PyObject_CallNoArgs(callback));
  if (answer.get() == Py_None) {
    return false;
  }
  if (!PyTuple_Check(answer.get()) || PyTuple_GET_SIZE(answer.get()) != 4) {
    PyErr_SetString(PyExc_TypeError, "vitfast: the native launch state must be (token, stream, enter, exit)");
    throw python_error();
  }
  state.token = PyLong_AsLongLong(PyTuple_GET_ITEM(answer.get(), 0));
  if (state.token == -1 && PyErr_Occurred()) {
    throw python_error();
  }
  state.stream = borrowed(PyTuple_GET_ITEM(answer.get(), 1));
  state.enter_hook = borrowed(PyTuple_GET_ITEM(answer.get(), 2));
  state.exit_hook = borrowed(PyTuple_GET_ITEM(answer.get(), 3));
  return true;
}

struct Call {
  PyObject* const* args = nullptr;
  size_t nargs = 0;
  std::vector<at::Tensor> tensors;  // per argument: the tensor, or undefined
  at::Device device{at::kCPU};
  State state;
};

// The compiled kernel's launcher with the grid, the stream, the kernel handles, the arguments and the constexprs,
// in the order JITFunction.run passes them (vitfast/ops/_triton.py, _RUN_CALL).
void launch(const Step& step, const State& state, const std::vector<PyObject*>& args) {
  std::vector<PyObject*> call;
  call.reserve(9 + args.size() + step.constexprs.size());
  call.insert(call.end(), step.grid.begin(), step.grid.end());
  call.push_back(state.stream.get());
  call.push_back(step.function);
  call.push_back(step.metadata);
  call.push_back(Py_None);  // launch metadata: only launch hooks read it (with one set, no replay)
  call.push_back(state.enter_hook.get());
  call.push_back(state.exit_hook.get());
  call.insert(call.end(), args.begin(), args.end());
  call.insert(call.end(), step.constexprs.begin(), step.constexprs.end());
  checked(PyObject_Vectorcall(step.launcher, call.data(), call.size(), nullptr));
}

// The address a direct launch passes for a tensor slot: a call argument's, a buffer's, or a view's into a buffer.
uint64_t address(const Slot& slot, const Call& call, const std::vector<at::Tensor>& buffers) {
  if (slot.kind == Slot::kInput) {
    return reinterpret_cast<uintptr_t>(call.tensors[slot.index].data_ptr());
  }
  const at::Tensor& buffer = buffers[slot.index];
  if (slot.kind == Slot::kBuffer) {
    return reinterpret_cast<uintptr_t>(buffer.data_ptr());
  }
  return reinterpret_cast<uintptr_t>(buffer.storage().data()) + slot.offset * buffer.itemsize();
}

void driver_check(int result, const char* function) {
  if (result != 0) {
    PyErr_Format(PyExc_RuntimeError,
                 "vitfast: %s failed with CUresult %d in a native replay (set VITFAST_DIRECT_LAUNCH=0 to launch "
                 "through Triton's launcher instead)",
                 function, result);
    throw python_error();
  }
}

// A step's launch made here (_triton._direct_launch), as Triton's launcher makes it: nothing for an empty grid; a
// current context (the device's primary one where the thread has none); the grid, 32 x num_warps threads, the
// kernel's shared memory, the stream, PDL's attribute when the kernel was compiled for it; parameters packed in
// 8-byte cells (the driver reads each in its declared size), a null after the last.
void launch_direct(const Step& step, const Direct& d, uint64_t stream, const Call& call,
                   const std::vector<at::Tensor>& buffers) {
  if (static_cast<uint64_t>(step.dims[0]) * step.dims[1] * step.dims[2] == 0) {
    return;
  }
  void* context = nullptr;
  driver_check(d.driver.get_current(&context), "cuCtxGetCurrent");
  if (context == nullptr) {
    int device = 0;
    driver_check(d.driver.get_device(&device, std::max<int>(0, call.device.index())), "cuDeviceGet");
    driver_check(d.driver.retain_primary(&context, device), "cuDevicePrimaryCtxRetain");
    driver_check(d.driver.set_current(context), "cuCtxSetCurrent");
  }
  c10::SmallVector<uint64_t, 48> cells(d.bits.begin(), d.bits.end());
  c10::SmallVector<void*, 49> params(cells.size() + 1, nullptr);
  for (size_t i = 0; i < cells.size(); ++i) {
    if (d.pointer[i] >= 0) {
      cells[i] = address(step.args[d.pointer[i]], call, buffers);
    }
    params[i] = &cells[i];
  }
  LaunchAttribute pdl{};
  pdl.id = kProgrammaticStreamSerialization;
  pdl.value.flag = 1;
  LaunchConfig config{step.dims[0], step.dims[1], step.dims[2], d.block, 1, 1, d.shared,
                      reinterpret_cast<void*>(static_cast<uintptr_t>(stream)), d.pdl ? &pdl : nullptr,
                      d.pdl ? 1u : 0u};
  driver_check(d.driver.launch(&config, d.function, params.data(), nullptr), "cuLaunchKernelEx");
}

// Replays a plan for a call: allocates its buffers, launches its steps; returns the outputs.
variable_list replay(const Plan& plan, const Call& call) {
  std::vector<at::Tensor> buffers;
  std::vector<Ref> wrapped(plan.buffers.size());
  buffers.reserve(plan.buffers.size());
  for (size_t b = 0; b < plan.buffers.size(); ++b) {
    const Buffer& spec = plan.buffers[b];
    auto options = at::TensorOptions().dtype(spec.dtype).device(call.device);
    buffers.push_back(spec.exact ? at::empty_strided(spec.sizes, spec.strides, options)
                                 : at::empty({spec.elements}, options).as_strided(spec.sizes, spec.strides,
                                                                                  spec.offset));
    // a launch was specialized on this alignment (the allocators' buffers are 512- or 64-byte aligned, and the
    // offset is the plan's: this never fails, and a replay that would pass another alignment must not run)
    if (aligned(buffers.back()) != spec.aligned && buffers.back().numel() != 0) {
      PyErr_SetString(PyExc_RuntimeError, "vitfast: a native replay's allocation is not aligned as its plan's");
      throw python_error();
    }
    if (spec.zeroed) {
      buffers.back().zero_();  // on the current stream, before any launch of the plan
    }
    if (spec.launched) {
      wrapped[b] = checked(THPVariable_Wrap(buffers.back()));
    }
  }
  std::vector<PyObject*> args;
  std::vector<Ref> views;  // the views this call's launches got, alive until they ran
  std::optional<uint64_t> stream;
  for (const Step& step : plan.steps) {
    if (step.direct) {
      if (!stream) {
        stream = PyLong_AsUnsignedLongLong(call.state.stream.get());
        if (PyErr_Occurred()) {
          throw python_error();
        }
      }
      launch_direct(step, *step.direct, *stream, call, buffers);
      continue;
    }
    args.clear();
    for (const Slot& slot : step.args) {
      if (slot.kind == Slot::kView) {
        views.push_back(checked(THPVariable_Wrap(buffers[slot.index].as_strided(slot.sizes, slot.strides,
                                                                                 slot.offset))));
        args.push_back(views.back().get());
        continue;
      }
      args.push_back(slot.kind == Slot::kInput    ? call.args[slot.index]
                     : slot.kind == Slot::kBuffer ? wrapped[slot.index].get()
                                                  : slot.value);
    }
    launch(step, call.state, args);
  }
  variable_list outputs;
  outputs.reserve(plan.outputs.size());
  for (int64_t b : plan.outputs) {
    outputs.push_back(buffers[b]);
  }
  return outputs;
}

PyObject* output_object(const Plan& plan, const variable_list& outputs) {
  if (plan.single) {
    return THPVariable_Wrap(outputs[0]);
  }
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(outputs.size()));
  if (result == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    PyObject* o = THPVariable_Wrap(outputs[i]);
    if (o == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), o);
  }
  return result;
}

}  // namespace

// The autograd node of a replayed call that wants a gradient, written against torch::autograd::Node as aten's
// generated nodes are, not through torch::autograd::Function<T>::apply, whose bookkeeping (input and output info,
// _wrap_outputs' view and dirty handling, a context's saved_data) cost more than the replay itself
// (benchmarks/results/2026-12-01_autograd_node_cost.md): a replay's outputs are fresh, non-view tensors, so each
// differentiable one just gets this node as its history. Its inputs are the call's tensors, its saved variables
// what the op's setup_context saved, its backward the op's Python one. Named (not in the anonymous namespace), so
// that grad_fn.name() says vitfast::eager::NativeNode.
//
// Torch's node pointer changed from std::shared_ptr to c10::intrusive_ptr between 2.11 and 2.14 (pytorch #181782):
// NodePtr is whichever Edge holds, and the two places that make one from a Node (make_node, self) choose at compile
// time; everything else (set_history, collect_next_edges, SavedVariable::unpack) takes NodePtr in both.
using NodePtr = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>;

template <class N, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (kSharedNodes) {
    // deleteNode (found by argument-dependent lookup) frees long chains of nodes without deep recursion
    return NodePtr(new N(std::forward<Args>(args)...), [](N* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

template <class N>
NodePtr self(N* node) {
  if constexpr (kSharedNodes) {
    return node->shared_from_this();
  } else {
    return c10::intrusive_ptr<N>::unsafe_reclaim_from_nonowning(node);
  }
}

struct NativeNode : public torch::autograd::Node {
  NativeNode(c10::intrusive_ptr<Plan> plan, at::Device device) : plan(std::move(plan)), device(device) {}

  std::string name() const override { return "vitfast::eager::NativeNode"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex);
    saved.clear();
    released = true;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);  // the engine may run one node from several threads
    TORCH_CHECK(!released, torch::autograd::ERR_BACKWARD_TWICE);
    for (size_t j = 0; j < grads.size() && j < plan->outputs.size(); ++j) {
      if (!grads[j].defined() && plan->differentiable[j]) {
        const Buffer& spec = plan->buffers[plan->outputs[j]];
        grads[j] = at::zeros(spec.sizes, at::TensorOptions().dtype(spec.dtype).device(device));
      }
    }
    variable_list unpacked;
    unpacked.reserve(saved.size());
    for (const torch::autograd::SavedVariable& variable : saved) {
      unpacked.push_back(variable.unpack(self(this)));
    }
    // the op's backward (a Python callback): (attrs, needs_input_grad, grads, saved) -> one gradient per argument
    pybind11::gil_scoped_acquire gil;
    try {
      auto tensors = [](const variable_list& list) {
        Ref tuple = checked(PyTuple_New(static_cast<Py_ssize_t>(list.size())));
        for (size_t i = 0; i < list.size(); ++i) {
          PyTuple_SET_ITEM(tuple.get(), static_cast<Py_ssize_t>(i), checked(THPVariable_Wrap(list[i])).release());
        }
        return tuple;
      };
      std::vector<bool> wanted(plan->nargs, false);  // per op argument
      for (size_t k = 0; k < plan->tensor_args.size(); ++k) {
        wanted[plan->tensor_args[k]] = task_should_compute_output(k);
      }
      Ref needs_tuple = checked(PyTuple_New(plan->nargs));
      for (int64_t i = 0; i < plan->nargs; ++i) {
        PyTuple_SET_ITEM(needs_tuple.get(), i, Py_NewRef(wanted[i] ? Py_True : Py_False));
      }
      Ref grads_tuple = tensors(grads), saved_tuple = tensors(unpacked);
      std::array<PyObject*, 4> args = {plan->attrs, needs_tuple.get(), grads_tuple.get(), saved_tuple.get()};
      Ref answer = checked(PyObject_Vectorcall(plan->backward.get(), args.data(), args.size(), nullptr));
      if (!PyTuple_Check(answer.get()) || PyTuple_GET_SIZE(answer.get()) != plan->nargs) {
        PyErr_Format(PyExc_TypeError, "vitfast: a native backward must answer %lld gradients",
                     static_cast<long long>(plan->nargs));
        throw python_error();
      }
      variable_list result(plan->tensor_args.size());
      for (size_t k = 0; k < plan->tensor_args.size(); ++k) {
        PyObject* g = PyTuple_GET_ITEM(answer.get(), plan->tensor_args[k]);
        if (g != Py_None && task_should_compute_output(k)) {
          if (!THPVariable_Check(g)) {
            PyErr_SetString(PyExc_TypeError, "vitfast: a native backward answered a non-tensor gradient");
            throw python_error();
          }
          result[k] = THPVariable_Unpack(g);
        }
      }
      return result;
    } catch (python_error& error) {
      error.persist();  // the engine re-raises it in the thread that called backward
      throw;
    }
  }

  c10::intrusive_ptr<Plan> plan;
  at::Device device;
  std::vector<torch::autograd::SavedVariable> saved;  // per plan->saved (an undefined one for None)
  std::mutex mutex;
  bool released = false;
};

namespace {

// A replay that wants a gradient: its outputs with a NativeNode as their history (the differentiable ones), which
// saves what the op's setup_context saved (an output as an output: no reference cycle through its grad_fn).
variable_list replay_with_node(const c10::intrusive_ptr<Plan>& plan, const Call& call) {
  variable_list outputs = replay(*plan, call);
  std::vector<at::Tensor> inputs;
  inputs.reserve(plan->tensor_args.size());
  for (int64_t i : plan->tensor_args) {
    inputs.push_back(call.tensors[i]);
  }
  NodePtr node = make_node<NativeNode>(plan, call.device);
  auto* native = static_cast<NativeNode*>(node.get());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (size_t j = 0; j < outputs.size(); ++j) {
    if (plan->differentiable[j]) {
      torch::autograd::set_history(outputs[j], node);
    } else {
      node->add_input_metadata(torch::autograd::Node::undefined_input());
    }
  }
  native->saved.reserve(plan->saved.size());
  for (const Slot& slot : plan->saved) {
    if (slot.kind == Slot::kInput) {
      native->saved.emplace_back(call.tensors[slot.index], false);
    } else if (slot.kind == Slot::kBuffer) {
      native->saved.emplace_back(outputs[slot.index], static_cast<bool>(plan->differentiable[slot.index]));
    } else {
      native->saved.emplace_back();
    }
  }
  return outputs;
}

}  // namespace

namespace {

// A key: the launch state's token, whether the call wants a gradient, per argument a tag and its value or layout,
// then the tensors' device (_triton.register_native's contract: the Python path is a function of these).
using Key = std::vector<int64_t>;

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = key.size();
    for (int64_t v : key) {
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

constexpr size_t kMaxPlans = 4096;  // cached keys per op; emptied (and refilled as they recur) past it
constexpr int kRetries = 3;         // fills without a plan (and without a "never") before a key is left to Python

enum Tag : int64_t { kNone = 1, kFalse = 2, kTrue = 3, kInt = 4, kFloat = 5, kTensor = 6 };

// One op's native path: its Python callbacks, whether it takes CPU tensors, its plans.
struct NativeOp {
  Ref state, fill, backward;  // backward: None for an op without autograd
  bool cpu = false;           // also CPU tensors: under Triton's interpreter, or the host-overhead probe's stand-in
  struct Entry {
    c10::intrusive_ptr<Plan> plan;  // null: fill again, or (declined) leave the key to Python
    int fills = 0;
    bool declined = false;
  };
  std::unordered_map<Key, Entry, KeyHash> plans;
};

// The key of a call, and its tensors; false when this path does not take the call.
bool describe(const NativeOp& op, Call& call, Key& key, bool& wants_grad) {
  bool grad_mode = op.backward.get() != Py_None && at::GradMode::is_enabled();
  std::optional<at::Device> device;
  call.tensors.assign(call.nargs, at::Tensor());
  key.reserve(2 + 8 * call.nargs);
  key.push_back(call.state.token);
  key.push_back(0);  // wants a gradient: set below
  for (size_t i = 0; i < call.nargs; ++i) {
    PyObject* a = call.args[i];
    if (THPVariable_CheckExact(a)) {  // torch.Tensor or Parameter, no subclass
      const at::Tensor& t = THPVariable_Unpack(a);
      if (!t.defined() || t.layout() != at::kStrided || t.is_nested() || t.is_neg() || t.is_conj() ||
          !(t.is_cuda() || (op.cpu && t.is_cpu())) || (device.has_value() && *device != t.device())) {
        return false;
      }
      device = t.device();
      bool grad = grad_mode && t.requires_grad();
      wants_grad = wants_grad || grad;
      int64_t alias = -1;  // the first earlier tensor argument at the same address
      for (size_t j = 0; j < i && alias < 0; ++j) {
        if (call.tensors[j].defined() && call.tensors[j].data_ptr() == t.data_ptr()) {
          alias = static_cast<int64_t>(j);
        }
      }
      key.insert(key.end(), {kTensor, static_cast<int64_t>(t.scalar_type()), aligned(t), grad, alias, t.dim()});
      key.insert(key.end(), t.sizes().begin(), t.sizes().end());
      key.insert(key.end(), t.strides().begin(), t.strides().end());
      call.tensors[i] = t;
    } else if (a == Py_None) {
      key.push_back(kNone);
    } else if (PyBool_Check(a)) {
      key.push_back(a == Py_True ? kTrue : kFalse);
    } else if (PyLong_CheckExact(a)) {
      int overflow = 0;
      int64_t value = PyLong_AsLongLongAndOverflow(a, &overflow);
      if (overflow != 0) {
        return false;
      }
      key.insert(key.end(), {kInt, value});
    } else if (PyFloat_CheckExact(a)) {
      key.insert(key.end(), {kFloat, float_bits(PyFloat_AS_DOUBLE(a))});
    } else {
      return false;
    }
  }
  if (!device.has_value()) {
    return false;
  }
  call.device = *device;
  key.insert(key.end(), {static_cast<int64_t>(device->type()), device->index()});
  key[1] = wants_grad;
  return true;
}

// A key's first calls: the Python path runs (the fill: fill(wants_grad, *args) -> (result, plan)), and its plan is
// kept. ``plan``: a plan; None (no plan this time: fill again, at most kRetries times); False (never for this key:
// an op's coverage check said no, or its path computes more than its launches). A result of NotImplemented: the
// coverage check said no, nothing ran.
PyObject* fill(NativeOp& op, const Call& call, Key&& key, bool wants_grad) {
  std::vector<PyObject*> args = {wants_grad ? Py_True : Py_False};
  args.insert(args.end(), call.args, call.args + call.nargs);
  Ref answer = checked(PyObject_Vectorcall(op.fill.get(), args.data(), args.size(), nullptr));
  PyObject* result = item(answer.get(), 0, 2, "fill answer");
  PyObject* plan = PyTuple_GET_ITEM(answer.get(), 1);
  if (op.plans.size() >= kMaxPlans && op.plans.find(key) == op.plans.end()) {
    op.plans.clear();  // many shapes (varying row counts): refilled as they recur
  }
  NativeOp::Entry& entry = op.plans[std::move(key)];
  if (PyTuple_Check(plan)) {
    entry.plan = parse_plan(plan, call.nargs, borrowed(op.backward.get()));
    for (int64_t i = 0; i < static_cast<int64_t>(call.nargs); ++i) {
      if (call.tensors[i].defined()) {
        entry.plan->tensor_args.push_back(i);
      }
    }
    if (wants_grad && (entry.plan->differentiable.size() != entry.plan->outputs.size())) {
      plan_error("a gradient plan without its outputs' differentiability");
    }
  } else {
    entry.declined = plan == Py_False || ++entry.fills >= kRetries;
  }
  return Py_NewRef(result);
}

PyObject* call_native(NativeOp& op, PyObject* const* args, size_t nargs) {
  Call call;
  call.args = args;
  call.nargs = nargs;
  if (!launch_state(op.state.get(), call.state)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  Key key;
  bool wants_grad = false;
  if (!describe(op, call, key, wants_grad)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  auto found = op.plans.find(key);
  if (found == op.plans.end() || (!found->second.plan && !found->second.declined)) {
    return fill(op, call, std::move(key), wants_grad);
  }
  if (found->second.declined) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  c10::intrusive_ptr<Plan> plan = found->second.plan;  // kept alive through the call (a fill may empty the map)
  if (!wants_grad) {
    return output_object(*plan, replay(*plan, call));
  }
  return output_object(*plan, replay_with_node(plan, call));
}

// ------------------------------------------------------------------------------------------ the module's functions

constexpr const char* kCapsule = "vitfast.native_op";

void free_op(PyObject* capsule) { delete static_cast<NativeOp*>(PyCapsule_GetPointer(capsule, kCapsule)); }

// a native op's entry point: self is its capsule
PyObject* native_entry(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  auto* op = static_cast<NativeOp*>(PyCapsule_GetPointer(self, kCapsule));
  if (op == nullptr) {
    return nullptr;
  }
  return call_native(*op, args, static_cast<size_t>(nargs));
  END_HANDLE_TH_ERRORS
}

PyMethodDef native_entry_def = {
    "native_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(native_entry)), METH_FASTCALL,
    "An op's native eager path (vitfast/ops/_triton.py, register_native): its outputs, or NotImplemented."};

// vitfast._C.native_op(state, fill, backward, cpu) -> an op's native entry point (a new one: no plans)
PyObject* native_op(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1]) ||
      !(args[2] == Py_None || PyCallable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError, "native_op(state, fill, backward or None, cpu)");
    return nullptr;
  }
  auto* op = new NativeOp();
  op->state = borrowed(args[0]);
  op->fill = borrowed(args[1]);
  op->backward = borrowed(args[2]);
  op->cpu = PyObject_IsTrue(args[3]) == 1;
  Ref capsule(PyCapsule_New(op, kCapsule, free_op));
  if (!capsule) {
    delete op;
    return nullptr;
  }
  return PyCFunction_New(&native_entry_def, capsule.get());
  END_HANDLE_TH_ERRORS
}

// vitfast._C.native_plans(entry) -> (plans, declined keys) of a native entry point (tests, the probe)
PyObject* native_plans(PyObject*, PyObject* entry) {
  PyObject* self = PyCFunction_Check(entry) ? PyCFunction_GET_SELF(entry) : nullptr;
  auto* op = self != nullptr && PyCapsule_IsValid(self, kCapsule)
                 ? static_cast<NativeOp*>(PyCapsule_GetPointer(self, kCapsule))
                 : nullptr;
  if (op == nullptr) {
    PyErr_SetString(PyExc_TypeError, "native_plans takes a native entry point (vitfast._C.native_op's)");
    return nullptr;
  }
  Py_ssize_t plans = 0, declined = 0;
  for (const auto& [key, entry] : op->plans) {
    plans += entry.plan ? 1 : 0;
    declined += entry.declined ? 1 : 0;
  }
  return Py_BuildValue("(nn)", plans, declined);
}

}  // namespace

}  // namespace vitfast::eager

// The module's methods from this file (csrc/module.cpp adds them).
PyMethodDef vitfast_eager_methods[] = {
    {"native_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::native_op)),
     METH_FASTCALL, "An op's native eager entry point from its Python callbacks (vitfast/ops/_triton.py)."},
    {"native_plans", vitfast::eager::native_plans, METH_O,
     "(plans, declined keys) a native eager entry point holds."},
    {nullptr, nullptr, 0, nullptr},
};
