#include "reverse_step/problem.h"

#include <c10/util/Exception.h>

namespace sr3fast::reverse_step {
namespace {

constexpr const char* kOp = "sr3fast::reverse_step";

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// `t` as the kernels read it: y_t's layout, and y_t's dtype or float32.
at::Tensor like_y_t(const char* name, const at::Tensor& t, const Problem& p) {
  TORCH_CHECK(t.sizes() == p.y_t.sizes() && t.device() == p.y_t.device(), kOp, ": ", name,
              " must match y_t in shape and device; got ", t.sizes(), " on ", t.device(),
              " for y_t ", p.y_t.sizes(), " on ", p.y_t.device());
  TORCH_CHECK(t.is_floating_point(), kOp, ": ", name, " must be floating point, got ",
              t.scalar_type());
  const bool readable = t.scalar_type() == p.y_t.scalar_type() || t.scalar_type() == at::kFloat;
  return in_layout_of(readable ? t : t.to(at::kFloat), p.layout, p.y_t);
}

}  // namespace

Problem make_problem(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                     const std::optional<at::Tensor>& noise, std::optional<double> clip) {
  TORCH_CHECK(y_t.dim() >= 1, kOp, ": y_t must have a batch dimension, got a scalar");
  TORCH_CHECK(is_supported_dtype(y_t.scalar_type()), kOp,
              ": y_t must be float32, bfloat16 or float16, got ", y_t.scalar_type(),
              "; convert it, or use the reference backend (sr3fast.set_backend('reference'))");
  const int64_t batch = y_t.size(0);
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.sizes() == at::IntArrayRef({batch, 5}),
              kOp, ": coefs must be a float32 tensor of shape (", batch,
              ", 5) holding (a, b, m0, m1, sigma) per sample; got ", coefs.scalar_type(), " ",
              coefs.sizes());
  TORCH_CHECK(coefs.device() == y_t.device(), kOp, ": coefs are on ", coefs.device(),
              " but y_t on ", y_t.device(), "; precompute the table on the sampling device");
  TORCH_CHECK(!clip.has_value() || *clip > 0, kOp, ": clip must be positive or None, got ",
              clip.value_or(0));

  Problem p;
  p.y_t = in_kernel_layout(y_t, p.layout);
  p.batch = batch;
  p.per_sample = batch > 0 ? y_t.numel() / batch : 0;
  p.eps = like_y_t("eps", eps, p);
  if (noise.has_value()) {
    p.noise = like_y_t("noise", *noise, p);
  }
  p.coefs = coefs.contiguous();
  p.clip_enabled = clip.has_value();
  p.clip = static_cast<float>(clip.value_or(0));
  return p;
}

bool generator_fits(const c10::Device& generator, const c10::Device& tensor) {
  return generator.type() == tensor.type() &&
         (!generator.has_index() || !tensor.has_index() || generator.index() == tensor.index());
}

void check_generator(const std::optional<at::Generator>& generator, const at::Tensor& y_t) {
  if (!generator.has_value() || !generator->defined()) {
    return;
  }
  TORCH_CHECK(generator_fits(generator->device(), y_t.device()), kOp, ": the generator is on ",
              generator->device(), " but y_t on ", y_t.device(),
              "; pass a generator of y_t's device, torch.Generator(y_t.device)");
}

}  // namespace sr3fast::reverse_step
