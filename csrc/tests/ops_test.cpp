// Calls the sr3fast ops through the dispatcher, as a C++ user of libsr3fast_ops would, and
// checks them against naive double-precision loops. Run by CTest: exit status 0 when all pass.
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "sampler/sampler.h"

namespace {

using Optional = std::optional<at::Tensor>;
using GroupNormSilu = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, const Optional&, const Optional&, double, const Optional&, bool);
using GroupNormSiluBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
    const Optional&, const Optional&, const Optional&, bool);
using ReverseStep = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const Optional&, std::optional<double>,
                               std::optional<at::Generator>);
using ReverseStepMultistep = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Optional&,
    std::optional<double>, std::optional<at::Generator>, const Optional&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                  double tolerance) {
  const auto difference = got.to(at::kDouble).cpu() - want.to(at::kDouble).cpu();
  const double error = difference.abs().max().item<double>();
  const bool ok = error <= tolerance;
  failures += ok ? 0 : 1;
  std::printf("%-58s max error %.3e (tolerance %.1e) %s\n", what.c_str(), error, tolerance,
              ok ? "ok" : "FAILED");
}

struct Naive {
  at::Tensor y, grad_x, grad_weight, grad_bias, grad_shift;
};

// SiLU(GroupNorm(x + shift)) and its gradients for grad_y, by the textbook formulas in double.
Naive naive_groupnorm_silu(const at::Tensor& x_in, int64_t groups, const at::Tensor& weight_in,
                           const at::Tensor& bias_in, const at::Tensor& shift_in,
                           const at::Tensor& grad_y_in, double eps) {
  const auto x = x_in.to(at::kDouble).cpu().contiguous();
  const auto dy = grad_y_in.to(at::kDouble).cpu().contiguous();
  const auto w_double = weight_in.to(at::kDouble).cpu(), b_double = bias_in.to(at::kDouble).cpu();
  const auto s_double = shift_in.to(at::kDouble).cpu();
  const auto w = w_double.accessor<double, 1>(), b = b_double.accessor<double, 1>();
  const auto s = s_double.accessor<double, 2>();
  const int64_t B = x.size(0), C = x.size(1), S = x.numel() / (B * C), D = C / groups;
  const auto x3 = x.reshape({B, C, S}), dy3 = dy.reshape({B, C, S});
  const auto xs = x3.accessor<double, 3>();
  const auto dys = dy3.accessor<double, 3>();
  Naive out{at::empty_like(x), at::empty_like(x), at::zeros({C}, x.options()),
            at::zeros({C}, x.options()), at::zeros({B, C}, x.options())};
  auto y3 = out.y.view({B, C, S}), dx3 = out.grad_x.view({B, C, S});
  auto y = y3.accessor<double, 3>();
  auto dx = dx3.accessor<double, 3>();
  auto dw = out.grad_weight.accessor<double, 1>();
  auto db = out.grad_bias.accessor<double, 1>();
  auto dshift = out.grad_shift.accessor<double, 2>();
  for (int64_t n = 0; n < B; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0, sum_sq = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        for (int64_t i = 0; i < S; ++i) {
          const double h = xs[n][c][i] + s[n][c];
          sum += h;
          sum_sq += h * h;
        }
      }
      const double count = static_cast<double>(D * S), mean = sum / count;
      const double rstd = 1 / std::sqrt(sum_sq / count - mean * mean + eps);
      double mean_dxhat = 0, mean_dxhat_xhat = 0;
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          const double wc = w[c], bc = b[c];
          for (int64_t i = 0; i < S; ++i) {
            const double xhat = (xs[n][c][i] + s[n][c] - mean) * rstd;
            const double z = xhat * wc + bc, sig = 1 / (1 + std::exp(-z));
            const double dz = dys[n][c][i] * sig * (1 + z * (1 - sig));
            if (pass == 0) {
              y[n][c][i] = z * sig;
              mean_dxhat += dz * wc / count;
              mean_dxhat_xhat += dz * wc * xhat / count;
              dw[c] += dz * xhat;
              db[c] += dz;
            } else {
              dx[n][c][i] = rstd * (dz * wc - mean_dxhat - xhat * mean_dxhat_xhat);
              dshift[n][c] += dx[n][c][i];
            }
          }
        }
      }
    }
  }
  return out;
}

