// reverse_step on CUDA: one fused elementwise kernel on the current stream. The per-element update
// is math.h's step_value, shared with the CPU kernel: float32 maths with explicitly rounded
// operations in the reference's order (no FMA contraction) and a NaN-preserving clamp, so with
// the same z it matches sr3fast.reference bit for bit.
//
// Without `noise`, z is drawn in the kernel with curand's Philox, seeded from the torch generator
// the CUDA-graph-safe way (philox_cuda_state under the generator's lock, unpacked in the kernel,
// as PyTorch's dropout does): a captured sampling loop replays with fresh noise every step.
// Thread i always draws the normals of elements [8i, 8i + 8) from Philox subsequence i, so the
// noise for a given generator state does not depend on the GPU model or on alignment.
#include <curand_kernel.h>

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
  const float* coefs;  // (B, 5)
  int64_t numel, per_sample;
  bool clip_enabled;
  float clip;
};

// kQuads: whether each group of four elements lies in one sample and its pointers allow 16-byte
// (or 8-byte) packed accesses; otherwise every element is handled on its own.
template <typename T, typename E, typename N, bool kQuads>
__global__ void __launch_bounds__(kThreads)
    reverse_step_kernel(const T* __restrict__ y, const E* __restrict__ eps,
                        const N* __restrict__ noise, T* __restrict__ out, Step step,
                        at::PhiloxCudaState philox) {
  const int64_t thread = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t first = thread * kPerThread;
  if (first >= step.numel) {
    return;
  }
  float z[kPerThread];
  if (noise == nullptr) {
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
      const float* k = step.coefs + (at / step.per_sample) * kCoefs;
      const auto ys = *reinterpret_cast<const Pack<T, kQuad>*>(y + at);
      const auto es = *reinterpret_cast<const Pack<E, kQuad>*>(eps + at);
      if (noise != nullptr) {
        const auto ns = *reinterpret_cast<const Pack<N, kQuad>*>(noise + at);
#pragma unroll
        for (int j = 0; j < kQuad; ++j) {
          z[q + j] = static_cast<float>(ns.v[j]);
        }
      }
      Pack<T, kQuad> result;
#pragma unroll
      for (int j = 0; j < kQuad; ++j) {
        result.v[j] = static_cast<T>(step_value(static_cast<float>(ys.v[j]),
                                                static_cast<float>(es.v[j]), z[q + j], k,
                                                step.clip_enabled, step.clip));
      }
      *reinterpret_cast<Pack<T, kQuad>*>(out + at) = result;
    } else {
#pragma unroll
      for (int j = 0; j < kQuad; ++j) {
        const int64_t i = at + j;
        if (i < step.numel) {
          const float* k = step.coefs + (i / step.per_sample) * kCoefs;
          const float zi = noise != nullptr ? static_cast<float>(noise[i]) : z[q + j];
          out[i] = static_cast<T>(step_value(static_cast<float>(y[i]), static_cast<float>(eps[i]),
                                             zi, k, step.clip_enabled, step.clip));
        }
      }
    }
  }
}

template <typename T, typename E, typename N>
void launch(const Problem& p, at::Tensor& out, const at::PhiloxCudaState& philox) {
  const T* y = p.y_t.data_ptr<T>();
  const E* eps = p.eps.data_ptr<E>();
  const N* noise = p.noise.defined() ? p.noise.data_ptr<N>() : nullptr;
  T* result = out.data_ptr<T>();
  const Step step{p.coefs.data_ptr<float>(), out.numel(), p.per_sample, p.clip_enabled, p.clip};
  const bool quads = p.per_sample % kQuad == 0 && cuda::is_aligned(y, 16) &&
                     cuda::is_aligned(eps, 16) && cuda::is_aligned(result, 16) &&
                     (noise == nullptr || cuda::is_aligned(noise, 16));
  const int64_t blocks = ceil_div(ceil_div(step.numel, kPerThread), kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "sr3fast::reverse_step: y_t ", p.y_t.sizes(),
              " is too large for one launch; split the batch");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto kernel =
      quads ? reverse_step_kernel<T, E, N, true> : reverse_step_kernel<T, E, N, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(y, eps, noise, result, step, philox);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor reverse_step_cuda(const at::Tensor& y_t, const at::Tensor& eps, const at::Tensor& coefs,
                             const std::optional<at::Tensor>& noise, std::optional<double> clip,
                             std::optional<at::Generator> generator) {
  const c10::cuda::CUDAGuard device_guard(y_t.device());
  const Problem p = make_problem(y_t, eps, coefs, noise, clip);
  auto out = at::empty_like(p.y_t);
  if (out.numel() == 0) {
    return out;
  }
  at::PhiloxCudaState philox;
  if (!p.noise.defined()) {
    // torch.Generator("cuda") has no device index: it draws for the current device, which the
    // guard above made y_t's (as PyTorch's own CUDA random ops take it). Comparing the devices
    // whole refused it ("the generator is on cuda but y_t on cuda:0").
    check_generator(generator, y_t);
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(y_t.device().index()));
    // See Note [Acquire lock when using random generators]
    const std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPhiloxIncrement);
  }
  SR3FAST_DISPATCH_FLOATING_TYPES(p.y_t.scalar_type(), "reverse_step_cuda", [&] {
    using T = scalar_t;
    const bool eps_float = p.eps.scalar_type() != p.y_t.scalar_type();
    const bool noise_float = p.noise.defined() && p.noise.scalar_type() != p.y_t.scalar_type();
    if (!eps_float && !noise_float) {
      launch<T, T, T>(p, out, philox);
    } else if (!eps_float) {
      launch<T, T, float>(p, out, philox);
    } else if (!noise_float) {
      launch<T, float, T>(p, out, philox);
    } else {
      launch<T, float, float>(p, out, philox);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CUDA, m) { m.impl("reverse_step", &reverse_step_cuda); }

}  // namespace sr3fast::reverse_step
