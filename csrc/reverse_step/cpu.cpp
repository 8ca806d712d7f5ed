// reverse_step on CPU: one fused, vectorised pass per sample, float32 maths in the reference's
// order of operations (no FMA), so with the same z it reproduces sr3fast.reference bit for bit.
// Without `noise`, z is drawn with the CPU generator exactly as the reference draws it.
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

// One sample's run [begin, end): E and N (eps, noise) are T or float.
template <typename T, typename E, typename N>
void run_step(const T* y, const E* eps, const N* noise, T* out, int64_t begin, int64_t end,
              const float* k, bool clip_enabled, float clip) {
  using L = Lanes<T>;
  const fVec a(k[kA]), b(k[kB]), m0(k[kM0]), m1(k[kM1]), sigma(k[kSigma]);
  const fVec low(-clip), high(clip);
  int64_t i = begin;
  for (; i + L::kSize <= end; i += L::kSize) {
    const L yv = L::load(y + i), ev = L::template load_from<E>(eps + i);
    const L zv = L::template load_from<N>(noise + i);
    L result;
    for (int j = 0; j < L::kVecs; ++j) {
      fVec x0 = a * yv.v[j] - b * ev.v[j];
      if (clip_enabled) {  // NaN stays NaN, as in clamp() of math.h
        x0 = at::vec::clamp(x0, low, high);
      }
      result.v[j] = m0 * x0 + m1 * yv.v[j] + sigma * zv.v[j];
    }
    result.store(out + i);
  }
  for (; i < end; ++i) {  // the tail: the scalar update the CUDA kernel runs too (math.h)
    out[i] = static_cast<T>(step_value(static_cast<float>(y[i]), static_cast<float>(eps[i]),
                                       static_cast<float>(noise[i]), k, clip_enabled, clip));
  }
}

template <typename T, typename E, typename N>
void step(const Problem& p, const at::Tensor& noise, at::Tensor& out) {
  const T* y = p.y_t.data_ptr<T>();
  const E* eps = p.eps.data_ptr<E>();
  const N* z = noise.data_ptr<N>();
  T* result = out.data_ptr<T>();
  const float* coefs = p.coefs.data_ptr<float>();
  const int64_t tasks_per_sample = ceil_div(p.per_sample, kTaskElements);
  at::parallel_for(0, p.batch * tasks_per_sample, 2, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_sample, chunk = task % tasks_per_sample;
      // both layouts keep each sample's elements together: sample b is [b*per_sample, ...)
      const int64_t first = b * p.per_sample + chunk * kTaskElements;
      const int64_t last = std::min(first + kTaskElements, (b + 1) * p.per_sample);
      run_step<T, E, N>(y, eps, z, result, first, last, coefs + b * kCoefs, p.clip_enabled,
                        p.clip);
    }
  });
}

at::Tensor reverse_step_cpu(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                            const std::optional<at::Tensor>& noise, std::optional<double> clip,
                            std::optional<at::Generator> generator) {
  const Problem p = make_problem(y_t, eps, coefs, noise, clip);
  at::Tensor z = p.noise;
  if (!z.defined()) {
    check_generator(generator, y_t);
    // Drawn in logical (contiguous) order like the reference's torch.randn, then laid out as y_t.
    z = in_layout_of(at::randn(y_t.sizes(), generator, y_t.options().dtype(at::kFloat)),
                     p.layout, p.y_t);
  }
  auto out = at::empty_like(p.y_t);
  if (out.numel() == 0) {
    return out;
  }
  SR3FAST_DISPATCH_FLOATING_TYPES(p.y_t.scalar_type(), "reverse_step_cpu", [&] {
    using T = scalar_t;
    const bool eps_float = p.eps.scalar_type() != p.y_t.scalar_type();
    const bool noise_float = z.scalar_type() != p.y_t.scalar_type();
    if (!eps_float && !noise_float) {
      step<T, T, T>(p, z, out);
    } else if (!eps_float) {
      step<T, T, float>(p, z, out);
    } else if (!noise_float) {
      step<T, float, T>(p, z, out);
    } else {
      step<T, float, float>(p, z, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CPU, m) { m.impl("reverse_step", &reverse_step_cpu); }

}  // namespace sr3fast::reverse_step
