#include "reverse_step/problem.h"

#include <string>

#include <c10/util/Exception.h>

namespace sr3fast::reverse_step {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// `t` as the kernels read it: y_t's layout, and y_t's dtype or float32 (any other float dtype is
// converted to float32, which is exact).
at::Tensor like_y_t(const char* op, const char* name, const at::Tensor& t, const Problem& p) {
  TORCH_CHECK(t.sizes() == p.y_t.sizes() && t.device() == p.y_t.device(), op, ": ", name,
              " must match y_t in shape and device; got ", t.sizes(), " on ", t.device(),
              " for y_t ", p.y_t.sizes(), " on ", p.y_t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
  const bool readable = t.scalar_type() == p.y_t.scalar_type() || t.scalar_type() == at::kFloat;
  return in_layout_of(readable ? t : t.to(at::kFloat), p.layout, p.y_t);
}

}  // namespace

Problem make_problem(const char* op, const at::Tensor& y_t, const at::Tensor& eps,
                     const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                     std::optional<double> clip, const std::optional<at::Tensor>& x0_prev) {
  TORCH_CHECK(y_t.dim() >= 1, op, ": y_t must have a batch dimension, got a scalar");
  TORCH_CHECK(is_supported_dtype(y_t.scalar_type()), op,
              ": y_t must be float32, bfloat16 or float16, got ", y_t.scalar_type(),
              "; convert it, or use the reference backend (sr3fast.set_backend('reference'))");
  const int64_t batch = y_t.size(0);
  const bool history = x0_prev.has_value();
  const int64_t width = coefs.dim() == 2 ? coefs.size(1) : -1;
  const bool width_ok =
      history ? width == kMultistepCoefs : (width == kSingleStepCoefs || width == kMultistepCoefs);
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.dim() == 2 && coefs.size(0) == batch &&
                  width_ok,
              op, ": coefs must be a float32 tensor of shape ",
              history ? "(" + std::to_string(batch) + ", 6) holding (a, b, m0, m1, sigma, m2)"
                      : "(" + std::to_string(batch) + ", 5) or (" + std::to_string(batch) +
                            ", 6) holding (a, b, m0, m1, sigma[, m2])",
              " per sample (a row of sr3fast.diffusion.reverse_coefficients); got ",
              coefs.scalar_type(), " ", coefs.sizes());
  TORCH_CHECK(coefs.device() == y_t.device(), op, ": coefs are on ", coefs.device(),
              " but y_t on ", y_t.device(), "; precompute the table on the sampling device");
  TORCH_CHECK(!clip.has_value() || *clip > 0, op, ": clip must be positive or None, got ",
              clip.value_or(0));

  Problem p;
  p.y_t = in_kernel_layout(y_t, p.layout);
  p.batch = batch;
  p.per_sample = batch > 0 ? y_t.numel() / batch : 0;
  p.eps = like_y_t(op, "eps", eps, p);
  if (noise.has_value()) {
    p.noise = like_y_t(op, "noise", *noise, p);
  }
  if (history) {
    p.x0_prev = like_y_t(op, "x0_prev", *x0_prev, p);
  }
  p.coefs = coefs.contiguous();
  p.coef_stride = width;
  p.clip_enabled = clip.has_value();
  p.clip = static_cast<float>(clip.value_or(0));
  return p;
}

bool generator_fits(const c10::Device& generator, const c10::Device& tensor) {
  return generator.type() == tensor.type() &&
         (!generator.has_index() || !tensor.has_index() || generator.index() == tensor.index());
}

void check_generator(const char* op, const std::optional<at::Generator>& generator,
                     const at::Tensor& y_t) {
  if (!generator.has_value() || !generator->defined()) {
    return;
  }
  TORCH_CHECK(generator_fits(generator->device(), y_t.device()), op, ": the generator is on ",
              generator->device(), " but y_t on ", y_t.device(),
              "; pass a generator of y_t's device, torch.Generator(y_t.device)");
}

}  // namespace sr3fast::reverse_step
