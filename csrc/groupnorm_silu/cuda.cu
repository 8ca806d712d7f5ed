// groupnorm_silu on CUDA, on the current stream, float32 statistics and maths.
//
// Same plan as the CPU kernels (formulas in math.h): per-chunk partial reductions, a small
// finalize kernel per (b, g), then an elementwise pass that reads per-(b, c) coefficient tables.
// Groups are split into chunks so that even batch 1 puts several blocks on every SM.
//   forward : moments -> finalize_forward -> forward_pass
//   backward: backward_table -> sums -> finalize_backward -> grad_pass
// Each reduction and pass exists for both layouts:
//   channels-first (B, C, S): a block takes a chunk of the positions of one (b, c);
//   channels-last  (B, S, C): a block takes a chunk of rows of one b and a tile of channels,
//     each thread V adjacent channels, the block's threads along y splitting the rows.
// V is the 16-byte vector width when sizes and pointers allow, else 1.
#include <algorithm>
#include <limits>
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "groupnorm_silu/math.h"
#include "groupnorm_silu/problem.h"

namespace sr3fast::groupnorm_silu {

// For cuda::warp_reduce, found by argument-dependent lookup (so not in the unnamed namespace).
__device__ inline Moments shuffle_down(const Moments& m, int offset) {
  return {__shfl_down_sync(cuda::kFullMask, m.count, offset),
          __shfl_down_sync(cuda::kFullMask, m.mean, offset),
          __shfl_down_sync(cuda::kFullMask, m.m2, offset)};
}

namespace {

using cuda::kVectorWidth;
using cuda::Pack;
using cuda::Sums;

constexpr int kThreads = 256;

// ---- launch geometry ---------------------------------------------------------------------

struct Geometry {
  bool channels_last;
  int vector;           // V: elements per access
  int64_t chunk;        // positions per block
  int64_t num_chunks;
  // channels-first: bx threads per block; channels-last: block (bx, by), tiles of bx*V channels
  int bx = kThreads, by = 1;
  int64_t tiles = 1;
  int64_t blocks;       // 1-D grid
};

Geometry geometry_of(const Problem& p, int vector_width, bool aligned) {
  Geometry g;
  g.channels_last = p.layout == Layout::kChannelsLast;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  const int64_t S = std::max<int64_t>(p.spatial, 1);
  if (!g.channels_last) {
    g.vector = aligned && S % vector_width == 0 ? vector_width : 1;
    const int64_t rows = p.batch * p.channels;
    // at least 4 accesses per thread, so a block's work outweighs its start-up
    const int64_t min_chunk = 4 * kThreads * g.vector;
    const int64_t wanted = std::min(ceil_div(target_blocks, rows), ceil_div(S, min_chunk));
    g.chunk = ceil_div(ceil_div(S, std::max<int64_t>(wanted, 1)), g.vector) * g.vector;
    g.num_chunks = ceil_div(S, g.chunk);
    g.blocks = rows * g.num_chunks;
    // short rows (deep, low-resolution layers): fewer threads, each still with a vector to load
    g.bx = static_cast<int>(std::clamp<int64_t>(
        cuda::next_power_of_two(ceil_div(g.chunk, g.vector)), cuda::kWarpSize, kThreads));
  } else {
    g.vector = aligned && p.channels % vector_width == 0 ? vector_width : 1;
    const int64_t columns = p.channels / g.vector;
    g.bx = std::min(cuda::next_power_of_two(columns), kThreads);
    g.by = kThreads / g.bx;
    g.tiles = ceil_div(columns, g.bx);
    const int64_t wanted =
        std::min(ceil_div(target_blocks, p.batch * g.tiles), ceil_div(S, 4 * g.by));
    g.chunk = ceil_div(S, std::max<int64_t>(wanted, 1));
    g.num_chunks = ceil_div(S, g.chunk);
    g.blocks = p.batch * g.tiles * g.num_chunks;
  }
  TORCH_CHECK(g.blocks < (int64_t{1} << 31), "sr3fast::groupnorm_silu: x ", p.x.sizes(),
              " is too large for one launch; split the batch");
  return g;
}

// Where a block works: channels-first (b, c, chunk k) or channels-last (b, tile, chunk k).
struct BlockPlace {
  int64_t b, c, k;  // c: first channel of this thread (channels-last) or the block's channel
  int64_t first, last;  // positions [first, last)
  bool active;      // channels-last: whether this thread's channels exist
};

__device__ BlockPlace place_of(int64_t C, int64_t S, int64_t chunk, int64_t num_chunks,
                               bool channels_last, int vector, int64_t tiles) {
  BlockPlace at;
  const int64_t block = blockIdx.x;
  at.k = block % num_chunks;
  if (!channels_last) {
    const int64_t row = block / num_chunks;
    at.b = row / C;
    at.c = row % C;
    at.active = true;
  } else {
    const int64_t tile = (block / num_chunks) % tiles;
    at.b = block / (num_chunks * tiles);
    at.c = (tile * blockDim.x + threadIdx.x) * vector;
    at.active = at.c < C;
  }
  at.first = at.k * chunk;
  at.last = at.first + chunk < S ? at.first + chunk : S;
  return at;
}

// Index of (b, k, c) in a per-chunk partial buffer (components, B, num_chunks, C).
__host__ __device__ inline int64_t partial_index(int64_t C, int64_t num_chunks, int64_t b,
                                                 int64_t k, int64_t c) {
  return (b * num_chunks + k) * C + c;
}

// Shapes every kernel needs.
struct Shape {
  int64_t B, C, S, num_chunks, chunk, tiles;
};

// ---- forward -----------------------------------------------------------------------------

// partial: float (3, B, num_chunks, C) = (count, mean, m2) of x over each chunk of each (b, c).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_channels_first(const T* __restrict__ x, Shape s, float* __restrict__ partial) {
  __shared__ Moments scratch[kThreads / cuda::kWarpSize];
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, false, V, 1);
  const T* row = x + (at.b * s.C + at.c) * s.S;
  Moments m;
  for (int64_t i = at.first + threadIdx.x * V; i < at.last; i += blockDim.x * V) {
    const auto pack = *reinterpret_cast<const Pack<T, V>*>(row + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      m.add(static_cast<float>(pack.v[j]));
    }
  }
  m = cuda::block_reduce(m, scratch);
  if (threadIdx.x == 0) {
    const int64_t i = partial_index(s.C, s.num_chunks, at.b, at.k, at.c);
    const int64_t components = s.B * s.num_chunks * s.C;
    partial[i] = m.count;
    partial[components + i] = m.mean;
    partial[2 * components + i] = m.m2;
  }
}

