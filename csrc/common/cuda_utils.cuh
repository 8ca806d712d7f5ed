// Small CUDA building blocks shared by the kernels: packed vector loads, warp and block reductions
// of small per-thread states, and launch-shape helpers.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace sr3fast::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// N consecutive elements of T moved as one aligned access (N*sizeof(T) = 16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVectorWidth = 16 / sizeof(T);

inline bool is_aligned(const void* pointer, int bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0;
}

inline int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

// Reduces `state` over the warp with state.merge(other); lane 0 holds the result.
// State needs a shuffle_down(state, offset) overload next to its definition.
template <typename State>
__device__ State warp_reduce(State state) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state.merge(shuffle_down(state, offset));
  }
  return state;
}

// Reduces `state` over a 1-D block (blockDim.x a multiple of 32, at most 1024); thread 0 holds
// the result. `scratch` is shared memory for 32 states; a default State is the empty one.
template <typename State>
__device__ State block_reduce(State state, State* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  state = warp_reduce(state);
  if (lane == 0) {
    scratch[warp] = state;
  }
  __syncthreads();
  if (warp == 0) {
    state = lane < blockDim.x / kWarpSize ? scratch[lane] : State();
    state = warp_reduce(state);
  }
  return state;
}

// N float sums reduced together.
template <int N>
struct Sums {
  float v[N] = {};

  __device__ void merge(const Sums& other) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] += other.v[i];
    }
  }
};

template <int N>
__device__ Sums<N> shuffle_down(const Sums<N>& sums, int offset) {
  Sums<N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    out.v[i] = __shfl_down_sync(kFullMask, sums.v[i], offset);
  }
  return out;
}

}  // namespace sr3fast::cuda
