// The Python module of vitfast's compiled extension (vitfast._C, or load_jit's build): loading it registers the ops
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks of the op files run as the library loads); the module itself
// says what was built and holds the native eager path's functions (csrc/eager.cpp). Plain CPython API: torch/extension.h
// or pybind11 would triple the build time of the CPU part for one function.
#include <Python.h>

#define VITFAST_STRINGIFY_(x) #x
#define VITFAST_STRINGIFY(x) VITFAST_STRINGIFY_(x)
#define VITFAST_CONCAT_(a, b) a##b
#define VITFAST_CONCAT(a, b) VITFAST_CONCAT_(a, b)

// the native eager launch path (csrc/eager.cpp)
extern PyMethodDef vitfast_eager_methods[];

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef VITFAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled into this build."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    VITFAST_STRINGIFY(TORCH_EXTENSION_NAME),
    "vitfast's compiled ops, registered as torch.ops.vitfast.*; use them through vitfast.ops.",
    -1,
    methods,
};

}  // namespace

PyMODINIT_FUNC VITFAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddFunctions(module, vitfast_eager_methods) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