// Merges, over threadIdx.y, the V states each thread holds in `state`; thread y == 0 ends with
// the totals. scratch: shared memory for blockDim.x * blockDim.y * V states (blockDim.y a power
// of two).
template <typename State, int V>
__device__ void column_reduce(State (&state)[V], State* scratch) {
  const int column = threadIdx.x * V, stride = blockDim.x * V;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    scratch[threadIdx.y * stride + column + j] = state[j];
  }
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        state[j].merge(scratch[(threadIdx.y + half) * stride + column + j]);
        scratch[threadIdx.y * stride + column + j] = state[j];
      }
    }
    __syncthreads();
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_channels_last(const T* __restrict__ x, Shape s, float* __restrict__ partial) {
  extern __shared__ float shared_floats[];  // column_reduce's scratch
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, true, V, s.tiles);
  Moments m[V];
  if (at.active) {
    for (int64_t r = at.first + threadIdx.y; r < at.last; r += blockDim.y) {
      const auto pack = *reinterpret_cast<const Pack<T, V>*>(x + (at.b * s.S + r) * s.C + at.c);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        m[j].add(static_cast<float>(pack.v[j]));
      }
    }
  }
  column_reduce<Moments, V>(m, reinterpret_cast<Moments*>(shared_floats));
  if (threadIdx.y == 0 && at.active) {
    const int64_t i = partial_index(s.C, s.num_chunks, at.b, at.k, at.c);
    const int64_t components = s.B * s.num_chunks * s.C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      partial[i + j] = m[j].count;
      partial[components + i + j] = m[j].mean;
      partial[2 * components + i + j] = m[j].m2;
    }
  }
}

