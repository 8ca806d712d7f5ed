// Dtype dispatch over the activation dtypes the kernels support.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda with scalar_t = float, at::BFloat16 or at::Half.
#define SR3FAST_DISPATCH_FLOATING_TYPES(dtype, name, ...)         \
  AT_DISPATCH_SWITCH(dtype, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace sr3fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sr3fast
