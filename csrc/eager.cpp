// The native half of the eager launch path (vitfast/ops/_triton.py): an eager op call whose host work is C++.
//
// On the Python eager path one LayerNorm call costs ~30 us of host time at best against ~7 us for aten's
// F.layer_norm (benchmarks/results/2026-12-01_host_overhead_lean.md): the autograd node of torch.autograd.Function
// alone costs more than aten's whole op, and each output allocation ~2 us. Here the checks, the output allocation,
// the autograd node (a C++ torch::autograd::Function) and the launch cache's key are C++; what stays Python is
// decided once per specialization, by the Python path itself:
//
// - the launch: the compiled kernel's own launcher (Triton's), called with exactly the arguments JITFunction.run
//   passes (the replay contract of _triton.LaunchCache). A specialization's first call runs the Python launcher
//   ("fill", a Python callback), whose one launch is recorded; its arguments are compared slot by slot with the list
//   this file builds from the same call, and only an identical list is cached (anything else stays on the Python
//   path, every call). Under Triton's interpreter the "launcher" is a Python closure over kernel[grid].
// - the launch state (a Python callback, once per call): whether a replay is allowed now (no tracing, no launch
//   hooks, the debug knobs of the cache's key), a token for that state, the stream, the hooks to pass on.
// - the backward: the op's Python backward (a callback under the GIL), as on the Python path.
//
// An input this path does not take (a tensor subclass, non-contiguous or broadcast tensors, a dtype or width the
// kernels do not take, a device they cannot run on) returns NotImplemented, and the Python path runs: its checks
// raise the errors, this file raises none of its own.
#include <ATen/ops/empty.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

namespace vitfast::eager {

namespace {

using torch::autograd::AutogradContext;
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

