// The native half of the eager launch path (vitfast/ops/_triton.py): an eager op call whose host work is C++.
//
// On the Python eager path one LayerNorm call costs ~30 us of host time at best against ~7 us for aten's
// F.layer_norm (benchmarks/results/2026-12-01_host_overhead_lean.md): the autograd node of torch.autograd.Function
// alone costs more than aten's whole op, and each output allocation ~2 us. Here the checks, the output allocation,
// the autograd node (a C++ torch::autograd::Function) and the launch cache's key are C++, for the ops below
// (the forwards of LayerNorm, of attention without a bias and of SwiGLU + sub-LN, and 2D RoPE: one launch each);
// what stays Python is decided once per specialization, by the Python path itself:
//
// - the launch: the compiled kernel's own launcher (Triton's), called with exactly the arguments JITFunction.run
//   passes (the replay contract of _triton.LaunchCache). A specialization's first call runs the Python launcher
//   ("fill", a Python callback), whose one launch is recorded; its arguments are compared slot by slot with the list
//   this file builds from the same call, and only an identical list is cached (anything else stays on the Python
//   path, every call). Under Triton's interpreter the "launcher" is a Python closure over kernel[grid].
// - the launch state (a Python callback, once per call): whether a replay is allowed now (no launch hooks; the
//   debug knobs, PDL, driver, device, plan settings and kernel globals in a token that keys the cache), the stream,
//   the hooks to pass on. Tracing (dynamo, fake tensors, functorch, jit.trace) is refused before this is called.
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
#include <cstring>
#include <functional>
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

// Whether the positional arguments a fill's launch was recorded with (a tuple) are exactly ``args``: the same tensor
// objects and equal ints and floats of the same types, slot by slot.
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

// A tensor argument that must be given: false for None too.
bool unpack_required(PyObject* object, std::optional<at::Tensor>& out) {
  return object != Py_None && unpack(object, out);
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

// ------------------------------------------------------------------------------------------- shared by every op

Ref wrap(const at::Tensor& t) {
  Ref object(THPVariable_Wrap(t));  // an undefined tensor wraps as None
  if (!object) {
    throw python_error();
  }
  return object;
}

Ref int_object(int64_t value) {
  Ref object(PyLong_FromLongLong(value));
  if (!object) {
    throw python_error();
  }
  return object;
}

int64_t float_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// A specialization's key: what decides its launch besides the tensors' addresses (the launch state's token, sizes,
// strides, dtypes, alignment, scalar arguments), as integers.
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

constexpr size_t kMaxLaunches = 4096;  // cached specializations per op; emptied (and refilled as they recur) past it

// One op's native path: its Python callbacks, whether it takes CPU tensors, its cached launches.
struct NativeOp {
  Ref state, fill, backward;
  bool cpu = false;  // also CPU tensors: under Triton's interpreter, or the host-overhead probe's stand-in GPU
  std::unordered_map<Key, Launch, KeyHash> launches;
};

// Set up an op's native path from (state, fill, backward, cpu, ...): a new setup forgets its cached launches.
void set_up(NativeOp*& op, PyObject* const* args) {
  if (op == nullptr) {
    op = new NativeOp();  // never freed: it holds Python references past finalization
  }
  op->launches.clear();
  op->state = borrowed(args[0]);
  op->fill = borrowed(args[1]);
  op->backward = borrowed(args[2]);
  op->cpu = PyObject_IsTrue(args[3]) == 1;
}

// Whether the kernels can take a tensor on this device: a CUDA GPU, or the CPU where the op's setup says so.
bool on_kernel_device(const NativeOp& op, const at::Tensor& t) { return t.is_cuda() || (op.cpu && t.is_cpu()); }

// The forward of one call: replay the cached launch of ``key`` with ``outputs`` (allocated by the caller), or, at a
// specialization's first call, run the fill (the Python path, on the call's Python arguments ``objects``) and keep
// its launch when its recorded arguments are exactly ``arguments`` of the fill's outputs. Returns the outputs.
variable_list run_forward(
    NativeOp& op, const State& state, PyObject* const* objects, size_t count, Key&& key, variable_list outputs,
    const std::function<std::vector<PyObject*>(const std::vector<PyObject*>&)>& arguments) {
  auto found = op.launches.find(key);
  // a cached launch was compiled for 16-byte-aligned outputs (the allocators' outputs always are; checked anyway)
  if (found != op.launches.end() && outputs_aligned(outputs)) {
    std::vector<Ref> owned;
    std::vector<PyObject*> wrapped;
    for (const at::Tensor& t : outputs) {
      owned.push_back(wrap(t));
      wrapped.push_back(owned.back().get());
    }
    replay(found->second, state, arguments(wrapped));
    return outputs;
  }
  Ref filled(PyObject_Vectorcall(op.fill.get(), objects, count, nullptr));
  if (!filled) {
    throw python_error();
  }
  PyObject* answer = filled.get();
  if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(answer, 0)) ||
      PyTuple_GET_SIZE(PyTuple_GET_ITEM(answer, 0)) != static_cast<Py_ssize_t>(outputs.size())) {
    PyErr_SetString(PyExc_TypeError, "vitfast: a native fill must answer (the op's outputs, launch)");
    throw python_error();
  }
  PyObject* filled_outputs = PyTuple_GET_ITEM(answer, 0);
  variable_list result;
  std::vector<PyObject*> objects_out;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(filled_outputs); ++i) {
    PyObject* o = PyTuple_GET_ITEM(filled_outputs, i);
    if (!THPVariable_Check(o)) {
      PyErr_SetString(PyExc_TypeError, "vitfast: a native fill answered a non-tensor output");
      throw python_error();
    }
    result.push_back(THPVariable_Unpack(o));
    objects_out.push_back(o);
  }
  auto launch = filled_launch(PyTuple_GET_ITEM(answer, 1), arguments(objects_out));
  if (launch.has_value() && outputs_aligned(result)) {
    if (op.launches.size() >= kMaxLaunches) {
      op.launches.clear();  // many shapes (varying row counts): refilled as they recur
    }
    op.launches.emplace(std::move(key), std::move(*launch));
  }
  return result;
}

