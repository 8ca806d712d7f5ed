// sr3fast::sample_aoti: the C++ sampling loop (sampler.h) with an AOTInductor-compiled denoiser,
// so a whole sampling call runs without returning to Python between steps. The package is
// loaded once per (path, device) and kept for the life of the process.
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include <c10/core/DeviceGuard.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/library.h>

#include "sampler/sampler.h"

namespace sr3fast {
namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;

Loader& loader_for(const std::string& package, const c10::Device& device) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, std::string>, std::unique_ptr<Loader>> loaders;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& loader = loaders[{package, device.str()}];
  if (!loader) {
    const c10::DeviceGuard guard(device);  // a CUDA package loads onto the current device
    loader = std::make_unique<Loader>(package);
  }
  return *loader;
}

at::Tensor sample_aoti(c10::string_view denoiser, const at::Tensor& x, const at::Tensor& y_T,
                       const at::Tensor& coefs, const at::Tensor& gammas,
                       std::optional<double> clip, bool stochastic, bool kernel_noise,
                       std::optional<at::Generator> generator) {
  const c10::DeviceGuard guard(x.device());
  Loader& loader = loader_for(std::string(denoiser), x.device());
  const Denoiser denoise = [&loader](const at::Tensor& cond, const at::Tensor& y_t,
                                     const at::Tensor& gamma) {
    auto outputs = loader.run({cond, y_t, gamma});
    TORCH_CHECK(outputs.size() == 1, "sr3fast::sample_aoti: the denoiser package must return "
                "one tensor (eps), it returned ", outputs.size());
    return outputs[0];
  };
  SampleOptions options;
  options.clip = clip;
  options.stochastic = stochastic;
  options.noise = kernel_noise ? NoiseSource::kKernel : NoiseSource::kTorch;
  options.generator = std::move(generator);
  return sample(denoise, x, y_T, coefs, gammas, options);
}

}  // namespace

// One implementation for every device: it calls the device's reverse_step through the dispatcher.
TORCH_LIBRARY_IMPL(sr3fast, CompositeExplicitAutograd, m) { m.impl("sample_aoti", &sample_aoti); }

}  // namespace sr3fast
