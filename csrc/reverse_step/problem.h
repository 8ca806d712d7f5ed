// reverse_step's arguments checked and brought into the form both devices' kernels read.
#pragma once

#include <optional>

#include <ATen/core/Generator.h>
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

// Whether a generator on `generator` can draw the noise of a tensor on `tensor`: the same device
// type, and the same index where the generator names one. A generator without an index
// (torch.Generator("cuda") has index -1) stands for the current device, as in PyTorch's own
// random ops; the CUDA entry makes y_t's device the current one before drawing.
bool generator_fits(const c10::Device& generator, const c10::Device& tensor);

// Raises, saying what to do, unless `generator` (when given and defined) fits y_t's device.
void check_generator(const std::optional<at::Generator>& generator, const at::Tensor& y_t);

}  // namespace sr3fast::reverse_step
