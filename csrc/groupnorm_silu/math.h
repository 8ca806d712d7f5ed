// groupnorm_silu's scalar formulas, shared by the CPU and CUDA kernels (host and device code).
//
// Per (sample b, group g): mean mu and rstd r = 1/sqrt(var + eps) of h = x + shift over the
// group's channels and positions (biased variance, float32). The kernels then read per-(b, c)
// float32 coefficient tables. Every pass first forms h - mu = (x + shift) - mu per element, as the
// reference does: folding shift and mu into one affine map of x would lose the digits that
// survive the cancellation when rstd is large (groups of a few, nearly equal values).
//   forward   z = (h - mu)*alpha + beta     alpha = r*w_c, beta = b_c
//             y = act ? z*sigmoid(z) : z
//   backward  xhat = (h - mu)*r, z = xhat*w_c + b_c, dz = act ? dy*silu'(z) : dy
//             sums per (b, c) over positions of dz, dz*xhat and xhat; per (b, g)
//             A = mean over the group of w_c*dz*xhat, B = mean of w_c*dz; then
//             dx = r*w_c*dz + v*xhat + t       v = -r*A, t = -r*B
//             grad_shift = sum of dx over positions, grad_weight = sum of dz*xhat,
//             grad_bias = sum of dz (over samples and positions)
#pragma once

#include <cmath>

#include <c10/macros/Macros.h>

namespace sr3fast::groupnorm_silu {

C10_HOST_DEVICE inline float sigmoid(float z) { return 1.f / (1.f + ::expf(-z)); }

C10_HOST_DEVICE inline float activate(float z, bool act) { return act ? z * sigmoid(z) : z; }

// h - mu, rounded as the reference rounds it.
C10_HOST_DEVICE inline float centered(float x, float shift, float mean) {
  return (x + shift) - mean;
}

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
// Forward: z = (x + shift - mean)*alpha + beta.
enum ForwardCoef { kShift = 0, kMean = 1, kAlpha = 2, kBeta = 3, kForwardCoefs = 4 };
// Backward: kShift and kMean as above, then rstd, weight, bias, and v, t once the sums are known.
// The sum pass reads the first kSumCoefs of them.
enum BackwardCoef { kRstd = 2, kWeight = 3, kBias = 4, kSumCoefs = 5, kV = 5, kT = 6,
                    kBackwardCoefs = 7 };
// Per (b, chunk, c) partial sums of the backward's first pass, float32 (kSums, B, chunks, C).
enum BackwardSum { kSumDz = 0, kSumDzXhat = 1, kSumXhat = 2, kSums = 3 };

}  // namespace sr3fast::groupnorm_silu
