#include "common/layout.h"

#include <ATen/ops/empty_like.h>

namespace sr3fast {

std::optional<Layout> layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) {
    return Layout::kChannelsFirst;
  }
  if (x.dim() >= 3 && x.movedim(1, -1).is_contiguous()) {
    return Layout::kChannelsLast;
  }
  return std::nullopt;
}

at::Tensor in_kernel_layout(const at::Tensor& x, Layout& layout) {
  if (auto found = layout_of(x)) {
    layout = *found;
    return x;
  }
  layout = Layout::kChannelsFirst;
  return x.contiguous();
}

at::Tensor in_layout_of(const at::Tensor& t, Layout layout, const at::Tensor& like) {
  if (layout_of(t) == layout) {
    return t;
  }
  // empty_like keeps the exact strides of a dense tensor such as `like`.
  return at::empty_like(like, t.options()).copy_(t);
}

int64_t spatial_size(const at::Tensor& x) {
  int64_t size = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    size *= x.size(d);
  }
  return size;
}

}  // namespace sr3fast
