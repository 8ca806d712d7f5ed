// groupnorm_silu's arguments checked and brought into the form both devices' kernels read.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "common/layout.h"

namespace sr3fast::groupnorm_silu {

struct Problem {
  at::Tensor x;                    // (B, C, *spatial) in `layout`
  Layout layout;
  int64_t batch, channels, groups, spatial;
  // (C,), (C,), (B, C): contiguous, undefined when absent, all of dtype `param_dtype`.
  at::Tensor weight, bias, shift;
  at::ScalarType param_dtype;

  int64_t channels_per_group() const { return channels / groups; }
};

// Checks the arguments (saying what is wrong and what to do) and prepares them. Parameters of
// mixed or other dtypes are converted to float32, and so are all of them when
// `params_in_float32` is set; otherwise they stay in their dtype when it is x's or float32.
Problem make_problem(const char* op, const at::Tensor& x, int64_t num_groups,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& shift, bool params_in_float32);

// Checks the extra arguments of the backward: grad_y like x, mean and rstd float32 (B, G).
// Returns grad_y in x's layout.
at::Tensor check_backward(const Problem& problem, const at::Tensor& grad_y, const at::Tensor& mean,
                          const at::Tensor& rstd);

// The forward's outputs, allocated: y like x in the problem's layout; float32 mean and rstd
// (B, G). For an empty x the statistics are already NaN, as the reference's, and no kernel runs.
struct ForwardOutputs {
  at::Tensor y, mean, rstd;
};
ForwardOutputs allocate_forward(const Problem& problem);

// The backward's outputs, allocated: grad_x like x in the problem's layout; the parameter
// gradients as zeroed float32 accumulators (C,), (C,), (B, C).
struct BackwardOutputs {
  at::Tensor grad_x, grad_weight, grad_bias, grad_shift;
};
BackwardOutputs allocate_backward(const Problem& problem);

// What the backward op returns: grad_x, then the float32 parameter gradients in each parameter's
// own dtype (x's when it was None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_result(
    const at::Tensor& x, const BackwardOutputs& grads, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift);

}  // namespace sr3fast::groupnorm_silu
