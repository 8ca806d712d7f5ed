// The two memory layouts the kernels read an activation tensor (B, C, *spatial) in, and the
// conversions into them. The Python fake kernels (sr3fast/ops/extension/_layout.py) mirror these
// rules exactly, since outputs take the layout of their input.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace sr3fast {

enum class Layout {
  kChannelsFirst,  // contiguous: element (b, c, s) at (b*C + c)*S + s
  kChannelsLast,   // channels innermost (NHWC, NDHWC): element (b, c, s) at (b*S + s)*C + c
};

// The layout x is already in, or nullopt when it is in neither (then the kernels read a copy).
// A tensor in both (C == 1, or a single spatial position) counts as channels-first.
std::optional<Layout> layout_of(const at::Tensor& x);

// x when it is in one of the layouts, else a contiguous copy. `layout` receives which.
at::Tensor in_kernel_layout(const at::Tensor& x, Layout& layout);

// t (same shape as `like`, which is in `layout`) in that layout: t itself when it already is,
// else a copy with like's strides and t's dtype.
at::Tensor in_layout_of(const at::Tensor& t, Layout layout, const at::Tensor& like);

// Positions per (sample, channel): the product of the spatial sizes (1 for a (B, C) tensor).
int64_t spatial_size(const at::Tensor& x);

}  // namespace sr3fast
