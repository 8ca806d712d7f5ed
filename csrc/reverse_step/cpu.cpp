// reverse_step and reverse_step_multistep on CPU: one fused, vectorised pass per sample, float32
// maths in the reference's order of operations (no FMA), so with the same z they reproduce
// sr3fast.reference bit for bit. One kernel serves both ops: kHistory (0, 1 or 2 past x0
// estimates) adds the multistep terms m2*x0_prev [+ m3*x0_prev2] and the output x0. Without
// `noise`, z is drawn with the CPU generator exactly as the reference draws it, the same way for
// both ops (the same z for the same generator state).
#include <tuple>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/randn.h>
#include <torch/library.h>

#include "common/cpu_lanes.h"
#include "common/dispatch.h"
#include "reverse_step/math.h"
#include "reverse_step/problem.h"

namespace sr3fast::reverse_step {
namespace {

using cpu::fVec;
using cpu::Lanes;

constexpr int64_t kTaskElements = 16384;
constexpr const char* kSingleStepOp = "sr3fast::reverse_step";
constexpr const char* kMultistepOp = "sr3fast::reverse_step_multistep";

// The operands of one launch, all laid out as y_t. E, N, X (eps, noise, both histories) are T
// or float; x0_prev and x0 are used only with history, x0_prev2 only with two.
template <typename T, typename E, typename N, typename X>
struct Operands {
  const T* y;
  const E* eps;
  const N* noise;
  const X* x0_prev;   // (B, *) multistep history input: the previous step's x0
  const X* x0_prev2;  // (B, *) second history input: the x0 of two steps back
  T* out;             // (B, *) y_prev
  T* x0;              // (B, *) multistep output: this step's (clamped) x0 estimate
};

// One sample's run [begin, end); k: its coefficients. The vector body is math.h's update written
// with Vectorized<float>, whose operations round one by one in the same order.
template <int kHistory, typename T, typename E, typename N, typename X>
void run_step(const Operands<T, E, N, X>& o, int64_t begin, int64_t end, const float* k,
              bool clip_enabled, float clip) {
  using L = Lanes<T>;
  const fVec a(k[kA]), b(k[kB]), m0(k[kM0]), m1(k[kM1]), sigma(k[kSigma]);
  const fVec m2(kHistory >= 1 ? k[kM2] : 0.f), m3(kHistory == 2 ? k[kM3] : 0.f);
  const fVec low(-clip), high(clip);
  int64_t i = begin;
  for (; i + L::kSize <= end; i += L::kSize) {
    const L yv = L::load(o.y + i), ev = L::template load_from<E>(o.eps + i);
    const L zv = L::template load_from<N>(o.noise + i);
    L result, x0s, history, history2;
    if constexpr (kHistory >= 1) {
      history = L::template load_from<X>(o.x0_prev + i);
    }
    if constexpr (kHistory == 2) {
      history2 = L::template load_from<X>(o.x0_prev2 + i);
    }
    for (int j = 0; j < L::kVecs; ++j) {
      fVec x0 = a * yv.v[j] - b * ev.v[j];
      if (clip_enabled) {  // NaN stays NaN, as in clamp() of math.h
        x0 = at::vec::clamp(x0, low, high);
      }
      fVec sum = m0 * x0 + m1 * yv.v[j];
      if constexpr (kHistory >= 1) {
        sum = sum + m2 * history.v[j];
        x0s.v[j] = x0;
      }
      if constexpr (kHistory == 2) {
        sum = sum + m3 * history2.v[j];
      }
      result.v[j] = sum + sigma * zv.v[j];
    }
    result.store(o.out + i);
    if constexpr (kHistory >= 1) {
      x0s.store(o.x0 + i);
    }
  }
  for (; i < end; ++i) {  // the tail: the scalar update the CUDA kernel runs too (math.h)
    const float y = static_cast<float>(o.y[i]);
    const float x0 = x0_estimate(y, static_cast<float>(o.eps[i]), k, clip_enabled, clip);
    const float x0_prev = kHistory >= 1 ? static_cast<float>(o.x0_prev[i]) : 0.f;
    const float x0_prev2 = kHistory == 2 ? static_cast<float>(o.x0_prev2[i]) : 0.f;
    o.out[i] = static_cast<T>(
        update<kHistory>(x0, y, static_cast<float>(o.noise[i]), x0_prev, x0_prev2, k));
    if constexpr (kHistory >= 1) {
      o.x0[i] = static_cast<T>(x0);
    }
  }
}

template <int kHistory, typename T, typename E, typename N, typename X>
void step(const Problem& p, const at::Tensor& noise, at::Tensor& out, at::Tensor& x0) {
  const Operands<T, E, N, X> o{p.y_t.data_ptr<T>(),
                               p.eps.data_ptr<E>(),
                               noise.data_ptr<N>(),
                               kHistory >= 1 ? p.x0_prev.data_ptr<X>() : nullptr,
                               kHistory == 2 ? p.x0_prev2.data_ptr<X>() : nullptr,
                               out.data_ptr<T>(),
                               kHistory >= 1 ? x0.data_ptr<T>() : nullptr};
  const float* coefs = p.coefs.data_ptr<float>();
  const int64_t tasks_per_sample = ceil_div(p.per_sample, kTaskElements);
  at::parallel_for(0, p.batch * tasks_per_sample, 2, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_sample, chunk = task % tasks_per_sample;
      // both layouts keep each sample's elements together: sample b is [b*per_sample, ...)
      const int64_t first = b * p.per_sample + chunk * kTaskElements;
      const int64_t last = std::min(first + kTaskElements, (b + 1) * p.per_sample);
      run_step<kHistory>(o, first, last, coefs + b * p.coef_stride, p.clip_enabled, p.clip);
    }
  });
}