// An op's Python backward, called from the autograd engine (which runs it without the GIL: every Python object
// here is made under the GIL taken below): the gradients it uses and the saved tensors (undefined ones as None), then
// ``extra()`` (a new reference) as arguments; it answers ``count`` gradients (None as undefined), which this returns with one undefined more, for the
// forward's last argument (the call, not a tensor). A Python error is kept for the engine, which re-raises it in the
// thread that called backward.
variable_list call_backward(const NativeOp& op, AutogradContext* ctx, const variable_list& grads, size_t used_grads,
                            const std::function<Ref()>& extra, size_t count) {
  // the gradients of the first ``used_grads`` outputs, then what the forward saved
  variable_list tensors(grads.begin(), grads.begin() + static_cast<std::ptrdiff_t>(used_grads));
  for (const at::Tensor& t : ctx->get_saved_variables()) {
    tensors.push_back(t);
  }
  pybind11::gil_scoped_acquire gil;
  try {
    std::vector<Ref> owned;
    std::vector<PyObject*> args;
    for (const at::Tensor& t : tensors) {
      owned.push_back(wrap(t));
      args.push_back(owned.back().get());
    }
    owned.push_back(extra());
    if (!owned.back()) {
      throw python_error();
    }
    args.push_back(owned.back().get());
    Ref answer(PyObject_Vectorcall(op.backward.get(), args.data(), args.size(), nullptr));
    if (!answer) {
      throw python_error();
    }
    if (!PyTuple_Check(answer.get()) || PyTuple_GET_SIZE(answer.get()) != static_cast<Py_ssize_t>(count)) {
      PyErr_Format(PyExc_TypeError, "vitfast: a native backward must answer %zu gradients", count);
      throw python_error();
    }
    variable_list grads(count + 1);
    for (size_t i = 0; i < count; ++i) {
      PyObject* g = PyTuple_GET_ITEM(answer.get(), i);
      if (g != Py_None) {
        if (!THPVariable_Check(g)) {
          PyErr_SetString(PyExc_TypeError, "vitfast: a native backward answered a non-tensor gradient");
          throw python_error();
        }
        grads[i] = THPVariable_Unpack(g);
      }
    }
    return grads;
  } catch (python_error& error) {
    error.persist();
    throw;
  }
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

PyObject* output_tuple(const variable_list& outputs) {
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

bool wants_grad(std::initializer_list<const std::optional<at::Tensor>*> tensors) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const auto* t : tensors) {
    if (t->has_value() && (*t)->requires_grad()) {
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------------- LayerNorm

// vitfast::layer_norm_fwd(x, branch, gamma, weight, bias, eps) -> (out, residual_out, mean, rstd): the launch of
// _layer_norm_fwd_kernel as layer_norm_fwd (vitfast/ops/layer_norm.py) makes it for contiguous tensors.
NativeOp* layer_norm_op = nullptr;
int64_t layer_norm_max_width = 0;

struct LayerNormCall {
  PyObject* objects[6];  // x, branch, gamma, weight, bias, eps (borrowed)
  std::optional<at::Tensor> x, branch, gamma, weight, bias;
  int64_t rows = 0, cols = 0;
  State state;
};

variable_list layer_norm_forward(LayerNormCall& call) {
  const at::Tensor& x = *call.x;
  bool has_branch = call.branch.has_value();
  auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  variable_list outputs = {
      at::empty(x.sizes(), x.options()), has_branch ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options()),
      at::empty(stats_shape, x.options().dtype(at::kFloat)), at::empty(stats_shape, x.options().dtype(at::kFloat))};
  // the specialization: the rows, the dtypes, presence and 16-byte alignment of the inputs (the kernel's ints are
  // rows and cols, its row strides cols: contiguous tensors)
  Key key = {call.state.token, call.rows, call.cols, x.device().index()};
  for (const auto* t : {&call.x, &call.branch, &call.gamma, &call.weight, &call.bias}) {
    key.push_back(t->has_value() ? static_cast<int64_t>((*t)->scalar_type()) * 2 + aligned(**t) : -1);
  }
  Ref rows = int_object(call.rows);
  Ref cols = int_object(call.cols);
  auto arguments = [&](const std::vector<PyObject*>& outs) -> std::vector<PyObject*> {
    PyObject* x_object = call.objects[0];
    auto or_x = [&](int slot) { return call.objects[slot] == Py_None ? x_object : call.objects[slot]; };
    // absent tensors stand in as x (never read: constexpr flags), residual_out as out without a branch
    return {x_object, or_x(1), or_x(2), or_x(3), or_x(4), outs[0], has_branch ? outs[1] : outs[0], outs[2],
            outs[3], rows.get(), cols.get(), cols.get(), cols.get(), call.objects[5]};
  };
  return run_forward(*layer_norm_op, call.state, call.objects, 6, std::move(key), std::move(outputs), arguments);
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
    // _layer_norm_grads(d_out, d_residual, *saved, branch_dtype) -> (dx, dbranch, dgamma, dweight, dbias)
    int64_t branch_dtype = ctx->saved_data["branch_dtype"].toInt();
    auto dtype = [branch_dtype] {
      return borrowed(branch_dtype >= 0 ? reinterpret_cast<PyObject*>(
                                              torch::getTHPDtype(static_cast<at::ScalarType>(branch_dtype)))
                                        : Py_None);
    };
    return call_backward(*layer_norm_op, ctx, grads, 2, dtype, 5);
  }
};

namespace {

// vitfast._C.layer_norm_fwd_native(x, branch, gamma, weight, bias, eps) -> (out, residual_out, mean, rstd) or
// NotImplemented (the Python path runs).
PyObject* layer_norm_fwd_native(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (layer_norm_op == nullptr || nargs != 6 || !PyFloat_CheckExact(args[5])) {
    return not_implemented();
  }
  LayerNormCall call;
  std::memcpy(call.objects, args, sizeof(call.objects));
  if (!unpack_required(args[0], call.x) || !unpack(args[1], call.branch) || !unpack(args[2], call.gamma) ||
      !unpack(args[3], call.weight) || !unpack(args[4], call.bias)) {
    return not_implemented();
  }
  const at::Tensor& t = *call.x;
  if (t.dim() < 1 || !kernel_dtype(t.scalar_type()) || !t.is_contiguous() || !on_kernel_device(*layer_norm_op, t)) {
    return not_implemented();
  }
  call.cols = t.size(-1);
  if (call.cols < 1 || call.cols > layer_norm_max_width || t.numel() == 0) {
    return not_implemented();
  }
  call.rows = t.numel() / call.cols;
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
  if (!launch_state(layer_norm_op->state.get(), call.state)) {
    return not_implemented();
  }
  bool grad = wants_grad({&call.x, &call.branch, &call.gamma, &call.weight, &call.bias});
  return output_tuple(grad ? LayerNormFunction::apply(t, call.branch, call.gamma, call.weight, call.bias, &call)
                           : layer_norm_forward(call));
  END_HANDLE_TH_ERRORS
}

// vitfast._C.layer_norm_fwd_native_setup(state, fill, backward, cpu, max_width)
PyObject* layer_norm_fwd_native_setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "layer_norm_fwd_native_setup(state, fill, backward, cpu, max_width)");
    return nullptr;
  }
  int64_t max_width = PyLong_AsLongLong(args[4]);
  if (max_width == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  set_up(layer_norm_op, args);
  layer_norm_max_width = max_width;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------------------------------------- attention

// vitfast::attention_fwd(q, k, v, scale, None, None, None) -> (out, lse): the launch of _attention_fwd_kernel as
// attention_fwd (vitfast/ops/attention.py) makes it without a bias, for q, k, v of any strides.
NativeOp* attention_op = nullptr;
std::vector<int64_t> attention_head_dims;
double attention_log2e = 0.0;  // Python's math.log2(math.e), so that scale * log2(e) is the Python path's product

struct AttentionCall {
  PyObject* objects[7];  // q, k, v, scale, table, index, bias (borrowed)
  std::optional<at::Tensor> q, k, v;
  double scale = 0.0;
  State state;
};

variable_list attention_forward(AttentionCall& call) {
  const at::Tensor& q = *call.q;
  int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  // out: the [B, H, N, D] view of a contiguous [B, N, H, D] tensor; lse: fp32 [B, H, N]
  std::array<int64_t, 4> out_strides = {seq_len * heads * head_dim, head_dim, heads * head_dim, 1};
  variable_list outputs = {at::empty_strided(q.sizes(), out_strides, q.options()),
                           at::empty({batch, heads, seq_len}, q.options().dtype(at::kFloat))};
  Key key = {call.state.token, q.device().index(), static_cast<int64_t>(q.scalar_type()), float_bits(call.scale)};
  for (const auto* t : {&call.q, &call.k, &call.v}) {
    key.push_back(aligned(**t));
    for (int64_t d = 0; d < 4; ++d) {
      key.push_back((*t)->size(d));
      key.push_back((*t)->stride(d));
    }
  }
  // the kernel's ints: the strides of q, k, v and out, the (absent) bias' three, heads, tokens; then scale * log2(e)
  std::vector<Ref> ints;
  for (const auto* t : {&call.q, &call.k, &call.v}) {
    for (int64_t d = 0; d < 4; ++d) {
      ints.push_back(int_object((*t)->stride(d)));
    }
  }
  for (int64_t stride : out_strides) {
    ints.push_back(int_object(stride));
  }
  Ref zero = int_object(0), heads_object = int_object(heads), tokens = int_object(seq_len);
  Ref scale_log2(PyFloat_FromDouble(call.scale * attention_log2e));
  if (!scale_log2) {
    throw python_error();
  }
  auto arguments = [&](const std::vector<PyObject*>& outs) -> std::vector<PyObject*> {
    std::vector<PyObject*> list = {call.objects[0], call.objects[1], call.objects[2], outs[0], outs[1],
                                   call.objects[0]};  // q stands in for the absent bias (BIAS = False)
    for (const Ref& i : ints) {
      list.push_back(i.get());
    }
    list.insert(list.end(), {zero.get(), zero.get(), zero.get(), heads_object.get(), tokens.get(), scale_log2.get()});
    return list;
  };
  return run_forward(*attention_op, call.state, call.objects, 7, std::move(key), std::move(outputs), arguments);
}

}  // namespace

