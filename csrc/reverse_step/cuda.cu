// reverse_step and reverse_step_multistep on CUDA: one fused elementwise kernel on the current
// stream, serving both ops (the template depth kHistory, 0, 1 or 2 past x0 estimates, adds the
// multistep terms m2*x0_prev [+ m3*x0_prev2] and the output x0). The per-element update is
// math.h's x0_estimate / update, shared with the CPU kernel: float32 maths with explicitly
// rounded operations in the reference's order (no FMA contraction) and a NaN-preserving clamp,
// so with the same z it matches sr3fast.reference bit for bit.
//
// Without `noise`, z is drawn in the kernel with curand's Philox, seeded from the torch generator
// the CUDA-graph-safe way (philox_cuda_state under the generator's lock, unpacked in the kernel,
// as PyTorch's dropout does): a captured sampling loop replays with fresh noise every step.
// Thread i always draws the normals of elements [8i, 8i + 8) from Philox subsequence i, so the
// noise for a given generator state does not depend on the GPU model or on alignment.
#include <curand_kernel.h>

#include <tuple>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "reverse_step/math.h"
#include "reverse_step/problem.h"

namespace sr3fast::reverse_step {
namespace {

using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // two curand_normal4 draws
constexpr int kQuad = 4;
// Philox counter advance per launch: 32-bit draws per thread (each curand_normal4 takes four).
constexpr uint64_t kPhiloxIncrement = kPerThread;

struct Step {
  const float* coefs;   // (B, coef_stride)
  int64_t coef_stride;  // 5, 6 or 7
  int64_t numel, per_sample;
  bool clip_enabled;
  float clip;
};

// The operands of one launch, all laid out as y_t. E, N, X (eps, noise, both histories) are T
// or float; noise is null when the kernel draws z; x0_prev and x0 are used only with history,
// x0_prev2 only with two.
template <typename T, typename E, typename N, typename X>
struct Operands {
  const T* __restrict__ y;
  const E* __restrict__ eps;
  const N* __restrict__ noise;
  const X* __restrict__ x0_prev;   // (B, *) multistep history input: the previous step's x0
  T* __restrict__ out;             // (B, *) y_prev
  T* __restrict__ x0;              // (B, *) multistep output: this step's (clamped) x0 estimate
  const X* __restrict__ x0_prev2;  // (B, *) second history input: the x0 of two steps back
};

// kHistory: 0 the single-step op; 1 the multistep op (reads x0_prev, adds m2*x0_prev, writes
// x0); 2 also reads x0_prev2 and adds m3*x0_prev2. The noise draw is the same at every depth, so
// all see the same z for the same generator state.
// kQuads: whether each group of four elements lies in one sample and its pointers allow 16-byte
// (or 8-byte) packed accesses; otherwise every element is handled on its own.
template <int kHistory, typename T, typename E, typename N, typename X, bool kQuads>
__global__ void __launch_bounds__(kThreads)
    reverse_step_kernel(const Operands<T, E, N, X> o, Step step, at::PhiloxCudaState philox) {
  const int64_t thread = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t first = thread * kPerThread;
  if (first >= step.numel) {
    return;
  }
  float z[kPerThread];
  if (o.noise == nullptr) {
    const auto seeds = at::cuda::philox::unpack(philox);
    curandStatePhilox4_32_10_t state;
    curand_init(std::get<0>(seeds), thread, std::get<1>(seeds), &state);
#pragma unroll
    for (int q = 0; q < kPerThread; q += kQuad) {
      const float4 normal = curand_normal4(&state);
      z[q] = normal.x;
      z[q + 1] = normal.y;
      z[q + 2] = normal.z;
      z[q + 3] = normal.w;
    }
  }
#pragma unroll
  for (int q = 0; q < kPerThread; q += kQuad) {
    const int64_t at = first + q;
    if constexpr (kQuads) {
      if (at >= step.numel) {
        break;
      }
      const float* k = step.coefs + (at / step.per_sample) * step.coef_stride;
      const auto ys = *reinterpret_cast<const Pack<T, kQuad>*>(o.y + at);
      const auto es = *reinterpret_cast<const Pack<E, kQuad>*>(o.eps + at);
      if (o.noise != nullptr) {
        const auto ns = *reinterpret_cast<const Pack<N, kQuad>*>(o.noise + at);
#pragma unroll
        for (int j = 0; j < kQuad; ++j) {
          z[q + j] = static_cast<float>(ns.v[j]);
        }
      }
      float history[kQuad] = {}, history2[kQuad] = {};
      if constexpr (kHistory >= 1) {
        const auto xs = *reinterpret_cast<const Pack<X, kQuad>*>(o.x0_prev + at);
#pragma unroll
        for (int j = 0; j < kQuad; ++j) {
          history[j] = static_cast<float>(xs.v[j]);
        }
      }
      if constexpr (kHistory == 2) {
        const auto xs = *reinterpret_cast<const Pack<X, kQuad>*>(o.x0_prev2 + at);
#pragma unroll
        for (int j = 0; j < kQuad; ++j) {
          history2[j] = static_cast<float>(xs.v[j]);
        }
      }
      Pack<T, kQuad> result, x0s;
#pragma unroll
      for (int j = 0; j < kQuad; ++j) {
        const float yj = static_cast<float>(ys.v[j]);
        const float x0 =
            x0_estimate(yj, static_cast<float>(es.v[j]), k, step.clip_enabled, step.clip);
        result.v[j] =
            static_cast<T>(update<kHistory>(x0, yj, z[q + j], history[j], history2[j], k));
        x0s.v[j] = static_cast<T>(x0);
      }
      *reinterpret_cast<Pack<T, kQuad>*>(o.out + at) = result;
      if constexpr (kHistory >= 1) {
        *reinterpret_cast<Pack<T, kQuad>*>(o.x0 + at) = x0s;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kQuad; ++j) {
        const int64_t i = at + j;
        if (i < step.numel) {
          const float* k = step.coefs + (i / step.per_sample) * step.coef_stride;
          const float zi = o.noise != nullptr ? static_cast<float>(o.noise[i]) : z[q + j];
          const float yi = static_cast<float>(o.y[i]);
          const float x0 =
              x0_estimate(yi, static_cast<float>(o.eps[i]), k, step.clip_enabled, step.clip);
          const float x0_prev = kHistory >= 1 ? static_cast<float>(o.x0_prev[i]) : 0.f;
          const float x0_prev2 = kHistory == 2 ? static_cast<float>(o.x0_prev2[i]) : 0.f;
          o.out[i] = static_cast<T>(update<kHistory>(x0, yi, zi, x0_prev, x0_prev2, k));
          if constexpr (kHistory >= 1) {
            o.x0[i] = static_cast<T>(x0);
          }
        }
      }
    }
  }
}

template <int kHistory, typename T, typename E, typename N, typename X>
void launch(const Problem& p, at::Tensor& out, at::Tensor& x0, const at::PhiloxCudaState& philox) {
  const Operands<T, E, N, X> o{p.y_t.data_ptr<T>(),
                               p.eps.data_ptr<E>(),
                               p.noise.defined() ? p.noise.data_ptr<N>() : nullptr,
                               kHistory >= 1 ? p.x0_prev.data_ptr<X>() : nullptr,
                               out.data_ptr<T>(),
                               kHistory >= 1 ? x0.data_ptr<T>() : nullptr,
                               kHistory == 2 ? p.x0_prev2.data_ptr<X>() : nullptr};
  const Step step{p.coefs.data_ptr<float>(), p.coef_stride, out.numel(), p.per_sample,
                  p.clip_enabled, p.clip};
  const bool quads = p.per_sample % kQuad == 0 && cuda::is_aligned(o.y, 16) &&
                     cuda::is_aligned(o.eps, 16) && cuda::is_aligned(o.out, 16) &&
                     (o.noise == nullptr || cuda::is_aligned(o.noise, 16)) &&
                     (kHistory < 1 ||
                      (cuda::is_aligned(o.x0_prev, 16) && cuda::is_aligned(o.x0, 16))) &&
                     (kHistory < 2 || cuda::is_aligned(o.x0_prev2, 16));
  const int64_t blocks = ceil_div(ceil_div(step.numel, kPerThread), kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "sr3fast::reverse_step: y_t ", p.y_t.sizes(),
              " is too large for one launch; split the batch");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto kernel = quads ? reverse_step_kernel<kHistory, T, E, N, X, true>
                            : reverse_step_kernel<kHistory, T, E, N, X, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(o, step, philox);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The whole op on a checked problem (the caller holds a guard for y_t's device): the Philox
// state when z is drawn, then one launch. x0 is written only with history.
template <int kHistory>
void run(const char* op, const Problem& p, const at::Tensor& y_t,
         const std::optional<at::Generator>& generator, at::Tensor& out, at::Tensor& x0) {
  if (out.numel() == 0) {
    return;
  }
  at::PhiloxCudaState philox;
  if (!p.noise.defined()) {
    // torch.Generator("cuda") has no device index: it draws for the current device, which the
    // caller's guard made y_t's (as PyTorch's own CUDA random ops take it). Comparing the devices
    // whole refused it ("the generator is on cuda but y_t on cuda:0").
    check_generator(op, generator, y_t);
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(y_t.device().index()));
    // See Note [Acquire lock when using random generators]
    const std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPhiloxIncrement);
  }
  SR3FAST_DISPATCH_FLOATING_TYPES(p.y_t.scalar_type(), "reverse_step_cuda", [&] {
    using T = scalar_t;
    const bool noise_float = p.noise.defined() && p.noise.scalar_type() != p.y_t.scalar_type();
    with_operand_types<T, kHistory>(p, noise_float, [&](auto e, auto n, auto x) {
      launch<kHistory, T, typename decltype(e)::type, typename decltype(n)::type,
             typename decltype(x)::type>(p, out, x0, philox);
    });
  });
}

constexpr const char* kSingleStepOp = "sr3fast::reverse_step";
constexpr const char* kMultistepOp = "sr3fast::reverse_step_multistep";

at::Tensor reverse_step_cuda(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                             const std::optional<at::Tensor>& noise, std::optional<double> clip,
                             std::optional<at::Generator> generator) {
  const c10::cuda::CUDAGuard device_guard(y_t.device());
  const Problem p = make_problem(kSingleStepOp, y_t, eps, coefs, noise, clip);
  auto out = at::empty_like(p.y_t);
  at::Tensor no_x0;
  run<0>(kSingleStepOp, p, y_t, generator, out, no_x0);
  return out;
}

std::tuple<at::Tensor, at::Tensor> reverse_step_multistep_cuda(
    const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
    const at::Tensor& x0_prev, const std::optional<at::Tensor>& noise, std::optional<double> clip,
    std::optional<at::Generator> generator, const std::optional<at::Tensor>& x0_prev2) {
  const c10::cuda::CUDAGuard device_guard(y_t.device());
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

TORCH_LIBRARY_IMPL(sr3fast, CUDA, m) {
  m.impl("reverse_step", &reverse_step_cuda);
  m.impl("reverse_step_multistep", &reverse_step_multistep_cuda);
}

}  // namespace sr3fast::reverse_step
