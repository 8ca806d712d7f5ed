// groupnorm_silu's scalar formulas, shared by the CPU and CUDA kernels (host and device code).
//
// Per (sample b, group g): mean mu and rstd r = 1/sqrt(var + eps) of h = x + shift over the
// group's channels and positions (biased variance, float32). Everything after the statistics is
// an affine map per (b, c), so the kernels read per-(b, c) float32 coefficient tables:
//   forward   z = alpha*x + beta        alpha = r*w_c, beta = b_c + (shift_bc - mu)*alpha
//             y = act ? z*sigmoid(z) : z
//   backward  xhat = p*x + q            p = r, q = (shift_bc - mu)*r
//             dz = act ? dy*silu'(z) : dy
//             per (b, c) sums of dz, dz*xhat and xhat over positions, then per (b, g)
//             A = mean over the group of w_c*dz*xhat, B = mean of w_c*dz, and
//             dx = u*dz + v*x + t       u = r*w_c, v = -r*A*p, t = -r*(A*q + B)
#pragma once

#include <cmath>

#include <c10/macros/Macros.h>

namespace sr3fast::groupnorm_silu {

C10_HOST_DEVICE inline float sigmoid(float z) { return 1.f / (1.f + ::expf(-z)); }

C10_HOST_DEVICE inline float activate(float z, bool act) { return act ? z * sigmoid(z) : z; }

// d/dz of activate(z), times dy.
C10_HOST_DEVICE inline float activation_grad(float z, float dy, bool act) {
  if (!act) {
    return dy;
  }
  const float s = sigmoid(z);
  return dy * s * (1.f + z * (1.f - s));
}

// Count, mean and sum of squared deviations of a set of samples (Welford / Chan et al.).
struct Moments {
  float count = 0.f, mean = 0.f, m2 = 0.f;

  C10_HOST_DEVICE void add(float value) {
    count += 1.f;
    const float delta = value - mean;
    mean += delta / count;
    m2 += delta * (value - mean);
  }

  // Merges the moments of a disjoint set of samples (Chan's parallel formula).
  C10_HOST_DEVICE void merge(const Moments& other) {
    const float total = count + other.count;
    if (total == 0.f) {
      return;
    }
    const float delta = other.mean - mean;
    const float weight = other.count / total;
    mean += delta * weight;
    m2 += other.m2 + delta * delta * count * weight;
    count = total;
  }
};

// Coefficient tables are float32 (K, B, C): coefficient k of (b, c) at [(k*B + b)*C + c].
enum ForwardCoef { kAlpha = 0, kBeta = 1, kForwardCoefs = 2 };
// The backward's sum pass reads (alpha, beta, p, q), its gradient pass (alpha, beta, u, v, t).
enum SumPassCoef { kP = 2, kQ = 3, kSumPassCoefs = 4 };
enum GradPassCoef { kU = 2, kV = 3, kT = 4, kGradPassCoefs = 5 };
// Per (b, chunk, c) partial sums of the backward's first pass, float32 (kSums, B, chunks, C).
enum BackwardSum { kSumDz = 0, kSumDzXhat = 1, kSumXhat = 2, kSums = 3 };

}  // namespace sr3fast::groupnorm_silu