// named: its autograd node's name() is CppNode<vitfast::eager::AttentionFunction>
struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionCall* call) {
    variable_list outputs = attention_forward(*call);
    ctx->save_for_backward({q, k, v, outputs[0], outputs[1]});  // what _attention_setup_context saves, bias-less
    ctx->saved_data["scale"] = call->scale;
    ctx->mark_non_differentiable({outputs[1]});
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // _attention_grads(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
    double scale = ctx->saved_data["scale"].toDouble();
    auto scale_object = [scale] { return Ref(PyFloat_FromDouble(scale)); };
    return call_backward(*attention_op, ctx, grads, 1, scale_object, 3);
  }
};

namespace {

// vitfast._C.attention_fwd_native(q, k, v, scale, table, index, bias) -> (out, lse) or NotImplemented.
PyObject* attention_fwd_native(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (attention_op == nullptr || nargs != 7 || !PyFloat_CheckExact(args[3]) || args[4] != Py_None ||
      args[5] != Py_None || args[6] != Py_None) {
    return not_implemented();  // the bias paths launch twice (gather, then attention): the Python path's
  }
  AttentionCall call;
  std::memcpy(call.objects, args, sizeof(call.objects));
  if (!unpack_required(args[0], call.q) || !unpack_required(args[1], call.k) || !unpack_required(args[2], call.v)) {
    return not_implemented();
  }
  call.scale = PyFloat_AS_DOUBLE(args[3]);
  const at::Tensor& q = *call.q;
  if (q.dim() != 4 || !kernel_dtype(q.scalar_type()) || !on_kernel_device(*attention_op, q) || q.numel() == 0) {
    return not_implemented();
  }
  for (const auto* t : {&call.k, &call.v}) {
    const at::Tensor& u = **t;
    if (u.sizes() != q.sizes() || u.scalar_type() != q.scalar_type() || u.device() != q.device()) {
      return not_implemented();
    }
  }
  bool head_dim_ok = false;
  for (int64_t d : attention_head_dims) {
    head_dim_ok = head_dim_ok || d == q.size(3);
  }
  if (!head_dim_ok || !launch_state(attention_op->state.get(), call.state)) {
    return not_implemented();
  }
  bool grad = wants_grad({&call.q, &call.k, &call.v});
  return output_tuple(grad ? AttentionFunction::apply(q, *call.k, *call.v, &call) : attention_forward(call));
  END_HANDLE_TH_ERRORS
}

// vitfast._C.attention_fwd_native_setup(state, fill, backward, cpu, head_dims, log2e)
PyObject* attention_fwd_native_setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !PyTuple_Check(args[4]) || !PyFloat_Check(args[5])) {
    PyErr_SetString(PyExc_TypeError, "attention_fwd_native_setup(state, fill, backward, cpu, head_dims, log2e)");
    return nullptr;
  }
  std::vector<int64_t> head_dims;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[4]); ++i) {
    head_dims.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(args[4], i)));
    if (PyErr_Occurred()) {
      return nullptr;
    }
  }
  set_up(attention_op, args);
  attention_head_dims = std::move(head_dims);
  attention_log2e = PyFloat_AS_DOUBLE(args[5]);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------------------------------- SwiGLU + sub-LN