// The whole op on a checked problem: z drawn when not given, then one pass. x0 is written only
// with history (it may be undefined otherwise).
template <int kHistory>
void run(const char* op, const Problem& p, const at::Tensor& y_t,
         const std::optional<at::Generator>& generator, at::Tensor& out, at::Tensor& x0) {
  at::Tensor z = p.noise;
  if (!z.defined()) {
    check_generator(op, generator, y_t);
    // Drawn in logical (contiguous) order like the reference's torch.randn, then laid out as y_t.
    z = in_layout_of(at::randn(y_t.sizes(), generator, y_t.options().dtype(at::kFloat)),
                     p.layout, p.y_t);
  }
  if (out.numel() == 0) {
    return;
  }
  SR3FAST_DISPATCH_FLOATING_TYPES(p.y_t.scalar_type(), "reverse_step_cpu", [&] {
    using T = scalar_t;
    with_operand_types<T, kHistory>(p, z.scalar_type() != p.y_t.scalar_type(),
                                    [&](auto e, auto n, auto x) {
                                      step<kHistory, T, typename decltype(e)::type,
                                           typename decltype(n)::type,
                                           typename decltype(x)::type>(p, z, out, x0);
                                    });
  });
}

at::Tensor reverse_step_cpu(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                            const std::optional<at::Tensor>& noise, std::optional<double> clip,
                            std::optional<at::Generator> generator) {
  const Problem p = make_problem(kSingleStepOp, y_t, eps, coefs, noise, clip);
  auto out = at::empty_like(p.y_t);
  at::Tensor no_x0;
  run<0>(kSingleStepOp, p, y_t, generator, out, no_x0);
  return out;
}

std::tuple<at::Tensor, at::Tensor> reverse_step_multistep_cpu(
    const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
    const at::Tensor& x0_prev, const std::optional<at::Tensor>& noise, std::optional<double> clip,
    std::optional<at::Generator> generator, const std::optional<at::Tensor>& x0_prev2) {
  const Problem p = make_problem(kMultistepOp, y_t, eps, coefs, noise, clip, x0_prev, x0_prev2);
  auto out = at::empty_like(p.y_t);
  auto x0 = at::empty_like(p.y_t);
  if (p.history() == 2) {
    run<2>(kMultistepOp, p, y_t, generator, out, x0);
  } else {
    run<1>(kMultistepOp, p, y_t, generator, out, x0);
  }
  return {out, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CPU, m) {
  m.impl("reverse_step", &reverse_step_cpu);
  m.impl("reverse_step_multistep", &reverse_step_multistep_cpu);
}

}  // namespace sr3fast::reverse_step
