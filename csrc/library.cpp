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
  // y_prev = m0*x0 + m1*y_t + sigma*z; coefs (B, 5) float32; z = noise, or drawn from generator.
  m.def(
      "reverse_step(Tensor y_t, Tensor eps, Tensor coefs, Tensor? noise=None, float? clip=None, "
      "Generator? generator=None) -> Tensor",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  // The U-Net's convolutions for inference: F.conv2d's maths (zero padding, no dilation, one
  // group); the CPU kernel keeps the weight prepacked for oneDNN and returns channels-last.
  m.def(
      "conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Every step of an SR3 sampler in C++ (csrc/sampler/), the denoiser f(x, y_t, gamma) -> eps
  // being an AOTInductor package (.pt2) at path `denoiser`; coefs (T, B, 5), gammas (T, B) are
  // the tables of sr3fast.diffusion.coefficients. Returns y_0, float32.
  m.def(
      "sample_aoti(str denoiser, Tensor x, Tensor y_T, Tensor coefs, Tensor gammas, "
      "float? clip=None, bool stochastic=True, bool kernel_noise=False, "
      "Generator? generator=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});
}
