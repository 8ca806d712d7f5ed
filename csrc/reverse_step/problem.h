// reverse_step's arguments (single-step and multistep) checked and brought into the form both
// devices' kernels read.
#pragma once

#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "common/layout.h"

namespace sr3fast::reverse_step {

// Coefficients per sample, in the order of coefs' last dimension: (a, b, m0, m1, sigma, m2, m3).
// The single-step op reads columns kA..kSigma of a (B, 5), (B, 6) or (B, 7) table; the multistep
// op also reads kM2 (one history: (B, 6) or (B, 7)) and kM3 (two histories: (B, 7)).
enum Coef { kA = 0, kB = 1, kM0 = 2, kM1 = 3, kSigma = 4, kM2 = 5, kM3 = 6 };
constexpr int64_t kSingleStepCoefs = 5;
constexpr int64_t kMaxCoefs = 7;
// The narrowest table a given history depth (0, 1 or 2 past x0 estimates) reads in full.
constexpr int64_t coefs_for_history(int history) { return kSingleStepCoefs + history; }

struct Problem {
  at::Tensor y_t;      // (B, *) in `layout`
  Layout layout;
  at::Tensor eps;      // like y_t, in y_t's dtype or float32
  at::Tensor noise;    // like eps; undefined when the kernel draws it
  at::Tensor x0_prev;   // like eps; defined only for the multistep op
  at::Tensor x0_prev2;  // x0_prev's dtype and layout; defined only for two histories
  at::Tensor coefs;     // (B, coef_stride) float32, contiguous
  int64_t coef_stride;  // 5, 6 or 7: floats between two samples' rows of coefs
  int64_t batch, per_sample;  // per_sample: elements of one sample
  bool clip_enabled;
  float clip;

  // How many past x0 estimates the update reads: 0 (single step), 1 (x0_prev), 2 (and x0_prev2).
  int history() const { return x0_prev2.defined() ? 2 : (x0_prev.defined() ? 1 : 0); }
};

// Checks the arguments of sr3fast::reverse_step (no history: coefs (B, 5), (B, 6) or (B, 7)) or
// of sr3fast::reverse_step_multistep (x0_prev: coefs (B, 6) or (B, 7); x0_prev and x0_prev2:
// coefs (B, 7), x0_prev2 in x0_prev's dtype), raising errors that name `op`.
Problem make_problem(const char* op, const at::Tensor& y_t, const at::Tensor& eps,
                     const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                     std::optional<double> clip,
                     const std::optional<at::Tensor>& x0_prev = std::nullopt,
                     const std::optional<at::Tensor>& x0_prev2 = std::nullopt);

// Whether a generator on `generator` can draw the noise of a tensor on `tensor`: the same device
// type, and the same index where the generator names one. A generator without an index
// (torch.Generator("cuda") has index -1) stands for the current device, as in PyTorch's own
// random ops; the CUDA entry makes y_t's device the current one before drawing.
bool generator_fits(const c10::Device& generator, const c10::Device& tensor);

// Raises, saying what to do, unless `generator` (when given and defined) fits y_t's device.
void check_generator(const char* op, const std::optional<at::Generator>& generator,
                     const at::Tensor& y_t);

// The element types the kernels read eps, noise and x0_prev in: y_t's type T or float.
template <typename U>
struct Type {
  using type = U;
};

template <typename T, typename Fn>
void with_type(bool as_float, Fn&& fn) {
  if (as_float) {
    fn(Type<float>{});
  } else {
    fn(Type<T>{});
  }
}

// Calls fn(Type<E>{}, Type<N>{}, Type<X>{}) with the element types of eps, noise and the history
// x0_prev (each T or float; x0_prev2 has x0_prev's), so each kernel is instantiated for the
// combinations that occur. Without history X is T (nothing reads it), which keeps the
// single-step instantiations at four.
template <typename T, int kHistory, typename Fn>
void with_operand_types(const Problem& p, bool noise_float, Fn&& fn) {
  const bool eps_float = p.eps.scalar_type() != p.y_t.scalar_type();
  with_type<T>(eps_float, [&](auto e) {
    with_type<T>(noise_float, [&](auto n) {
      if constexpr (kHistory > 0) {
        with_type<T>(p.x0_prev.scalar_type() != p.y_t.scalar_type(),
                     [&](auto x) { fn(e, n, x); });
      } else {
        fn(e, n, Type<T>{});
      }
    });
  });
}

}  // namespace sr3fast::reverse_step
