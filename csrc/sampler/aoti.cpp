// sr3fast::sample_aoti: the C++ sampling loop (sampler.h) with an AOTInductor-compiled denoiser,
// so a whole sampling call runs without returning to Python between steps.
#include "sampler/aoti.h"

#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace sr3fast {

using torch::inductor::AOTIModelPackageLoader;

AOTIModelPackageLoader& aoti_package(const std::string& path, const c10::Device& device) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, std::string>, std::unique_ptr<AOTIModelPackageLoader>>
      loaders;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& loader = loaders[{path, device.str()}];
  if (!loader) {
    const c10::DeviceGuard guard(device);  // a CUDA package loads onto the current device
    loader = std::make_unique<AOTIModelPackageLoader>(path);
  }
  return *loader;
}

Denoiser aoti_denoiser(AOTIModelPackageLoader& package) {
  return [&package](const at::Tensor& x, const at::Tensor& y_t, const at::Tensor& gamma) {
    auto outputs = package.run({x, y_t, gamma});
    TORCH_CHECK(outputs.size() == 1, "sr3fast: a denoiser package must return one tensor (eps), "
                "it returned ", outputs.size());
    return outputs[0];
  };
}

namespace {

at::Tensor sample_aoti(c10::string_view denoiser, const at::Tensor& x, const at::Tensor& y_T,
                       const at::Tensor& coefs, const at::Tensor& gammas,
                       std::optional<double> clip, bool stochastic, bool kernel_noise,
                       std::optional<at::Generator> generator) {
  const c10::DeviceGuard guard(x.device());
  SampleOptions options;
  options.clip = clip;
  options.stochastic = stochastic;
  options.noise = kernel_noise ? NoiseSource::kKernel : NoiseSource::kTorch;
  options.generator = std::move(generator);
  return sample(aoti_denoiser(aoti_package(std::string(denoiser), x.device())), x, y_T, coefs,
                gammas, options);
}

}  // namespace

// One implementation for every device: it calls the device's reverse_step through the dispatcher.
TORCH_LIBRARY_IMPL(sr3fast, CompositeExplicitAutograd, m) { m.impl("sample_aoti", &sample_aoti); }

}  // namespace sr3fast