template <typename P>
__device__ float param_or(const P* param, int64_t index, float fallback) {
  return param != nullptr ? static_cast<float>(param[index]) : fallback;
}

// One block per (b, g): merges the group's partial moments (adding each channel's shift to its
// mean), writes mean and rstd (B, G) and the group's columns of the forward table.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    finalize_forward(const float* __restrict__ partial, Shape s, int64_t groups, float eps,
                     const P* __restrict__ weight, const P* __restrict__ bias,
                     const P* __restrict__ shift, float* __restrict__ mean_out,
                     float* __restrict__ rstd_out, float* __restrict__ table) {
  __shared__ Moments scratch[kThreads / cuda::kWarpSize];
  __shared__ float stats[2];
  const int64_t bg = blockIdx.x, b = bg / groups, D = s.C / groups, c0 = (bg % groups) * D;
  const int64_t components = s.B * s.num_chunks * s.C;
  Moments m;
  for (int64_t i = threadIdx.x; i < D * s.num_chunks; i += kThreads) {
    const int64_t c = c0 + i / s.num_chunks, k = i % s.num_chunks;
    const int64_t at = partial_index(s.C, s.num_chunks, b, k, c);
    m.merge({partial[at], partial[components + at] + param_or(shift, b * s.C + c, 0.f),
             partial[2 * components + at]});
  }
  m = cuda::block_reduce(m, scratch);
  if (threadIdx.x == 0) {
    const float rstd = rsqrtf(fmaxf(m.m2 / m.count, 0.f) + eps);
    mean_out[bg] = m.mean;
    rstd_out[bg] = rstd;
    stats[0] = m.mean;
    stats[1] = rstd;
  }
  __syncthreads();
  const int64_t BC = s.B * s.C;
  for (int64_t c = c0 + threadIdx.x; c < c0 + D; c += kThreads) {
    const int64_t bc = b * s.C + c;
    table[kShift * BC + bc] = param_or(shift, bc, 0.f);
    table[kMean * BC + bc] = stats[0];
    table[kAlpha * BC + bc] = stats[1] * param_or(weight, c, 1.f);
    table[kBeta * BC + bc] = param_or(bias, c, 0.f);
  }
}

// y = act((x + shift - mean)*alpha + beta) with the forward table.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    forward_pass(const T* __restrict__ x, T* __restrict__ y, Shape s, bool channels_last,
                 const float* __restrict__ table, bool act) {
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, channels_last, V, s.tiles);
  if (!at.active) {
    return;
  }
  const int64_t BC = s.B * s.C, bc = at.b * s.C + at.c;
  float k[V][kForwardCoefs];  // channels-first: one channel for all V
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int n = 0; n < kForwardCoefs; ++n) {
      k[j][n] = table[n * BC + (channels_last ? bc + j : bc)];
    }
  }
  // channels-first: step along the row; channels-last: step over rows
  const int64_t start = channels_last ? at.first + threadIdx.y : at.first + threadIdx.x * V;
  const int64_t step = channels_last ? blockDim.y : blockDim.x * V;
  for (int64_t i = start; i < at.last; i += step) {
    const int64_t offset = channels_last ? (at.b * s.S + i) * s.C + at.c : bc * s.S + i;
    auto pack = *reinterpret_cast<const Pack<T, V>*>(x + offset);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float h = centered(static_cast<float>(pack.v[j]), k[j][kShift], k[j][kMean]);
      pack.v[j] = static_cast<T>(activate(h * k[j][kAlpha] + k[j][kBeta], act));
    }
    *reinterpret_cast<Pack<T, V>*>(y + offset) = pack;
  }
}

