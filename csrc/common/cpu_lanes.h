// Lanes<T>: one Vectorized<T> worth of elements of T held as float vectors, so CPU kernels do
// float32 maths whatever the storage type (float32: one vector; bfloat16/float16: two).
#pragma once

#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace sr3fast::cpu {

using fVec = at::vec::Vectorized<float>;

template <typename T>
struct Lanes {
  static constexpr int64_t kSize = at::vec::Vectorized<T>::size();
  static constexpr int kVecs = kSize / fVec::size();
  fVec v[kVecs];

  static Lanes load(const T* data) {
    Lanes lanes;
    if constexpr (kVecs == 1) {
      lanes.v[0] = fVec::loadu(data);
    } else {
      const auto packed = at::vec::Vectorized<T>::loadu(data);
      std::tie(lanes.v[0], lanes.v[1]) = at::vec::convert_to_float<T>(packed);
    }
    return lanes;
  }

  // kSize consecutive floats (a per-channel coefficient table) as lanes.
  static Lanes load_float(const float* data) {
    Lanes lanes;
    for (int i = 0; i < kVecs; ++i) {
      lanes.v[i] = fVec::loadu(data + i * fVec::size());
    }
    return lanes;
  }

  // kSize elements of U, which is T or float.
  template <typename U>
  static Lanes load_from(const U* data) {
    static_assert(std::is_same_v<U, T> || std::is_same_v<U, float>);
    if constexpr (std::is_same_v<U, T>) {
      return load(data);
    } else {
      return load_float(data);
    }
  }

  void store(T* data) const {
    if constexpr (kVecs == 1) {
      v[0].store(data);
    } else {
      at::vec::convert_from_float<T>(v[0], v[1]).store(data);
    }
  }

  void store_float(float* data) const {
    for (int i = 0; i < kVecs; ++i) {
      v[i].store(data + i * fVec::size());
    }
  }
};

// The sum of a vector's elements.
inline float horizontal_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

// z * sigmoid(z), vectorised like ATen's SiLU kernel.
inline fVec silu(const fVec& z) { return z / (fVec(1.f) + z.neg().exp_u20()); }

}  // namespace sr3fast::cpu
