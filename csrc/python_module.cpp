// The Python module `sr3fast._C`. Loading it registers the sr3fast::* ops with the dispatcher
// (TORCH_LIBRARY static initialisers), reached through torch.ops.sr3fast. The pybind11 bindings
// are the sampling loop for Python, whose denoiser may be a Python callable (a type no op schema
// can take), and the metadata of the packages that loop loads.
//
// torch's BuildExtension defines TORCH_EXTENSION_NAME; a CMake build (a plain C++ library) does
// not, and then this file compiles to nothing and needs no Python headers.
#ifdef TORCH_EXTENSION_NAME
#include <optional>
#include <string>

#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "sampler/aoti.h"
#include "sampler/sampler.h"

namespace {

namespace py = pybind11;

// The denoiser of one sampling call: the path of an AOTInductor package (run without the GIL),
// or a Python callable f(x, y_t, gamma) -> eps (run with it).
sr3fast::Denoiser make_denoiser(const py::object& denoiser, const c10::Device& device) {
  if (py::isinstance<py::str>(denoiser)) {
    return sr3fast::aoti_denoiser(sr3fast::aoti_package(denoiser.cast<std::string>(), device));
  }
  if (!PyCallable_Check(denoiser.ptr())) {
    throw py::type_error("denoiser must be a package path (str) or a callable f(x, y_t, gamma) -> "
                         "eps, got " + std::string(py::str(py::type::of(denoiser))));
  }
  return [denoiser](const at::Tensor& x, const at::Tensor& y_t, const at::Tensor& gamma) {
    const py::gil_scoped_acquire gil;
    const py::object eps = denoiser(x, y_t, gamma);
    if (!THPVariable_Check(eps.ptr())) {
      throw py::type_error("the denoiser must return a tensor (eps), it returned " +
                           std::string(py::str(py::type::of(eps))));
    }
    return THPVariable_Unpack(eps.ptr());
  };
}

// sr3fast::sample (csrc/sampler/sampler.h) for Python: every step in C++, the GIL released except
// while a Python denoiser or callback runs. callback(i, y) after loop step i, optional;
// history: SampleOptions::history, the past x0 estimates each step carries (0, 1 or 2).
at::Tensor sample(const py::object& denoiser, const at::Tensor& x, const at::Tensor& y_T,
                  const at::Tensor& coefs, const at::Tensor& gammas, std::optional<double> clip,
                  bool stochastic, bool kernel_noise, std::optional<at::Generator> generator,
                  const py::object& callback, int64_t history) {
  const c10::DeviceGuard guard(x.device());
  sr3fast::SampleOptions options;
  options.clip = clip;
  options.stochastic = stochastic;
  options.noise = kernel_noise ? sr3fast::NoiseSource::kKernel : sr3fast::NoiseSource::kTorch;
  options.generator = std::move(generator);
  options.history = history;
  if (!callback.is_none()) {
    options.callback = [callback](int64_t step, const at::Tensor& y) {
      const py::gil_scoped_acquire gil;
      callback(step, y);
    };
  }
  // Built and destroyed with the GIL held: they own references to Python objects.
  const sr3fast::Denoiser denoise = make_denoiser(denoiser, x.device());
  at::Tensor y_0;
  {
    const py::gil_scoped_release no_gil;
    y_0 = sr3fast::sample(denoise, x, y_T, coefs, gammas, options);
  }
  return y_0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sr3fast's compiled ops; importing registers them as torch.ops.sr3fast.*";
  m.def("sample", &sample, py::arg("denoiser"), py::arg("x"), py::arg("y_T"), py::arg("coefs"),
        py::arg("gammas"), py::arg("clip"), py::arg("stochastic"), py::arg("kernel_noise"),
        py::arg("generator"), py::arg("callback"), py::arg("history") = 0,
        "Every step of an SR3 sampler in C++; denoiser: package path or f(x, y_t, gamma) -> eps. "
        "history: past x0 estimates each step carries, 0 (single step), 1 (x0_prev, DPM-Solver++ "
        "2M; coefs (T, B, 6|7)) or 2 (x0_prev and x0_prev2, 3M; coefs (T, B, 7)). Returns y_0 "
        "(float32). See sr3fast.diffusion.loops.");
  m.def(
      "package_metadata",
      [](const std::string& path, const c10::Device& device) {
        // The first call loads the package, with the GIL held, as torch's own loader binding
        // does (torch._C._aoti) and as sample() does: loading runs the package library's
        // initialisers and creates the runner, nothing of which is promised to be free of Python
        // (the GPU session's segfault was inside this call while it ran without the GIL).
        return sr3fast::aoti_package(path, device).get_metadata();
      },
      py::arg("path"), py::arg("device"),
      "The metadata of the package at path, loaded onto device into the cache sample() uses.");
}
#endif
