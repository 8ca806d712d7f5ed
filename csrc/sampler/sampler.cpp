#include "sampler/sampler.h"

#include <tuple>
#include <utility>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

namespace sr3fast {
namespace {

using ReverseStep = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::optional<double>,
                               std::optional<at::Generator>);
using ReverseStepMultistep = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, std::optional<double>, std::optional<at::Generator>,
    const std::optional<at::Tensor>&);

void check_tables(const at::Tensor& x, const at::Tensor& y_T, const at::Tensor& coefs,
                  const at::Tensor& gammas, int64_t history) {
  constexpr const char* kWhere = "sr3fast::sample";
  TORCH_CHECK(x.dim() == 4, kWhere, ": x must be the upsampled condition (B, C, H, W), got ",
              x.sizes());
  TORCH_CHECK(y_T.sizes() == x.sizes() && y_T.device() == x.device(), kWhere,
              ": y_T must match x in shape and device; got ", y_T.sizes(), " on ", y_T.device());
  TORCH_CHECK(history >= 0 && history <= 2, kWhere, ": history must be 0 (single-step "
              "samplers), 1 (DPM-Solver++ 2M) or 2 (3M), the past x0 estimates each step "
              "carries (sr3fast.diffusion.HISTORY); got ", history);
  const int64_t batch = x.size(0);
  // (T, B, 7): columns (a, b, m0, m1, sigma, m2, m3). The older tables without the last column
  // or two are read the same way by the loops that do not reach those columns.
  constexpr const char* kReads[] = {"", " (a loop with history 1 reads its m2 column)",
                                    " (a loop with history 2 reads its m2 and m3 columns)"};
  const int64_t width = coefs.dim() == 3 ? coefs.size(2) : -1;
  TORCH_CHECK(width >= 5 + history && width <= 7 && coefs.size(1) == batch &&
                  coefs.scalar_type() == at::kFloat && coefs.device() == x.device(),
              kWhere, ": coefs must be the (T, ", batch, ", 7) float32 table of "
              "sr3fast.diffusion.reverse_coefficients on x's device", kReads[history], "; got ",
              coefs.scalar_type(), " ", coefs.sizes(), " on ", coefs.device());
  TORCH_CHECK(gammas.dim() == 2 && gammas.size(0) == coefs.size(0) && gammas.size(1) == batch &&
                  gammas.scalar_type() == at::kFloat && gammas.device() == x.device(),
              kWhere, ": gammas must be the (T, ", batch, ") float32 table of "
              "sr3fast.diffusion.noise_levels on x's device, T = ", coefs.size(0), "; got ",
              gammas.scalar_type(), " ", gammas.sizes(), " on ", gammas.device());
}

}  // namespace

at::Tensor sample(const Denoiser& denoise, const at::Tensor& x, const at::Tensor& y_T,
                  const at::Tensor& coefs, const at::Tensor& gammas,
                  const SampleOptions& options) {
  check_tables(x, y_T, coefs, gammas, options.history);
  static const auto reverse_step = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("sr3fast::reverse_step", "")
                                       .typed<ReverseStep>();
  static const auto reverse_step_multistep =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sr3fast::reverse_step_multistep", "")
          .typed<ReverseStepMultistep>();
  at::Tensor y = y_T.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  const at::Tensor no_noise = at::zeros_like(y);
  // The history of a multistep loop, float32 like y: the previous step's x0 estimate and, with
  // history 2, the one before it. Zeros before the first step (whose m2 and m3 are 0; the second
  // step's m3 is 0 too); one tensor serves as both, as the op only reads them.
  at::Tensor x0_prev = options.history >= 1 ? at::zeros_like(y) : at::Tensor();
  at::Tensor x0_prev2 = options.history == 2 ? x0_prev : at::Tensor();
  const int64_t steps = coefs.size(0);
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor eps = denoise(x, y.to(x.scalar_type()), gammas[i]);
    std::optional<at::Tensor> z;  // nullopt: drawn inside reverse_step
    if (!options.stochastic || i == steps - 1) {
      z = no_noise;
    } else if (options.noise == NoiseSource::kTorch) {
      z = at::randn(y.sizes(), options.generator, y.options());
    }
    if (options.history >= 1) {
      const auto older = options.history == 2 ? std::optional<at::Tensor>(x0_prev2) : std::nullopt;
      at::Tensor x0;
      std::tie(y, x0) = reverse_step_multistep.call(y, eps.to(at::kFloat), coefs[i], x0_prev, z,
                                                    options.clip, options.generator, older);
      // The shift: each history moves one step back (handles, not data), the oldest drops out.
      if (options.history == 2) {
        x0_prev2 = std::move(x0_prev);
      }
      x0_prev = std::move(x0);
    } else {
      y = reverse_step.call(y, eps.to(at::kFloat), coefs[i], z, options.clip, options.generator);
    }
    if (options.callback) {
      options.callback(i, y);
    }
  }
  return y;
}

}  // namespace sr3fast
