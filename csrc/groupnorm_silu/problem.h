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

// The float32 parameter gradients (C,), (C,), (B, C) in the dtypes the op returns them in: each
// parameter's own, x's when it was None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> param_grads_in_dtype(
    const at::Tensor& x, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
    const at::Tensor& grad_shift, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift);

}  // namespace sr3fast::groupnorm_silu