// ---- backward ----------------------------------------------------------------------------

// The backward table's coefficients known from the forward statistics, one thread per (b, c);
// parameters float32.
__global__ void backward_table(Shape s, int64_t groups, const float* __restrict__ mean,
                               const float* __restrict__ rstd, const float* __restrict__ weight,
                               const float* __restrict__ bias, const float* __restrict__ shift,
                               float* __restrict__ table) {
  const int64_t BC = s.B * s.C, bc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bc >= BC) {
    return;
  }
  const int64_t c = bc % s.C, bg = (bc / s.C) * groups + c / (s.C / groups);
  table[kShift * BC + bc] = param_or(shift, bc, 0.f);
  table[kMean * BC + bc] = mean[bg];
  table[kRstd * BC + bc] = rstd[bg];
  table[kWeight * BC + bc] = param_or(weight, c, 1.f);
  table[kBias * BC + bc] = param_or(bias, c, 0.f);
}

// dz (the gradient reaching the pre-activation z) and xhat of one element.
struct GradTerms {
  float dz, xhat;
};

template <int K>
__device__ GradTerms grad_terms(float x, float dy, const float (&k)[K], bool act) {
  const float xhat = centered(x, k[kShift], k[kMean]) * k[kRstd];
  return {activation_grad(xhat * k[kWeight] + k[kBias], dy, act), xhat};
}

// partial: float (kSums, B, num_chunks, C): sums of dz, dz*xhat and xhat over each chunk.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_channels_first(const T* __restrict__ x, const T* __restrict__ dy, Shape s,
                        const float* __restrict__ table, bool act, float* __restrict__ partial) {
  __shared__ Sums<kSums> scratch[kThreads / cuda::kWarpSize];
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, false, V, 1);
  const int64_t BC = s.B * s.C, bc = at.b * s.C + at.c;
  float k[kSumCoefs];
#pragma unroll
  for (int j = 0; j < kSumCoefs; ++j) {
    k[j] = table[j * BC + bc];
  }
  Sums<kSums> sums;
  for (int64_t i = at.first + threadIdx.x * V; i < at.last; i += blockDim.x * V) {
    const auto xs = *reinterpret_cast<const Pack<T, V>*>(x + bc * s.S + i);
    const auto gs = *reinterpret_cast<const Pack<T, V>*>(dy + bc * s.S + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const GradTerms g =
          grad_terms(static_cast<float>(xs.v[j]), static_cast<float>(gs.v[j]), k, act);
      sums.v[kSumDz] += g.dz;
      sums.v[kSumDzXhat] += g.dz * g.xhat;
      sums.v[kSumXhat] += g.xhat;
    }
  }
  sums = cuda::block_reduce(sums, scratch);
  if (threadIdx.x == 0) {
    const int64_t i = partial_index(s.C, s.num_chunks, at.b, at.k, at.c);
    const int64_t components = s.B * s.num_chunks * s.C;
#pragma unroll
    for (int j = 0; j < kSums; ++j) {
      partial[j * components + i] = sums.v[j];
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_channels_last(const T* __restrict__ x, const T* __restrict__ dy, Shape s,
                       const float* __restrict__ table, bool act, float* __restrict__ partial) {
  extern __shared__ float shared_floats[];  // column_reduce's scratch
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, true, V, s.tiles);
  const int64_t BC = s.B * s.C, bc = at.b * s.C + at.c;
  Sums<kSums> sums[V];
  if (at.active) {
    float k[V][kSumCoefs];
#pragma unroll
    for (int j = 0; j < V; ++j) {
#pragma unroll
      for (int n = 0; n < kSumCoefs; ++n) {
        k[j][n] = table[n * BC + bc + j];
      }
    }
    for (int64_t r = at.first + threadIdx.y; r < at.last; r += blockDim.y) {
      const int64_t offset = (at.b * s.S + r) * s.C + at.c;
      const auto xs = *reinterpret_cast<const Pack<T, V>*>(x + offset);
      const auto gs = *reinterpret_cast<const Pack<T, V>*>(dy + offset);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const GradTerms g =
            grad_terms(static_cast<float>(xs.v[j]), static_cast<float>(gs.v[j]), k[j], act);
        sums[j].v[kSumDz] += g.dz;
        sums[j].v[kSumDzXhat] += g.dz * g.xhat;
        sums[j].v[kSumXhat] += g.xhat;
      }
    }
  }
  column_reduce<Sums<kSums>, V>(sums, reinterpret_cast<Sums<kSums>*>(shared_floats));
  if (threadIdx.y == 0 && at.active) {
    const int64_t i = partial_index(s.C, s.num_chunks, at.b, at.k, at.c);
    const int64_t components = s.B * s.num_chunks * s.C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
#pragma unroll
      for (int n = 0; n < kSums; ++n) {
        partial[n * components + i + j] = sums[j].v[n];
      }
    }
  }
}