// vitfast::swiglu_layer_norm_fwd(gate, up, weight, bias, eps, width) -> (out, mean, rstd): the launch of
// _swiglu_layer_norm_fwd_kernel as swiglu_layer_norm_fwd (vitfast/ops/swiglu.py) makes it for contiguous gate / up.
NativeOp* swiglu_layer_norm_op = nullptr;
int64_t swiglu_layer_norm_max_width = 0;

struct SwigluLayerNormCall {
  PyObject* objects[6];  // gate, up, weight, bias, eps, width (borrowed)
  std::optional<at::Tensor> gate, up, weight, bias;
  int64_t rows = 0, padded_width = 0, width = 0;
  State state;
};

variable_list swiglu_layer_norm_forward(SwigluLayerNormCall& call) {
  const at::Tensor& gate = *call.gate;
  auto stats_shape = gate.sizes().slice(0, gate.dim() - 1);
  variable_list outputs = {at::empty(gate.sizes(), gate.options()),
                           at::empty(stats_shape, gate.options().dtype(at::kFloat)),
                           at::empty(stats_shape, gate.options().dtype(at::kFloat))};
  int64_t param_width = call.weight->size(0);
  Key key = {call.state.token, gate.device().index(), call.rows, call.padded_width, call.width, param_width};
  for (const auto* t : {&call.gate, &call.up, &call.weight, &call.bias}) {
    key.push_back(static_cast<int64_t>((*t)->scalar_type()) * 2 + aligned(**t));
  }
  // the kernel's ints: rows, the norm's width, the rows' width, the parameters' length, the row strides of gate, up
  // and out (contiguous: the rows' width)
  Ref rows = int_object(call.rows), padded = int_object(call.padded_width), params = int_object(param_width);
  auto arguments = [&](const std::vector<PyObject*>& outs) -> std::vector<PyObject*> {
    return {call.objects[0], call.objects[1], call.objects[2], call.objects[3], outs[0],     outs[1],
            outs[2],         rows.get(),      call.objects[5], padded.get(),    params.get(), padded.get(),
            padded.get(),    padded.get(),    call.objects[4]};
  };
  return run_forward(*swiglu_layer_norm_op, call.state, call.objects, 6, std::move(key), std::move(outputs),
                     arguments);
}

}  // namespace

