// The Python module `sr3fast._C`: an empty module whose only job is to load this shared library,
// so that the TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initialisers register the sr3fast::* ops
// with the dispatcher. The ops themselves are reached through torch.ops.sr3fast, not pybind11.
//
// torch's BuildExtension defines TORCH_EXTENSION_NAME; a CMake build (a plain C++ library) does
// not, and then this file compiles to nothing and needs no Python headers.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define SR3FAST_CONCAT_(a, b) a##b
#define SR3FAST_CONCAT(a, b) SR3FAST_CONCAT_(a, b)
#define SR3FAST_STRINGIFY_(a) #a
#define SR3FAST_STRINGIFY(a) SR3FAST_STRINGIFY_(a)

extern "C" PyMODINIT_FUNC SR3FAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      SR3FAST_STRINGIFY(TORCH_EXTENSION_NAME),
      "sr3fast's compiled ops; importing registers them as torch.ops.sr3fast.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
#endif