// One block per group g, looping over the batch: per (b, c) totals of the partial sums, the
// group's A and B (the table's v and t), grad_shift (B, C), and grad_weight, grad_bias (C,)
// summed over b by the thread that owns each channel. totals: float scratch (kSums, B, C).
__global__ void __launch_bounds__(kThreads)
    finalize_backward(const float* __restrict__ partial, Shape s, int64_t groups,
                      float* __restrict__ table, float* __restrict__ totals,
                      float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                      float* __restrict__ grad_shift) {
  __shared__ Sums<2> scratch[kThreads / cuda::kWarpSize];
  __shared__ float group_terms[2];
  const int64_t g = blockIdx.x, D = s.C / groups, c0 = g * D;
  const int64_t BC = s.B * s.C, components = s.B * s.num_chunks * s.C;
  const float count = static_cast<float>(D * s.S);
  for (int64_t b = 0; b < s.B; ++b) {
    Sums<2> weighted;  // sums over the group of w_c*dz*xhat and w_c*dz
    for (int64_t c = c0 + threadIdx.x; c < c0 + D; c += kThreads) {
      float total[kSums] = {};
      for (int64_t k = 0; k < s.num_chunks; ++k) {
        const int64_t i = partial_index(s.C, s.num_chunks, b, k, c);
#pragma unroll
        for (int n = 0; n < kSums; ++n) {
          total[n] += partial[n * components + i];
        }
      }
#pragma unroll
      for (int n = 0; n < kSums; ++n) {
        totals[n * BC + b * s.C + c] = total[n];
      }
      const float w = table[kWeight * BC + b * s.C + c];
      weighted.v[0] += w * total[kSumDzXhat];
      weighted.v[1] += w * total[kSumDz];
    }
    weighted = cuda::block_reduce(weighted, scratch);
    if (threadIdx.x == 0) {
      const float r = table[kRstd * BC + b * s.C + c0];
      group_terms[0] = -r * (weighted.v[0] / count);  // v = -r*A
      group_terms[1] = -r * (weighted.v[1] / count);  // t = -r*B
    }
    __syncthreads();
    const float v = group_terms[0], t = group_terms[1];
    for (int64_t c = c0 + threadIdx.x; c < c0 + D; c += kThreads) {
      const int64_t bc = b * s.C + c;
      table[kV * BC + bc] = v;
      table[kT * BC + bc] = t;
      const float u = table[kRstd * BC + bc] * table[kWeight * BC + bc];
      grad_shift[bc] = u * totals[kSumDz * BC + bc] + v * totals[kSumXhat * BC + bc] +
                       static_cast<float>(s.S) * t;
      grad_weight[c] += totals[kSumDzXhat * BC + bc];
      grad_bias[c] += totals[kSumDz * BC + bc];
    }
    __syncthreads();  // group_terms and scratch are reused for the next sample
  }
}