// named: its autograd node's name() is CppNode<vitfast::eager::SwigluLayerNormFunction>
struct SwigluLayerNormFunction : public torch::autograd::Function<SwigluLayerNormFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& weight,
      const at::Tensor& bias, SwigluLayerNormCall* call) {
    variable_list outputs = swiglu_layer_norm_forward(*call);
    ctx->save_for_backward({gate, up, weight, outputs[1], outputs[2]});  // what the setup context saves
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    ctx->saved_data["width"] = call->width;
    ctx->mark_non_differentiable({outputs[1], outputs[2]});
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // _swiglu_layer_norm_grads(grad, gate, up, weight, mean, rstd, (bias dtype, width)) -> (dgate, dup, dw, db)
    auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    int64_t width = ctx->saved_data["width"].toInt();
    auto extra = [bias_dtype, width] {
      return Ref(Py_BuildValue("(On)", reinterpret_cast<PyObject*>(torch::getTHPDtype(bias_dtype)),
                               static_cast<Py_ssize_t>(width)));
    };
    return call_backward(*swiglu_layer_norm_op, ctx, grads, 1, extra, 4);
  }
};

namespace {

// vitfast._C.swiglu_layer_norm_fwd_native(gate, up, weight, bias, eps, width) -> (out, mean, rstd) or
// NotImplemented.
PyObject* swiglu_layer_norm_fwd_native(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (swiglu_layer_norm_op == nullptr || nargs != 6 || !PyFloat_CheckExact(args[4]) || !PyLong_CheckExact(args[5])) {
    return not_implemented();
  }
  SwigluLayerNormCall call;
  std::memcpy(call.objects, args, sizeof(call.objects));
  if (!unpack_required(args[0], call.gate) || !unpack_required(args[1], call.up) ||
      !unpack_required(args[2], call.weight) || !unpack_required(args[3], call.bias)) {
    return not_implemented();
  }
  const at::Tensor& gate = *call.gate;
  const at::Tensor& up = *call.up;
  if (gate.dim() < 1 || !kernel_dtype(gate.scalar_type()) || !gate.is_contiguous() || !up.is_contiguous() ||
      up.sizes() != gate.sizes() || up.scalar_type() != gate.scalar_type() || up.device() != gate.device() ||
      !on_kernel_device(*swiglu_layer_norm_op, gate) || gate.numel() == 0) {
    return not_implemented();
  }
  call.padded_width = gate.size(-1);
  call.width = PyLong_AsLongLong(args[5]);
  if (call.width == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return not_implemented();
  }
  if (call.padded_width > swiglu_layer_norm_max_width || call.width < 1 || call.width > call.padded_width) {
    return not_implemented();
  }
  call.rows = gate.numel() / call.padded_width;
  const at::Tensor& weight = *call.weight;
  const at::Tensor& bias = *call.bias;
  for (const at::Tensor* p : {&weight, &bias}) {
    if (p->device() != gate.device() || p->dim() != 1 || p->size(0) != weight.size(0) || p->stride(0) != 1 ||
        !kernel_dtype(p->scalar_type())) {
      return not_implemented();
    }
  }
  if ((weight.size(0) != call.width && weight.size(0) != call.padded_width) ||
      !launch_state(swiglu_layer_norm_op->state.get(), call.state)) {
    return not_implemented();
  }
  bool grad = wants_grad({&call.gate, &call.up, &call.weight, &call.bias});
  return output_tuple(grad ? SwigluLayerNormFunction::apply(gate, up, weight, bias, &call)
                           : swiglu_layer_norm_forward(call));
  END_HANDLE_TH_ERRORS
}

// vitfast._C.swiglu_layer_norm_fwd_native_setup(state, fill, backward, cpu, max_width)
PyObject* swiglu_layer_norm_fwd_native_setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "swiglu_layer_norm_fwd_native_setup(state, fill, backward, cpu, max_width)");
    return nullptr;
  }
  int64_t max_width = PyLong_AsLongLong(args[4]);
  if (max_width == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  set_up(swiglu_layer_norm_op, args);
  swiglu_layer_norm_max_width = max_width;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// ------------------------------------------------------------------------------------------------------ 2D RoPE

// vitfast::rope_2d_qk(q, k, cos, sin, num_prefix_tokens, inverse) -> (q_out, k_out): the launch of _rope_qk_kernel
// as rope_2d_qk_fwd (vitfast/ops/rope.py) makes it for [B, H, N, D] q, k with unit stride along D and cos, sin of
// one strides.
NativeOp* rope_op = nullptr;

struct RopeCall {
  PyObject* objects[6];  // q, k, cos, sin, num_prefix_tokens, inverse (borrowed)
  std::optional<at::Tensor> q, k, cos, sin;
  int64_t prefix = 0;
  State state;
};

variable_list rope_forward(RopeCall& call) {
  const at::Tensor& q = *call.q;
  int64_t heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  // the [B, H, N, D] views of contiguous [B, N, H, D] tensors
  std::array<int64_t, 4> out_strides = {seq_len * heads * head_dim, head_dim, heads * head_dim, 1};
  variable_list outputs = {at::empty_strided(q.sizes(), out_strides, q.options()),
                           at::empty_strided(q.sizes(), out_strides, q.options())};
  Key key = {call.state.token, q.device().index(), static_cast<int64_t>(q.scalar_type()), call.prefix,
             call.objects[5] == Py_True};
  for (const auto* t : {&call.q, &call.k, &call.cos, &call.sin}) {
    key.push_back(static_cast<int64_t>((*t)->scalar_type()) * 2 + aligned(**t));
    for (int64_t d = 0; d < (*t)->dim(); ++d) {
      key.push_back((*t)->size(d));
      key.push_back((*t)->stride(d));
    }
  }
  const at::Tensor& cos = *call.cos;
  // the kernel's ints: q's and k's batch, token and head strides, out's batch and token strides, the table's row
  // stride and the stride between pairs (two columns for a [rows, D] table), the tokens, the prefix tokens
  std::vector<Ref> ints;
  for (const auto* t : {&call.q, &call.k}) {
    for (int64_t d : {0, 2, 1}) {
      ints.push_back(int_object((*t)->stride(d)));
    }
  }
  ints.push_back(int_object(out_strides[0]));
  ints.push_back(int_object(out_strides[2]));
  ints.push_back(int_object(cos.stride(0)));
  ints.push_back(int_object(cos.stride(1) * (cos.size(1) == head_dim ? 2 : 1)));
  ints.push_back(int_object(seq_len));
  auto arguments = [&](const std::vector<PyObject*>& outs) -> std::vector<PyObject*> {
    std::vector<PyObject*> list = {call.objects[0], call.objects[1], outs[0], outs[1], call.objects[2],
                                   call.objects[3]};
    for (const Ref& i : ints) {
      list.push_back(i.get());
    }
    list.push_back(call.objects[4]);
    return list;
  };
  return run_forward(*rope_op, call.state, call.objects, 6, std::move(key), std::move(outputs), arguments);
}

}  // namespace

