#include "groupnorm_silu/problem.h"

#include <limits>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

namespace sr3fast::groupnorm_silu {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_param(const char* op, const char* name, const std::optional<at::Tensor>& param,
                 at::IntArrayRef shape, const at::Tensor& x) {
  if (!param.has_value()) {
    return;
  }
  TORCH_CHECK(param->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              param->sizes());
  TORCH_CHECK(param->device() == x.device(), op, ": ", name, " is on ", param->device(),
              " but x is on ", x.device(), "; move it to x's device");
  TORCH_CHECK(param->is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ",
              param->scalar_type());
}

}  // namespace

Problem make_problem(const char* op, const at::Tensor& x, int64_t num_groups,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& shift, bool params_in_float32) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (B, C, *spatial), got ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type(),
              "; convert it, or use the reference backend (sr3fast.set_backend('reference'))");
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(num_groups >= 1 && channels % num_groups == 0, op, ": num_groups=", num_groups,
              " must divide the ", channels, " channels of x");
  check_param(op, "weight", weight, {channels}, x);
  check_param(op, "bias", bias, {channels}, x);
  check_param(op, "shift", shift, {batch, channels}, x);

  Problem problem;
  problem.x = in_kernel_layout(x, problem.layout);
  problem.batch = batch;
  problem.channels = channels;
  problem.groups = num_groups;
  problem.spatial = spatial_size(x);

  // One dtype for all parameters, so kernels are instantiated per (x dtype, parameter dtype) and
  // the usual cases (parameters in x's dtype, or float32 ones under autocast) need no conversion.
  std::optional<at::ScalarType> common;
  bool mixed = false;
  for (const auto* param : {&weight, &bias, &shift}) {
    if (param->has_value()) {
      const auto dtype = (*param)->scalar_type();
      mixed |= common.has_value() && *common != dtype;
      common = dtype;
    }
  }
  const bool keep = common.has_value() && !mixed && !params_in_float32 &&
                    (*common == x.scalar_type() || *common == at::kFloat);
  problem.param_dtype = keep ? *common : at::kFloat;
  const auto prepare = [&](const std::optional<at::Tensor>& param) {
    return param.has_value() ? param->to(problem.param_dtype).contiguous() : at::Tensor();
  };
  problem.weight = prepare(weight);
  problem.bias = prepare(bias);
  problem.shift = prepare(shift);
  return problem;
}

at::Tensor check_backward(const Problem& problem, const at::Tensor& grad_y, const at::Tensor& mean,
                          const at::Tensor& rstd) {
  const char* op = "sr3fast::groupnorm_silu_backward";
  TORCH_CHECK(grad_y.sizes() == problem.x.sizes() && grad_y.device() == problem.x.device(), op,
              ": grad_y must match x in shape and device; got ", grad_y.sizes(), " on ",
              grad_y.device(), " for x ", problem.x.sizes(), " on ", problem.x.device());
  for (const auto* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat &&
                    stat->sizes() == at::IntArrayRef({problem.batch, problem.groups}) &&
                    stat->device() == problem.x.device(),
                op, ": mean and rstd must be the float32 (B, num_groups) statistics returned by "
                "sr3fast::groupnorm_silu on x's device; got ", stat->scalar_type(), " ",
                stat->sizes(), " on ", stat->device());
  }
  return in_layout_of(grad_y.to(problem.x.scalar_type()), problem.layout, problem.x);
}

ForwardOutputs allocate_forward(const Problem& problem) {
  ForwardOutputs out;
  out.y = at::empty_like(problem.x);
  out.mean = at::empty({problem.batch, problem.groups}, problem.x.options().dtype(at::kFloat));
  out.rstd = at::empty_like(out.mean);
  if (problem.x.numel() == 0) {
    out.mean.fill_(std::numeric_limits<float>::quiet_NaN());
    out.rstd.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return out;
}

BackwardOutputs allocate_backward(const Problem& problem) {
  const auto options = problem.x.options().dtype(at::kFloat);
  BackwardOutputs grads;
  grads.grad_x = at::empty_like(problem.x);
  grads.grad_weight = at::zeros({problem.channels}, options);
  grads.grad_bias = at::zeros({problem.channels}, options);
  grads.grad_shift = at::zeros({problem.batch, problem.channels}, options);
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::Tensor& x, const BackwardOutputs& grads, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift) {
  const auto dtype_of = [&](const std::optional<at::Tensor>& param) {
    return param.has_value() ? param->scalar_type() : x.scalar_type();
  };
  return {grads.grad_x, grads.grad_weight.to(dtype_of(weight)),
          grads.grad_bias.to(dtype_of(bias)), grads.grad_shift.to(dtype_of(shift))};
}

}  // namespace sr3fast::groupnorm_silu
