// The schemas of every sr3fast op, in one place. Kernels register per device in
// <op>/cpu.cpp and <op>/cuda.cu (TORCH_LIBRARY_IMPL); fake (meta) kernels and autograd are
// registered from Python, in sr3fast/ops/extension/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(sr3fast, m) {
  // y = SiLU(GroupNorm(x + shift)) (plain GroupNorm when act=false), plus the float32
  // per-(sample, group) mean and rstd = 1/sqrt(var + eps) that the backward needs.
  m.def(
      "groupnorm_silu(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
      "float eps=1e-05, Tensor? shift=None, bool act=True) -> (Tensor y, Tensor mean, Tensor rstd)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of groupnorm_silu. grad_weight and grad_bias are always returned (as the gradients
  // with respect to a weight of ones / bias of zeros when those were None), in the dtype of the
  // parameter (x's when None); grad_shift likewise, shape (B, C).
  m.def(
      "groupnorm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, int num_groups, "
      "Tensor? weight, Tensor? bias, Tensor? shift, bool act) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_shift)",
      {at::Tag::pt2_compliant_tag});
  // One reverse-diffusion update: x0 = a*y_t - b*eps, optional clamp to [-clip, clip],
  // y_prev = m0*x0 + m1*y_t + sigma*z; coefs (B, 5), (B, 6) or (B, 7) float32, columns
  // (a, b, m0, m1, sigma[, m2[, m3]]) of which m2 and m3 are not read; z = noise, or drawn from
  // generator.
  m.def(
      "reverse_step(Tensor y_t, Tensor eps, Tensor coefs, Tensor? noise=None, float? clip=None, "
      "Generator? generator=None) -> Tensor",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  // The multistep update: reverse_step plus the history terms, past steps' x0 estimates.
  //   DPM-Solver++ 2M and kin, x0_prev only:  y_prev = ((m0*x0 + m1*y_t) + m2*x0_prev) + sigma*z
  //     coefs (B, 6) or (B, 7) float32 (a, b, m0, m1, sigma, m2[, m3]), m3 not read;
  //   3M, with x0_prev2 (the x0 of two steps back):
  //     y_prev = (((m0*x0 + m1*y_t) + m2*x0_prev) + m3*x0_prev2) + sigma*z, coefs (B, 7).
  // x0_prev like y_t, any float dtype; x0_prev2 like y_t in x0_prev's dtype. Returns y_prev and
  // this step's (clamped) x0 estimate, both in y_t's dtype and layout (x0 is the next x0_prev,
  // x0_prev the next x0_prev2). z is drawn as reverse_step draws it: the same z for the same
  // generator state. x0_prev2 comes last so that callers from before it keep working.
  m.def(
      "reverse_step_multistep(Tensor y_t, Tensor eps, Tensor coefs, Tensor x0_prev, "
      "Tensor? noise=None, float? clip=None, Generator? generator=None, "
      "Tensor? x0_prev2=None) -> (Tensor y_prev, Tensor x0)",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  // The U-Net's convolutions for inference: F.conv2d's maths (zero padding, no dilation, one
  // group); the CPU kernel keeps the weight prepacked for oneDNN and returns channels-last.
  m.def(
      "conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Every step of an SR3 sampler in C++ (csrc/sampler/), the denoiser f(x, y_t, gamma) -> eps
  // being an AOTInductor package (.pt2) at path `denoiser`; coefs (T, B, 7) (or the older
  // (T, B, 5|6) where the history does not read the missing columns), gammas (T, B) are the
  // tables of sr3fast.diffusion.coefficients; history: how many past x0 estimates each step
  // carries (0 single step; 1 reverse_step_multistep with x0_prev, DPM-Solver++ 2M; 2 also
  // x0_prev2, 3M). Returns y_0, float32.
  m.def(
      "sample_aoti(str denoiser, Tensor x, Tensor y_T, Tensor coefs, Tensor gammas, "
      "float? clip=None, bool stochastic=True, bool kernel_noise=False, "
      "Generator? generator=None, int history=0) -> Tensor",
      {at::Tag::nondeterministic_seeded});
}