// named: its autograd node's name() is CppNode<vitfast::eager::RopeFunction>
struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, RopeCall* call) {
    variable_list outputs = rope_forward(*call);
    ctx->save_for_backward({*call->cos, *call->sin});  // what _rope_2d_qk_setup_context saves
    ctx->saved_data["prefix"] = call->prefix;
    ctx->saved_data["inverse"] = call->objects[5] == Py_True;
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // _rope_2d_qk_grads(grad_q, grad_k, cos, sin, (num_prefix_tokens, inverse)) -> (dq, dk)
    int64_t prefix = ctx->saved_data["prefix"].toInt();
    bool inverse = ctx->saved_data["inverse"].toBool();
    auto extra = [prefix, inverse] {
      return Ref(Py_BuildValue("(nO)", static_cast<Py_ssize_t>(prefix), inverse ? Py_True : Py_False));
    };
    return call_backward(*rope_op, ctx, grads, 2, extra, 2);
  }
};

namespace {

// vitfast._C.rope_2d_qk_native(q, k, cos, sin, num_prefix_tokens, inverse) -> (q_out, k_out) or NotImplemented.
PyObject* rope_2d_qk_native(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (rope_op == nullptr || nargs != 6 || !PyLong_CheckExact(args[4]) || !PyBool_Check(args[5])) {
    return not_implemented();
  }
  RopeCall call;
  std::memcpy(call.objects, args, sizeof(call.objects));
  if (!unpack_required(args[0], call.q) || !unpack_required(args[1], call.k) || !unpack_required(args[2], call.cos) ||
      !unpack_required(args[3], call.sin)) {
    return not_implemented();
  }
  const at::Tensor& q = *call.q;
  const at::Tensor& k = *call.k;
  const at::Tensor& cos = *call.cos;
  const at::Tensor& sin = *call.sin;
  if (q.dim() != 4 || k.sizes() != q.sizes() || k.scalar_type() != q.scalar_type() ||
      !kernel_dtype(q.scalar_type()) || q.stride(3) != 1 || k.stride(3) != 1 || q.numel() == 0 ||
      !on_kernel_device(*rope_op, q) || k.device() != q.device() || q.size(3) % 2 != 0) {
    return not_implemented();
  }
  call.prefix = PyLong_AsLongLong(args[4]);
  if (call.prefix == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return not_implemented();
  }
  int64_t rows = q.size(2) - call.prefix, head_dim = q.size(3);
  if (call.prefix < 0 || rows < 0) {
    return not_implemented();
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    if (t->dim() != 2 || t->size(0) != rows || (t->size(1) != head_dim && t->size(1) != head_dim / 2) ||
        !t->is_floating_point() || t->device() != q.device() || t->sizes() != cos.sizes() ||
        t->strides() != cos.strides()) {
      return not_implemented();
    }
  }
  if (!launch_state(rope_op->state.get(), call.state)) {
    return not_implemented();
  }
  bool grad = wants_grad({&call.q, &call.k});
  return output_tuple(grad ? RopeFunction::apply(q, k, &call) : rope_forward(call));
  END_HANDLE_TH_ERRORS
}

// vitfast._C.rope_2d_qk_native_setup(state, fill, backward, cpu)
PyObject* rope_2d_qk_native_setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "rope_2d_qk_native_setup(state, fill, backward, cpu)");
    return nullptr;
  }
  set_up(rope_op, args);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// vitfast._C.native_launches(): cached specializations per op (tests).