// dx = rstd*w*dz + v*xhat + t with the backward table.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_pass(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, Shape s,
              bool channels_last, const float* __restrict__ table, bool act) {
  const BlockPlace at = place_of(s.C, s.S, s.chunk, s.num_chunks, channels_last, V, s.tiles);
  if (!at.active) {
    return;
  }
  const int64_t BC = s.B * s.C, bc = at.b * s.C + at.c;
  float k[V][kBackwardCoefs];
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int n = 0; n < kBackwardCoefs; ++n) {
      k[j][n] = table[n * BC + (channels_last ? bc + j : bc)];
    }
  }
  const int64_t start = channels_last ? at.first + threadIdx.y : at.first + threadIdx.x * V;
  const int64_t step = channels_last ? blockDim.y : blockDim.x * V;
  for (int64_t i = start; i < at.last; i += step) {
    const int64_t offset = channels_last ? (at.b * s.S + i) * s.C + at.c : bc * s.S + i;
    const auto xs = *reinterpret_cast<const Pack<T, V>*>(x + offset);
    const auto gs = *reinterpret_cast<const Pack<T, V>*>(dy + offset);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const GradTerms g =
          grad_terms(static_cast<float>(xs.v[j]), static_cast<float>(gs.v[j]), k[j], act);
      out.v[j] = static_cast<T>(k[j][kRstd] * k[j][kWeight] * g.dz + k[j][kV] * g.xhat + k[j][kT]);
    }
    *reinterpret_cast<Pack<T, V>*>(dx + offset) = out;
  }
}

// ---- host side ---------------------------------------------------------------------------

Shape shape_of(const Problem& p, const Geometry& g) {
  return {p.batch, p.channels, p.spatial, g.num_chunks, g.chunk, g.tiles};
}

dim3 block_of(const Geometry& g) { return dim3(g.bx, g.by); }

template <typename State>
size_t column_scratch_bytes(const Geometry& g) {
  return g.channels_last ? sizeof(State) * g.bx * g.by * g.vector : 0;
}

// Calls body(std::integral_constant<int, V>) with V the geometry's vector width.
template <typename T, typename Body>
void with_vector_width(const Geometry& g, const Body& body) {
  if (g.vector == kVectorWidth<T>) {
    body(std::integral_constant<int, kVectorWidth<T>>());
  } else {
    body(std::integral_constant<int, 1>());
  }
}

bool all_aligned(std::initializer_list<const void*> pointers) {
  for (const void* pointer : pointers) {
    if (!cuda::is_aligned(pointer, 16)) {
      return false;
    }
  }
  return true;
}