void check_groupnorm_silu(const at::Device& device, bool channels_last) {
  const std::string where = std::string(device.is_cuda() ? "cuda" : "cpu") +
                            (channels_last ? " channels-last" : " contiguous");
  const auto options = at::TensorOptions().device(device);
  at::manual_seed(0);
  auto x = at::randn({2, 12, 9, 7}).mul(1.5).add(0.3).to(device);
  if (channels_last) {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const auto weight = at::randn({12}, options).mul(0.5).add(1);
  const auto bias = at::randn({12}, options).mul(0.5);
  const auto shift = at::randn({2, 12}, options);
  const auto grad_y = at::randn(x.sizes(), options);
  const int64_t groups = 3;
  const Naive want = naive_groupnorm_silu(x, groups, weight, bias, shift, grad_y, 1e-5);

  auto [y, mean, rstd] = op<GroupNormSilu>("sr3fast::groupnorm_silu")
                             .call(x, groups, weight, bias, 1e-5, shift, true);
  // float32 sums over a group of 252 values of size ~4: 8 * eps32 * sqrt(252) * 4 < 1e-4
  expect_close("groupnorm_silu " + where, y, want.y, 1e-4);
  auto [dx, dw, db, dshift] = op<GroupNormSiluBackward>("sr3fast::groupnorm_silu_backward")
                                  .call(grad_y, x, mean, rstd, groups, weight, bias, shift, true);
  // sums of up to 2 * 252 terms of size ~4: 8 * eps32 * sqrt(504) * 4 < 1e-4
  expect_close("groupnorm_silu_backward grad_x " + where, dx, want.grad_x, 1e-4);
  expect_close("groupnorm_silu_backward grad_weight " + where, dw, want.grad_weight, 1e-4);
  expect_close("groupnorm_silu_backward grad_bias " + where, db, want.grad_bias, 1e-4);
  expect_close("groupnorm_silu_backward grad_shift " + where, dshift, want.grad_shift, 1e-4);
}

void check_reverse_step(const at::Device& device) {
  const auto options = at::TensorOptions().device(device);
  at::manual_seed(1);
  const auto y_t = at::randn({3, 3, 5, 7}, options), eps = at::randn({3, 3, 5, 7}, options);
  const auto noise = at::randn({3, 3, 5, 7}, options);
  const auto coefs = at::rand({3, 5}, options).add(0.5);
  const float clip = 1.f;
  const auto out = op<ReverseStep>("sr3fast::reverse_step")
                       .call(y_t, eps, coefs, noise, static_cast<double>(clip), std::nullopt);
  // the same float32 operations in the same order: the results must be equal
  const auto flat = [](const at::Tensor& t) { return t.cpu().contiguous().flatten(1); };
  const auto y_flat = flat(y_t), e_flat = flat(eps), z_flat = flat(noise), k_flat = flat(coefs);
  const auto y = y_flat.accessor<float, 2>(), e = e_flat.accessor<float, 2>();
  const auto z = z_flat.accessor<float, 2>(), k = k_flat.accessor<float, 2>();
  auto want = at::empty_like(y_flat);
  auto result = want.accessor<float, 2>();
  for (int64_t b = 0; b < y_flat.size(0); ++b) {
    for (int64_t i = 0; i < y_flat.size(1); ++i) {
      // volatile: every product rounded to float on its own, never contracted into an FMA
      volatile float ay = k[b][0] * y[b][i], be = k[b][1] * e[b][i];
      const float x0 = std::fmin(std::fmax(ay - be, -clip), clip);
      volatile float first = k[b][2] * x0, second = k[b][3] * y[b][i], third = k[b][4] * z[b][i];
      volatile float sum = first + second;
      result[b][i] = sum + third;
    }
  }
  expect_close(std::string("reverse_step ") + (device.is_cuda() ? "cuda" : "cpu") + " (exact)",
               out.flatten(1), want, 0.0);
}

// The multistep op with `history` (1 or 2) past x0 estimates against the same loop written out, in
// the reference's order (((m0*x0 + m1*y) + m2*x0_prev) [+ m3*x0_prev2]) + sigma*z; its x0 output
// is the clamped estimate. coefs always has 7 columns, m3 nonzero: with one history it is unread.
void check_reverse_step_multistep(const at::Device& device, int history) {
  const auto options = at::TensorOptions().device(device);
  at::manual_seed(3);
  const auto y_t = at::randn({3, 3, 5, 7}, options), eps = at::randn({3, 3, 5, 7}, options);
  const auto noise = at::randn({3, 3, 5, 7}, options), x0_prev = at::randn({3, 3, 5, 7}, options);
  const auto x0_prev2 = at::randn({3, 3, 5, 7}, options);
  const auto coefs = at::rand({3, 7}, options).add(0.5);
  const float clip = 1.f;
  const auto [out, x0] =
      op<ReverseStepMultistep>("sr3fast::reverse_step_multistep")
          .call(y_t, eps, coefs, x0_prev, noise, static_cast<double>(clip), std::nullopt,
                history == 2 ? Optional(x0_prev2) : std::nullopt);
  const auto flat = [](const at::Tensor& t) { return t.cpu().contiguous().flatten(1); };
  const auto y_flat = flat(y_t), e_flat = flat(eps), z_flat = flat(noise), k_flat = flat(coefs);
  const auto p_flat = flat(x0_prev), p2_flat = flat(x0_prev2);
  const auto y = y_flat.accessor<float, 2>(), e = e_flat.accessor<float, 2>();
  const auto z = z_flat.accessor<float, 2>(), k = k_flat.accessor<float, 2>();
  const auto prev = p_flat.accessor<float, 2>(), prev2 = p2_flat.accessor<float, 2>();
  auto want = at::empty_like(y_flat), want_x0 = at::empty_like(y_flat);
  auto result = want.accessor<float, 2>();
  auto result_x0 = want_x0.accessor<float, 2>();
  for (int64_t b = 0; b < y_flat.size(0); ++b) {
    for (int64_t i = 0; i < y_flat.size(1); ++i) {
      // volatile: every product and sum rounded to float on its own, never contracted
      volatile float ay = k[b][0] * y[b][i], be = k[b][1] * e[b][i];
      const float x0_value = std::fmin(std::fmax(ay - be, -clip), clip);
      volatile float first = k[b][2] * x0_value, second = k[b][3] * y[b][i];
      volatile float older = k[b][5] * prev[b][i], oldest = k[b][6] * prev2[b][i];
      volatile float third = k[b][4] * z[b][i];
      volatile float sum = first + second;
      volatile float with_history = sum + older;
      if (history == 2) {
        with_history = with_history + oldest;
      }
      result[b][i] = with_history + third;
      result_x0[b][i] = x0_value;
    }
  }
  const std::string where = std::string(device.is_cuda() ? "cuda" : "cpu") + " history " +
                            std::to_string(history);
  expect_close("reverse_step_multistep " + where + " (exact)", out.flatten(1), want, 0.0);
  expect_close("reverse_step_multistep x0 " + where + " (exact)", x0.flatten(1), want_x0, 0.0);
}

// A generator for `device` seeded with `seed`, twice in a row the same draws: on a CPU a fresh
// generator; on CUDA the default generator, reseeded (nullopt: the ops then draw from it).
std::optional<at::Generator> seeded_generator(const at::Device& device, uint64_t seed) {
  if (device.is_cuda()) {
    at::manual_seed(seed);
    return std::nullopt;
  }
  return at::detail::createCPUGenerator(seed);
}

// sr3fast::sample with a small C++ denoiser against the loop written out with the op.
void check_sample(const at::Device& device) {
  const auto options = at::TensorOptions().device(device);
  at::manual_seed(2);
  const int64_t steps = 6, batch = 2;
  const auto x = at::randn({batch, 3, 5, 4}, options), y_T = at::randn({batch, 3, 5, 4}, options);
  auto coefs = at::rand({steps, batch, 5}, options).add(0.5);
  coefs.select(0, steps - 1).select(1, 4).zero_();  // the last step adds no noise
  const auto gammas = at::rand({steps, batch}, options);
  const sr3fast::Denoiser denoise = [](const at::Tensor& cond, const at::Tensor& y,
                                       const at::Tensor& gamma) {
    return (cond - y).mul(gamma.view({-1, 1, 1, 1}));
  };
  sr3fast::SampleOptions sample_options;
  sample_options.clip = 1.0;
  int64_t callbacks = 0;
  sample_options.callback = [&](int64_t, const at::Tensor&) { ++callbacks; };
  sample_options.generator = seeded_generator(device, 7);
  const auto got = sr3fast::sample(denoise, x, y_T, coefs, gammas, sample_options);

  const auto generator = seeded_generator(device, 7);
  auto y = y_T.clone();
  for (int64_t i = 0; i < steps; ++i) {
    const auto eps = denoise(x, y, gammas[i]);
    const auto z =
        i == steps - 1 ? at::zeros_like(y) : at::randn(y.sizes(), generator, y.options());
    y = op<ReverseStep>("sr3fast::reverse_step").call(y, eps, coefs[i], z, 1.0, std::nullopt);
  }
  expect_close(std::string("sample ") + (device.is_cuda() ? "cuda" : "cpu") + " (exact)", got, y,
               0.0);
  failures += callbacks == steps ? 0 : 1;
}

// The multistep loop (SampleOptions::history 1 or 2) against the loop written out with the
// multistep op, the histories shifted from step to step from zeros; (T, B, 7) tables, m2 = 0 at
// step 0, m3 = 0 at steps 0 and 1 (as the 3M tables have it), m3 nonzero after: a loop that
// skipped the shift, or carried x0_prev as x0_prev2, would end elsewhere.
void check_sample_multistep(const at::Device& device, int history) {
  const auto options = at::TensorOptions().device(device);
  at::manual_seed(4);
  const int64_t steps = 6, batch = 2;
  const auto x = at::randn({batch, 3, 5, 4}, options), y_T = at::randn({batch, 3, 5, 4}, options);
  auto coefs = at::rand({steps, batch, 7}, options).add(0.5);
  coefs.select(0, steps - 1).select(1, 4).zero_();  // the last step adds no noise
  coefs.select(0, 0).select(1, 5).zero_();          // the first has no history
  coefs.narrow(0, 0, 2).select(2, 6).zero_();       // nor the second a second history
  const auto gammas = at::rand({steps, batch}, options);
  const sr3fast::Denoiser denoise = [](const at::Tensor& cond, const at::Tensor& y,
                                       const at::Tensor& gamma) {
    return (cond - y).mul(gamma.view({-1, 1, 1, 1}));
  };
  sr3fast::SampleOptions sample_options;
  sample_options.clip = 1.0;
  sample_options.history = history;
  sample_options.generator = seeded_generator(device, 8);
  const auto got = sr3fast::sample(denoise, x, y_T, coefs, gammas, sample_options);

  const auto generator = seeded_generator(device, 8);
  auto y = y_T.clone();
  auto x0_prev = at::zeros_like(y), x0_prev2 = at::zeros_like(y);
  for (int64_t i = 0; i < steps; ++i) {
    const auto eps = denoise(x, y, gammas[i]);
    const auto z =
        i == steps - 1 ? at::zeros_like(y) : at::randn(y.sizes(), generator, y.options());
    at::Tensor x0;
    std::tie(y, x0) = op<ReverseStepMultistep>("sr3fast::reverse_step_multistep")
                          .call(y, eps, coefs[i], x0_prev, z, 1.0, std::nullopt,
                                history == 2 ? Optional(x0_prev2) : std::nullopt);
    x0_prev2 = x0_prev;
    x0_prev = x0;
  }
  expect_close(std::string("sample ") + (device.is_cuda() ? "cuda" : "cpu") + " history " +
                   std::to_string(history) + " (exact)",
               got, y, 0.0);
}

}  // namespace

int main() {
  std::vector<at::Device> devices{at::kCPU};
  const bool cuda_kernels =
      c10::Dispatcher::singleton().findSchemaOrThrow("sr3fast::groupnorm_silu", "")
          .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (cuda_kernels && at::hasCUDA()) {
    devices.emplace_back(at::kCUDA);
  }
  for (const auto& device : devices) {
    check_groupnorm_silu(device, false);
    check_groupnorm_silu(device, true);
    check_reverse_step(device);
    check_sample(device);
    for (const int history : {1, 2}) {
      check_reverse_step_multistep(device, history);
      check_sample_multistep(device, history);
    }
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