PyObject* native_launches(PyObject*, PyObject*) {
  auto size = [](const NativeOp* op) { return static_cast<Py_ssize_t>(op == nullptr ? 0 : op->launches.size()); };
  return Py_BuildValue("{s:n,s:n,s:n,s:n}", "layer_norm", size(layer_norm_op), "attention", size(attention_op),
                       "swiglu_layer_norm", size(swiglu_layer_norm_op), "rope_2d_qk", size(rope_op));
}

}  // namespace

}  // namespace vitfast::eager

// The module's methods from this file (csrc/module.cpp adds them).
PyMethodDef vitfast_eager_methods[] = {
    {"layer_norm_fwd_native",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::layer_norm_fwd_native)),
     METH_FASTCALL, "The eager LayerNorm forward in C++ (vitfast/ops/layer_norm.py), or NotImplemented."},
    {"layer_norm_fwd_native_setup",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::layer_norm_fwd_native_setup)),
     METH_FASTCALL, "Set the Python side of the native LayerNorm path; forgets its cached launches."},
    {"attention_fwd_native",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::attention_fwd_native)),
     METH_FASTCALL, "The eager attention forward without a bias in C++ (vitfast/ops/attention.py), or NotImplemented."},
    {"attention_fwd_native_setup",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::attention_fwd_native_setup)),
     METH_FASTCALL, "Set the Python side of the native attention path; forgets its cached launches."},
    {"swiglu_layer_norm_fwd_native",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::swiglu_layer_norm_fwd_native)),
     METH_FASTCALL, "The eager SwiGLU + sub-LN forward in C++ (vitfast/ops/swiglu.py), or NotImplemented."},
    {"swiglu_layer_norm_fwd_native_setup",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::swiglu_layer_norm_fwd_native_setup)),
     METH_FASTCALL, "Set the Python side of the native SwiGLU + sub-LN path; forgets its cached launches."},
    {"rope_2d_qk_native",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::rope_2d_qk_native)), METH_FASTCALL,
     "The eager 2D RoPE of q and k in C++ (vitfast/ops/rope.py), or NotImplemented."},
    {"rope_2d_qk_native_setup",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(vitfast::eager::rope_2d_qk_native_setup)),
     METH_FASTCALL, "Set the Python side of the native 2D RoPE path; forgets its cached launches."},
    {"native_launches", vitfast::eager::native_launches, METH_NOARGS,
     "How many specializations each native eager path has cached."},
    {nullptr, nullptr, 0, nullptr},
};