template <typename T>
void forward(const Problem& p, double eps, bool act, at::Tensor& y, at::Tensor& mean,
             at::Tensor& rstd) {
  const T* x = p.x.data_ptr<T>();
  const Geometry g = geometry_of(p, kVectorWidth<T>, all_aligned({x, y.data_ptr()}));
  const Shape s = shape_of(p, g);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto options = p.x.options().dtype(at::kFloat);
  auto partial = at::empty({3, p.batch, g.num_chunks, p.channels}, options);
  auto table = at::empty({kForwardCoefs, p.batch, p.channels}, options);

  with_vector_width<T>(g, [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (g.channels_last) {
      const size_t scratch = column_scratch_bytes<Moments>(g);
      moments_channels_last<T, V><<<g.blocks, block_of(g), scratch, stream>>>(
          x, s, partial.data_ptr<float>());
    } else {
      moments_channels_first<T, V><<<g.blocks, block_of(g), 0, stream>>>(
          x, s, partial.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  SR3FAST_DISPATCH_FLOATING_TYPES(p.param_dtype, "groupnorm_silu_finalize", [&] {
    const auto pointer = [](const at::Tensor& t) {
      return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
    };
    finalize_forward<scalar_t><<<p.batch * p.groups, kThreads, 0, stream>>>(
        partial.data_ptr<float>(), s, p.groups, static_cast<float>(eps), pointer(p.weight),
        pointer(p.bias), pointer(p.shift), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        table.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  with_vector_width<T>(g, [&](auto width) {
    constexpr int V = decltype(width)::value;
    forward_pass<T, V><<<g.blocks, block_of(g), 0, stream>>>(
        x, y.data_ptr<T>(), s, g.channels_last, table.data_ptr<float>(), act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void backward(const Problem& p, const at::Tensor& grad_y, const at::Tensor& mean,
              const at::Tensor& rstd, bool act, at::Tensor& grad_x, at::Tensor& grad_weight,
              at::Tensor& grad_bias, at::Tensor& grad_shift) {
  const T* x = p.x.data_ptr<T>();
  const T* dy = grad_y.data_ptr<T>();
  const Geometry g = geometry_of(p, kVectorWidth<T>, all_aligned({x, dy, grad_x.data_ptr()}));
  const Shape s = shape_of(p, g);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto options = p.x.options().dtype(at::kFloat);
  const auto pointer = [](const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  auto table = at::empty({kBackwardCoefs, p.batch, p.channels}, options);
  const int64_t BC = p.batch * p.channels;
  backward_table<<<ceil_div(BC, kThreads), kThreads, 0, stream>>>(
      s, p.groups, mean.data_ptr<float>(), rstd.data_ptr<float>(), pointer(p.weight),
      pointer(p.bias), pointer(p.shift), table.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto partial = at::empty({kSums, p.batch, g.num_chunks, p.channels}, options);
  with_vector_width<T>(g, [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (g.channels_last) {
      const size_t scratch = column_scratch_bytes<Sums<kSums>>(g);
      sums_channels_last<T, V><<<g.blocks, block_of(g), scratch, stream>>>(
          x, dy, s, table.data_ptr<float>(), act, partial.data_ptr<float>());
    } else {
      sums_channels_first<T, V><<<g.blocks, block_of(g), 0, stream>>>(
          x, dy, s, table.data_ptr<float>(), act, partial.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  auto totals = at::empty({kSums, p.batch, p.channels}, options);
  finalize_backward<<<p.groups, kThreads, 0, stream>>>(
      partial.data_ptr<float>(), s, p.groups, table.data_ptr<float>(), totals.data_ptr<float>(),
      grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(), grad_shift.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  with_vector_width<T>(g, [&](auto width) {
    constexpr int V = decltype(width)::value;
    grad_pass<T, V><<<g.blocks, block_of(g), 0, stream>>>(
        x, dy, grad_x.data_ptr<T>(), s, g.channels_last, table.data_ptr<float>(), act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_cuda(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& shift,
    bool act) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Problem p = make_problem("sr3fast::groupnorm_silu", x, num_groups, weight, bias, shift,
                                 /*params_in_float32=*/false);
  ForwardOutputs out = allocate_forward(p);
  if (x.numel() > 0) {
    SR3FAST_DISPATCH_FLOATING_TYPES(x.scalar_type(), "groupnorm_silu_cuda", [&] {
      forward<scalar_t>(p, eps, act, out.y, out.mean, out.rstd);
    });
  }
  return {out.y, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift, bool act) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Problem p = make_problem("sr3fast::groupnorm_silu_backward", x, num_groups, weight, bias,
                                 shift, /*params_in_float32=*/true);
  const at::Tensor dy = check_backward(p, grad_y, mean, rstd);
  BackwardOutputs g = allocate_backward(p);
  if (x.numel() > 0) {
    SR3FAST_DISPATCH_FLOATING_TYPES(x.scalar_type(), "groupnorm_silu_backward_cuda", [&] {
      backward<scalar_t>(p, dy, mean.contiguous(), rstd.contiguous(), act, g.grad_x, g.grad_weight,
                         g.grad_bias, g.grad_shift);
    });
  }
  return backward_result(x, g, weight, bias, shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CUDA, m) {
  m.impl("groupnorm_silu", &groupnorm_silu_cuda);
  m.impl("groupnorm_silu_backward", &groupnorm_silu_backward_cuda);
}

}  // namespace sr3fast::groupnorm_silu
