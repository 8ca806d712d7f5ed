// reverse_step's arguments checked and brought into the form both devices' kernels read.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "common/layout.h"

namespace sr3fast::reverse_step {

// Coefficients per sample, in the order of coefs' last dimension.
enum Coef { kA = 0, kB = 1, kM0 = 2, kM1 = 3, kSigma = 4, kCoefs = 5 };

struct Problem {
  at::Tensor y_t;    // (B, *) in `layout`
  Layout layout;
  at::Tensor eps;    // like y_t, in y_t's dtype or float32
  at::Tensor noise;  // like eps; undefined when the kernel draws it
  at::Tensor coefs;  // (B, 5) float32, contiguous
  int64_t batch, per_sample;  // per_sample: elements of one sample
  bool clip_enabled;
  float clip;
};

Problem make_problem(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                     const std::optional<at::Tensor>& noise, std::optional<double> clip);

}  // namespace sr3fast::reverse_step
