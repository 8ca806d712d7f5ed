// reverse_step's scalar update, shared by the CPU and CUDA kernels (host and device code) of
// both ops, sr3fast::reverse_step and sr3fast::reverse_step_multistep:
//   x0 = a*y - b*eps, clamped to [-clip, clip] when the sampler clips
//   y_prev = m0*x0 + m1*y + sigma*z                        (single step)
//   y_prev = ((m0*x0 + m1*y) + m2*x0_prev) + sigma*z       (multistep, one history: 2M)
//   y_prev = (((m0*x0 + m1*y) + m2*x0_prev) + m3*x0_prev2) + sigma*z   (two histories: 3M)
// float32, every operation rounded on its own in the reference's order: on the device through the
// _rn intrinsics, which nvcc never contracts into FMAs (even with --use_fast_math); on the host
// as plain operations, which setup.py's -ffp-contract=off keeps unfused. Both devices therefore
// reproduce sr3fast.reference bit for bit, and the CPU tests of this header cover the CUDA
// kernel's arithmetic.
#pragma once

#include <c10/macros/Macros.h>

#include "reverse_step/problem.h"

namespace sr3fast::reverse_step {

C10_HOST_DEVICE inline float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// torch.clamp(x, -clip, clip), NaN included: a NaN x0 (a diverged model) stays NaN. fminf/fmaxf
// (IEEE minNum/maxNum) return the other operand when one is NaN and so would make it -clip.
// Both comparisons are false for NaN, which falls through to x.
C10_HOST_DEVICE inline float clamp(float x, float clip) {
  return x < -clip ? -clip : (x > clip ? clip : x);
}

// The x0 estimate of one element: a*y - b*eps, clamped when the sampler clips. k points at its
// sample's coefficients (Coef order).
C10_HOST_DEVICE inline float x0_estimate(float y, float eps, const float* k, bool clip_enabled,
                                         float clip) {
  const float x0 = sub(mul(k[kA], y), mul(k[kB], eps));
  return clip_enabled ? clamp(x0, clip) : x0;
}

// y_prev from the x0 estimate, with kHistory (0, 1 or 2) past estimates, left to right:
//   (m0*x0 + m1*y) [+ m2*x0_prev [+ m3*x0_prev2]] + sigma*z
// The histories a depth does not reach are not read (pass 0).
template <int kHistory>
C10_HOST_DEVICE inline float update(float x0, float y, float z, float x0_prev, float x0_prev2,
                                    const float* k) {
  static_assert(kHistory >= 0 && kHistory <= 2, "reverse_step carries at most two histories");
  float sum = add(mul(k[kM0], x0), mul(k[kM1], y));
  if constexpr (kHistory >= 1) {
    sum = add(sum, mul(k[kM2], x0_prev));
  }
  if constexpr (kHistory == 2) {
    sum = add(sum, mul(k[kM3], x0_prev2));
  }
  return add(sum, mul(k[kSigma], z));
}

}  // namespace sr3fast::reverse_step