 private:
  PyObject* object_ = nullptr;
};

Ref borrowed(PyObject* object) {
  Py_XINCREF(object);
  return Ref(object);
}

// One cached specialization: what the Python launch cache replays (_triton._CompiledLaunch), and the grid.
struct Launch {
  std::array<Ref, 3> grid;
  Ref launcher, function, metadata;
  std::vector<Ref> constexprs;
};

// The launch state of one call (the state callback's answer): (token, stream, enter hook, exit hook).
struct State {
  int64_t token = 0;
  Ref stream, enter_hook, exit_hook;
};

// Calls the state callback: false when the native path may not launch now.
bool launch_state(PyObject* callback, State& state) {
  Ref answer(PyObject_CallNoArgs(callback));
  if (!answer) {
    throw python_error();  // the Python error stays set
  }
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

// The compiled kernel's launcher with the grid, the stream, the kernel handles, the arguments and the constexprs,
// in the order JITFunction.run passes them (vitfast/ops/_triton.py, _RUN_CALL).
void replay(const Launch& launch, const State& state, const std::vector<PyObject*>& args) {
  std::vector<PyObject*> call;
  call.reserve(9 + args.size() + launch.constexprs.size());
  for (const Ref& size : launch.grid) {
    call.push_back(size.get());
  }
  call.push_back(state.stream.get());
  call.push_back(launch.function.get());
  call.push_back(launch.metadata.get());
  call.push_back(Py_None);  // launch metadata: only launch hooks read it (with one set, no replay)
  call.push_back(state.enter_hook.get());
  call.push_back(state.exit_hook.get());
  call.insert(call.end(), args.begin(), args.end());
  for (const Ref& value : launch.constexprs) {
    call.push_back(value.get());
  }
  Ref result(PyObject_Vectorcall(launch.launcher.get(), call.data(), call.size(), nullptr));
  if (!result) {
    throw python_error();
  }
}

// Whether a recorded launch (the fill's: (kernel, grid, args, constexprs) as Python tuples) used exactly ``args``:
// the same tensors (by identity) and the same ints and floats, slot by slot.
bool same_arguments(PyObject* recorded, const std::vector<PyObject*>& args) {
  if (!PyTuple_Check(recorded) || PyTuple_GET_SIZE(recorded) != static_cast<Py_ssize_t>(args.size())) {
    return false;
  }
  for (size_t i = 0; i < args.size(); ++i) {
    PyObject* theirs = PyTuple_GET_ITEM(recorded, i);
    PyObject* ours = args[i];
    if (theirs == ours) {
      continue;
    }
    if (THPVariable_Check(theirs) || THPVariable_Check(ours) || Py_TYPE(theirs) != Py_TYPE(ours)) {
      return false;  // a tensor is the same object or it is not the same argument
    }
    int equal = PyObject_RichCompareBool(theirs, ours, Py_EQ);
    if (equal != 1) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

// The Launch a fill answered, (grid, launcher, function, packed_metadata, constexprs, recorded args); nullopt when
// it is not one to replay (None, or the recorded arguments differ from ``args``).
std::optional<Launch> filled_launch(PyObject* entry, const std::vector<PyObject*>& args) {
  if (entry == Py_None || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 6) {
    return std::nullopt;
  }
  PyObject* grid = PyTuple_GET_ITEM(entry, 0);
  PyObject* constexprs = PyTuple_GET_ITEM(entry, 4);
  if (!PyTuple_Check(grid) || PyTuple_GET_SIZE(grid) != 3 || !PyTuple_Check(constexprs) ||
      !same_arguments(PyTuple_GET_ITEM(entry, 5), args)) {
    return std::nullopt;
  }
  Launch launch;
  for (Py_ssize_t i = 0; i < 3; ++i) {
    launch.grid[i] = borrowed(PyTuple_GET_ITEM(grid, i));
  }
  launch.launcher = borrowed(PyTuple_GET_ITEM(entry, 1));
  launch.function = borrowed(PyTuple_GET_ITEM(entry, 2));
  launch.metadata = borrowed(PyTuple_GET_ITEM(entry, 3));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(constexprs); ++i) {
    launch.constexprs.push_back(borrowed(PyTuple_GET_ITEM(constexprs, i)));
  }
  return launch;
}

bool kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// A tensor argument: nullopt for None, the tensor for a plain torch.Tensor / Parameter; false when it is anything
// else (a subclass, another type), which this path leaves to Python.
bool unpack(PyObject* object, std::optional<at::Tensor>& out) {
  if (object == Py_None) {
    out.reset();
    return true;
  }
  if (!THPVariable_CheckExact(object)) {
    return false;
  }
  out = THPVariable_Unpack(object);
  return out->defined();
}

bool aligned(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

bool outputs_aligned(const variable_list& outputs) {
  for (const at::Tensor& t : outputs) {
    if (t.numel() != 0 && !aligned(t)) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------- LayerNorm

// vitfast::layer_norm_fwd(x, branch, gamma, weight, bias, eps) -> (out, residual_out, mean, rstd), the launch of
// _layer_norm_fwd_kernel as layer_norm_fwd (vitfast/ops/layer_norm.py) makes it for contiguous tensors.
struct LayerNormSetup {
  Ref state, fill, backward;
  int64_t max_width = 0;
  bool cpu = false;  // also CPU tensors: under Triton's interpreter, or the host-overhead probe's stand-in GPU
};
LayerNormSetup* layer_norm_setup = nullptr;  // never freed: it holds Python references past finalization

struct LayerNormKey {
  int64_t token, rows, cols;
  int32_t device, dtypes, aligned;
  bool operator==(const LayerNormKey& o) const {
    return token == o.token && rows == o.rows && cols == o.cols && device == o.device && dtypes == o.dtypes &&
           aligned == o.aligned;
  }
};

struct LayerNormKeyHash {
  size_t operator()(const LayerNormKey& k) const {
    size_t h = std::hash<int64_t>()(k.token);
    for (int64_t v : {k.rows, k.cols, static_cast<int64_t>(k.device), static_cast<int64_t>(k.dtypes),
                      static_cast<int64_t>(k.aligned)}) {
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

std::unordered_map<LayerNormKey, Launch, LayerNormKeyHash>* layer_norm_launches = nullptr;
constexpr size_t kMaxLaunches = 4096;  // cached specializations (one per row count, dtypes, flags, alignment)

// One call: its Python arguments (borrowed), tensors and launch state.
struct LayerNormCall {
  PyObject* objects[6];  // x, branch, gamma, weight, bias, eps
  at::Tensor x;
  std::optional<at::Tensor> branch, gamma, weight, bias;
  int64_t rows = 0, cols = 0;
  State state;
};

// The kernel's positional arguments, as layer_norm_fwd passes them: absent tensors stand in as x (never read).
std::vector<PyObject*> layer_norm_arguments(
    const LayerNormCall& call, PyObject* out, PyObject* residual_out, PyObject* mean, PyObject* rstd,
    PyObject* rows, PyObject* cols) {
  PyObject* x = call.objects[0];
  auto or_x = [&](int slot) { return call.objects[slot] == Py_None ? x : call.objects[slot]; };
  bool has_branch = call.branch.has_value();
  return {x, or_x(1), or_x(2), or_x(3), or_x(4), out, has_branch ? residual_out : out, mean, rstd, rows, cols,
          cols, cols, call.objects[5]};
}

variable_list layer_norm_forward(LayerNormCall& call) {
  const at::Tensor& x = call.x;
  bool has_branch = call.branch.has_value();
  auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = has_branch ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stats_shape, x.options().dtype(at::kFloat));

  // the specialization: dtypes (kernel dtypes only, so 5 bits each), presence and 16-byte alignment of the inputs
  const std::optional<at::Tensor>* inputs[4] = {&call.branch, &call.gamma, &call.weight, &call.bias};
  int32_t dtypes = static_cast<int32_t>(x.scalar_type());
  int32_t alignment = aligned(x);
  for (const auto* t : inputs) {
    dtypes = dtypes * 32 + (t->has_value() ? static_cast<int32_t>((*t)->scalar_type()) + 1 : 0);
    alignment = alignment * 2 + (t->has_value() && aligned(**t));
  }
  LayerNormKey key{call.state.token, call.rows, call.cols, x.device().index(), dtypes, alignment};

  Ref rows(PyLong_FromLongLong(call.rows));
  Ref cols(PyLong_FromLongLong(call.cols));
  if (!rows || !cols) {
    throw python_error();
  }
  // a cached launch was compiled for 16-byte-aligned outputs (the allocators' outputs always are; checked anyway)
  auto found = layer_norm_launches->find(key);
  if (found != layer_norm_launches->end() && outputs_aligned({out, residual_out, mean, rstd})) {
    Ref outs[4] = {Ref(THPVariable_Wrap(out)), Ref(THPVariable_Wrap(residual_out)), Ref(THPVariable_Wrap(mean)),
                   Ref(THPVariable_Wrap(rstd))};
    for (const Ref& o : outs) {
      if (!o) {
        throw python_error();
      }
    }
    replay(found->second, call.state,
           layer_norm_arguments(call, outs[0].get(), outs[1].get(), outs[2].get(), outs[3].get(), rows.get(),
                                cols.get()));
    return {out, residual_out, mean, rstd};
  }
  // a specialization's first call: the Python launcher runs (and compiles), its launch recorded
  Ref filled(PyObject_Vectorcall(layer_norm_setup->fill.get(), call.objects, 6, nullptr));
  if (!filled) {
    throw python_error();
  }
  if (!PyTuple_Check(filled.get()) || PyTuple_GET_SIZE(filled.get()) != 2 ||
      !PyTuple_Check(PyTuple_GET_ITEM(filled.get(), 0)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(filled.get(), 0)) != 4) {
    PyErr_SetString(PyExc_TypeError, "vitfast: the native fill must answer ((out, residual_out, mean, rstd), entry)");
    throw python_error();
  }
  PyObject* outputs = PyTuple_GET_ITEM(filled.get(), 0);
  variable_list result;
  for (Py_ssize_t i = 0; i < 4; ++i) {
    PyObject* o = PyTuple_GET_ITEM(outputs, i);
    if (!THPVariable_Check(o)) {
      PyErr_SetString(PyExc_TypeError, "vitfast: the native fill answered a non-tensor output");
      throw python_error();
    }
    result.push_back(THPVariable_Unpack(o));
  }
  auto launch = filled_launch(
      PyTuple_GET_ITEM(filled.get(), 1),
      layer_norm_arguments(call, PyTuple_GET_ITEM(outputs, 0), PyTuple_GET_ITEM(outputs, 1),
                           PyTuple_GET_ITEM(outputs, 2), PyTuple_GET_ITEM(outputs, 3), rows.get(), cols.get()));
  if (launch.has_value() && outputs_aligned(result)) {
    if (layer_norm_launches->size() >= kMaxLaunches) {
      layer_norm_launches->clear();  // many row counts (varying shapes): refilled as they recur
    }
    layer_norm_launches->emplace(key, std::move(*launch));
  }
  return result;
}

}  // namespace

// named (not in the anonymous namespace): its autograd node's name() is CppNode<vitfast::eager::LayerNormFunction>
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& branch,
      const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, LayerNormCall* call) {
    variable_list outputs = layer_norm_forward(*call);
    // what layer_norm_setup_context saves: the normalized tensor (x, or residual_out), the branch only with a layer
    // scale, the parameters and the statistics
    bool has_branch = branch.has_value();
    at::Tensor undefined;
    ctx->save_for_backward({has_branch ? outputs[1] : x, has_branch && gamma.has_value() ? *branch : undefined,
                            gamma.value_or(undefined), weight.value_or(undefined), bias.value_or(undefined),
                            outputs[2], outputs[3]});
    ctx->saved_data["branch_dtype"] = has_branch ? static_cast<int64_t>(branch->scalar_type()) : int64_t{-1};
    ctx->mark_non_differentiable({outputs[2], outputs[3]});
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    int64_t branch_dtype = ctx->saved_data["branch_dtype"].toInt();
    variable_list result(6);  // x, branch, gamma, weight, bias, and none for the call
    pybind11::gil_scoped_acquire gil;
    try {
      std::vector<Ref> args;
      args.emplace_back(THPVariable_Wrap(grads[0]));
      args.emplace_back(THPVariable_Wrap(grads[1]));
      for (const at::Tensor& t : saved) {
        args.emplace_back(THPVariable_Wrap(t));  // an undefined tensor wraps as None
      }
      if (branch_dtype >= 0) {
        args.push_back(borrowed(reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(branch_dtype)))));
      } else {
        args.push_back(borrowed(Py_None));
      }
      std::vector<PyObject*> call;
      for (const Ref& a : args) {
        if (!a) {
          throw python_error();
        }
        call.push_back(a.get());
      }
      Ref grads_in(PyObject_Vectorcall(layer_norm_setup->backward.get(), call.data(), call.size(), nullptr));
      if (!grads_in) {
        throw python_error();
      }
      if (!PyTuple_Check(grads_in.get()) || PyTuple_GET_SIZE(grads_in.get()) != 5) {
        PyErr_SetString(PyExc_TypeError, "vitfast: the native backward must answer 5 gradients");
        throw python_error();
      }
      for (Py_ssize_t i = 0; i < 5; ++i) {
        PyObject* g = PyTuple_GET_ITEM(grads_in.get(), i);
        if (g != Py_None) {
          result[i] = THPVariable_Unpack(g);
        }
      }
    } catch (python_error& error) {
      error.persist();  // the engine re-raises it in the thread that called backward, which holds no Python error
      throw;
    }
    return result;
  }
};

namespace {

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// vitfast._C.layer_norm_fwd_native(x, branch, gamma, weight, bias, eps) -> (out, residual_out, mean, rstd) or
// NotImplemented (the Python path runs).
PyObject* layer_norm_fwd_native(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (layer_norm_setup == nullptr || nargs != 6 || !PyFloat_CheckExact(args[5])) {
    return not_implemented();
  }
  LayerNormCall call;
  for (int i = 0; i < 6; ++i) {
    call.objects[i] = args[i];
  }
  std::optional<at::Tensor> x;
  if (args[0] == Py_None || !unpack(args[0], x) || !unpack(args[1], call.branch) || !unpack(args[2], call.gamma) ||
      !unpack(args[3], call.weight) || !unpack(args[4], call.bias)) {
    return not_implemented();
  }
  call.x = *x;
  const at::Tensor& t = call.x;
  if (t.dim() < 1 || !kernel_dtype(t.scalar_type()) || !t.is_contiguous()) {
    return not_implemented();
  }
  call.cols = t.size(-1);
  if (call.cols < 1 || call.cols > layer_norm_setup->max_width || t.numel() == 0) {
    return not_implemented();
  }
  call.rows = t.numel() / call.cols;
  bool cuda = t.is_cuda();
  if (!cuda && !(layer_norm_setup->cpu && t.is_cpu())) {
    return not_implemented();
  }
  auto device = t.device();
  if (call.gamma.has_value() && !call.branch.has_value()) {
    return not_implemented();
  }
  if (call.branch.has_value()) {
    const at::Tensor& b = *call.branch;
    if (b.device() != device || b.sizes() != t.sizes() || !b.is_contiguous() || !kernel_dtype(b.scalar_type())) {
      return not_implemented();
    }
  }
  for (const auto* p : {&call.gamma, &call.weight, &call.bias}) {
    if (p->has_value()) {
      const at::Tensor& q = **p;
      if (q.device() != device || q.dim() != 1 || q.size(0) != call.cols || q.stride(0) != 1 ||
          !kernel_dtype(q.scalar_type())) {
        return not_implemented();
      }
    }
  }
  if (!launch_state(layer_norm_setup->state.get(), call.state)) {
    return not_implemented();
  }
  bool grad = at::GradMode::is_enabled() &&
              (t.requires_grad() || (call.branch.has_value() && call.branch->requires_grad()) ||
               (call.gamma.has_value() && call.gamma->requires_grad()) ||
               (call.weight.has_value() && call.weight->requires_grad()) ||
               (call.bias.has_value() && call.bias->requires_grad()));
  variable_list outputs = grad ? LayerNormFunction::apply(t, call.branch, call.gamma, call.weight, call.bias, &call)
                               : layer_norm_forward(call);
  PyObject* result = PyTuple_New(4);
  if (result == nullptr) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < 4; ++i) {
    PyObject* o = THPVariable_Wrap(outputs[i]);
    if (o == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, i, o);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

// vitfast._C.layer_norm_native_setup(state, fill, backward, max_width, cpu): the Python callbacks (see the
// top of this file); a new setup forgets every cached launch.
PyObject* layer_norm_native_setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "layer_norm_native_setup(state, fill, backward, max_width, cpu)");
    return nullptr;
  }
  int64_t max_width = PyLong_AsLongLong(args[3]);
  if (max_width == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  if (layer_norm_setup == nullptr) {
    layer_norm_setup = new LayerNormSetup();
    layer_norm_launches = new std::unordered_map<LayerNormKey, Launch, LayerNormKeyHash>();
  }
  layer_norm_launches->clear();
  layer_norm_setup->state = borrowed(args[0]);
  layer_norm_setup->fill = borrowed(args[1]);
  layer_norm_setup->backward = borrowed(args[2]);
  layer_norm_setup->max_width = max_width;
  layer_norm_setup->cpu = PyObject_IsTrue(args[4]) == 1;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// vitfast._C.layer_norm_native_launches(): how many specializations are cached (tests).
PyObject* layer_norm_native_launches(PyObject*, PyObject*) {
  return PyLong_FromSize_t(layer_norm_launches == nullptr ? 0 : layer_norm_launches->size());
}

}  // namespace

}  // namespace vitfast::eager

// The module's methods from this file (csrc/module.cpp lists them).
PyMethodDef vitfast_eager_methods[] = {
    {"layer_norm_fwd_native", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                                  vitfast::eager::layer_norm_fwd_native)),
     METH_FASTCALL, "The eager LayerNorm forward in C++ (vitfast/ops/layer_norm.py), or NotImplemented."},
    {"layer_norm_native_setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                                    vitfast::eager::layer_norm_native_setup)),
     METH_FASTCALL, "Set the Python callbacks of the native LayerNorm path; forgets its cached launches."},
    {"layer_norm_native_launches", vitfast::eager::layer_norm_native_launches, METH_NOARGS,
     "How many specializations the native LayerNorm path has cached."},
    {nullptr, nullptr, 0, nullptr},
};
