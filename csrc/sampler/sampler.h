// The SR3 sampling loop in C++: every step of a sampler, given the precomputed tables of
// sr3fast.diffusion.coefficients and a denoiser f(x, y_t, gamma) -> eps. For C++ programs
// (any callable denoiser: an AOTInductor package, a TorchScript module, ...) and, through the op
// sr3fast::sample_aoti, for Python with an AOTInductor-compiled denoiser.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace sr3fast {

// f(x, y_t, gamma) -> eps. x: (B, C, H, W) condition; y_t: (B, C, H, W) in x's dtype;
// gamma: (B,) float32 noise level of the step. Returns eps shaped like y_t, any float dtype.
using Denoiser =
    std::function<at::Tensor(const at::Tensor& x, const at::Tensor& y_t, const at::Tensor& gamma)>;

enum class NoiseSource {
  kTorch,   // z = at::randn(..., generator): the same draws as the Python samplers' noise="torch"
  kKernel,  // z drawn inside reverse_step (on CUDA: Philox in the kernel)
};

struct SampleOptions {
  std::optional<double> clip;  // clamp of the x0 estimate, as CLIP[sampler]
  bool stochastic = true;      // false when no step adds noise (DDIM with eta = 0)
  NoiseSource noise = NoiseSource::kTorch;
  std::optional<at::Generator> generator;
  // How many past x0 estimates each step carries (zeros before the first step): 0, the
  // single-step reverse_step; 1, reverse_step_multistep with the previous step's x0 (DPM-Solver++
  // 2M; coefs (T, B, 6) or (T, B, 7)); 2, also the x0 of two steps back (3M; coefs (T, B, 7)).
  int64_t history = 0;
  std::function<void(int64_t step, const at::Tensor& y)> callback;  // after each step, optional
};

// Runs all T steps: y = y_T (float32), then for i = 0 .. T-1
//   eps = denoise(x, y.to(x.dtype), gammas[i]);  y = reverse_step(y, eps, coefs[i], z_i, clip)
// with z_i fresh N(0, I) noise, or zeros on the last step and when !stochastic. With
// options.history 1 or 2, x0_prev = x0_prev2 = zeros (float32) before step 0 and each step is
//   y, x0 = reverse_step_multistep(y, eps, coefs[i], x0_prev, z_i, clip[, x0_prev2]);
//   x0_prev2, x0_prev = x0_prev, x0       (x0_prev2 with history 2 only; references, no copies)
// coefs: (T, B, 7) float32 (a, b, m0, m1, sigma, m2, m3), or the older (T, B, 5) / (T, B, 6)
// where the history does not read the missing columns; gammas: (T, B) float32, y_T: like x; all
// on x's device.
// Returns y_0, float32. Matches the Python loop (sr3fast.diffusion.samplers) step for step.
at::Tensor sample(const Denoiser& denoise, const at::Tensor& x, const at::Tensor& y_T,
                  const at::Tensor& coefs, const at::Tensor& gammas,
                  const SampleOptions& options = {});

}  // namespace sr3fast
