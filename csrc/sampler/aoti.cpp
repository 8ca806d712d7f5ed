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
  const c10::DeviceGuard guard(device);
  // The runner is made for the device named here, "cuda:N", not for whichever is current when a
  // bare "cuda" is resolved (inside the package's runtime): its constants and kernels then live
  // on the inputs' device. CPU runners take no index.
  const c10::DeviceIndex index =
      device.is_cpu() ? -1 : (device.has_index() ? device.index() : guard.current_device().index());
  const c10::Device runner_device(device.type(), index);
  auto& loader = loaders[{path, runner_device.str()}];
  if (!loader) {
    auto loaded = std::make_unique<AOTIModelPackageLoader>(
        path, "model", /*run_single_threaded=*/false, /*num_runners=*/1, index);
    // The runner follows the package's own device (AOTI_DEVICE_KEY), whatever was asked: a CPU
    // package would read CUDA inputs as host memory (a crash, not an error), a CUDA one CPU
    // inputs as device memory. Refuse before the first run, and cache nothing.
    const auto metadata = loaded->get_metadata();
    const auto key = metadata.find("AOTI_DEVICE_KEY");
    const std::string compiled_for = key == metadata.end() ? "an unknown device" : key->second;
    TORCH_CHECK(compiled_for == c10::DeviceTypeName(device.type(), /*lower_case=*/true),
                "sr3fast: the package ", path, " was compiled for ", compiled_for,
                ", the inputs are on ", device, "; export one for ", device.type(),
                " (sr3fast export ... --device ", c10::DeviceTypeName(device.type(), true), ")");
    loader = std::move(loaded);
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
                       std::optional<at::Generator> generator, int64_t history) {
  const c10::DeviceGuard guard(x.device());
  SampleOptions options;
  options.clip = clip;
  options.stochastic = stochastic;
  options.noise = kernel_noise ? NoiseSource::kKernel : NoiseSource::kTorch;
  options.generator = std::move(generator);
  options.history = history;
  return sample(aoti_denoiser(aoti_package(std::string(denoiser), x.device())), x, y_T, coefs,
                gammas, options);
}

}  // namespace

// One implementation for every device: it calls the device's reverse_step through the dispatcher.
TORCH_LIBRARY_IMPL(sr3fast, CompositeExplicitAutograd, m) { m.impl("sample_aoti", &sample_aoti); }

}  // namespace sr3fast
