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

// The coefs a problem with `history` past x0 estimates takes: m2 is read from one history on, m3
// with two; columns after those read may be present (the tables all have 7) and are not read.
std::string coefs_wanted(int64_t batch, int history) {
  const std::string b = std::to_string(batch);
  switch (history) {
    case 0:
      return "(" + b + ", 5), (" + b + ", 6) or (" + b + ", 7) holding (a, b, m0, m1, sigma[, m2"
             "[, m3]])";
    case 1:
      return "(" + b + ", 6) or (" + b + ", 7) holding (a, b, m0, m1, sigma, m2[, m3])";
    default:
      return "(" + b + ", 7) holding (a, b, m0, m1, sigma, m2, m3)";
  }
}

}  // namespace

Problem make_problem(const char* op, const at::Tensor& y_t, const at::Tensor& eps,
                     const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                     std::optional<double> clip, const std::optional<at::Tensor>& x0_prev,
                     const std::optional<at::Tensor>& x0_prev2) {
  TORCH_CHECK(y_t.dim() >= 1, op, ": y_t must have a batch dimension, got a scalar");
  TORCH_CHECK(is_supported_dtype(y_t.scalar_type()), op,
              ": y_t must be float32, bfloat16 or float16, got ", y_t.scalar_type(),
              "; convert it, or use the reference backend (sr3fast.set_backend('reference'))");
  TORCH_CHECK(!x0_prev2.has_value() || x0_prev.has_value(), op,
              ": x0_prev2 (the x0 of two steps back) needs x0_prev (the previous step's)");
  const int64_t batch = y_t.size(0);
  const int history = x0_prev2.has_value() ? 2 : (x0_prev.has_value() ? 1 : 0);
  const int64_t width = coefs.dim() == 2 ? coefs.size(1) : -1;
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.dim() == 2 && coefs.size(0) == batch &&
                  width >= coefs_for_history(history) && width <= kMaxCoefs,
              op, ": coefs must be a float32 tensor of shape ", coefs_wanted(batch, history),
              " per sample (a row of sr3fast.diffusion.reverse_coefficients)",
              history == 2 ? "; the second history x0_prev2 is weighted by m3, the 7th column" : "",
              "; got ", coefs.scalar_type(), " ", coefs.sizes());
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
  if (history >= 1) {
    p.x0_prev = like_y_t(op, "x0_prev", *x0_prev, p);
  }
  if (history == 2) {
    // One element type for both histories keeps the kernels' instantiations as they are.
    TORCH_CHECK(x0_prev2->scalar_type() == x0_prev->scalar_type(), op,
                ": x0_prev2 must have x0_prev's dtype, got ", x0_prev2->scalar_type(), " and ",
                x0_prev->scalar_type(), "; convert one of them (this op's x0 output, the next "
                "step's history, is in y_t's dtype)");
    p.x0_prev2 = like_y_t(op, "x0_prev2", *x0_prev2, p);
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
