// conv2d on CPU: oneDNN convolutions with the weight reordered into oneDNN's blocked layout once
// and cached here, instead of on every call, and channels-last activations in and out.
//
// A plain at::conv2d on a CPU reorders its weight into the blocked layout each call and converts
// NCHW activations on the way in and out. The cache holds one packed weight per parameter,
// identified by its storage (a weak reference: a freed parameter's entry is dropped, never
// matched by a new tensor at the same address), its offset, shape and version counter (an
// in-place update repacks), and the geometry of the call. Being an op, it also runs inside
// AOTInductor packages and C++ programs, where the cache lives for the process.
//
// Inference only (no autograd kernel): the Python wrapper (sr3fast/ops/extension/conv2d.py) calls
// it only when no gradient is needed, and F.conv2d otherwise.
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

namespace sr3fast::conv2d {
namespace {

using ReorderWeight = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, int64_t, at::OptionalIntArrayRef);
using ConvolutionPointwise =
    at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
               c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

// torch's oneDNN ops, when this build of torch has them (x86 builds do).
struct OneDnn {
  c10::TypedOperatorHandle<ReorderWeight> reorder;
  c10::TypedOperatorHandle<ConvolutionPointwise> convolve;
};

const std::optional<OneDnn>& onednn() {
  static const std::optional<OneDnn> ops = []() -> std::optional<OneDnn> {
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto reorder = dispatcher.findSchema({"mkldnn::_reorder_convolution_weight", ""});
    const auto convolve = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    if (!reorder || !convolve) {
      return std::nullopt;
    }
    return OneDnn{reorder->typed<ReorderWeight>(), convolve->typed<ConvolutionPointwise>()};
  }();
  return ops;
}

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // the parameter's, to tell it is alive
  std::vector<int64_t> built_from;                    // offset, version, shapes, geometry
  at::Tensor packed;
};

class PackedWeights {
 public:
  at::Tensor get(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef input_size) {
    std::vector<int64_t> built_from{weight.storage_offset(),
                                    weight.is_inference() ? -1 : int64_t(weight._version())};
    for (const auto part : {weight.sizes(), weight.strides(), stride, padding, input_size}) {
      built_from.insert(built_from.end(), part.begin(), part.end());
    }
    c10::StorageImpl* storage = weight.storage().unsafeGetStorageImpl();
    const std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(storage);
    if (found != entries_.end() && found->second.storage.lock().get() == storage &&
        found->second.built_from == built_from) {
      return found->second.packed;
    }
    drop_freed();
    const std::vector<int64_t> dilation{1, 1};
    at::Tensor packed = onednn()->reorder.call(weight, padding, stride, dilation, 1, input_size);
    entries_.insert_or_assign(
        storage, Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(weight.storage().getWeakStorageImpl()),
                       std::move(built_from), packed});
    return packed;
  }

 private:
  void drop_freed() {  // packed copies of parameters that no longer exist
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.storage.expired() ? entries_.erase(it) : std::next(it);
    }
  }

  std::mutex mutex_;
  std::map<const c10::StorageImpl*, Entry> entries_;
};

PackedWeights& packed_weights() {
  static PackedWeights cache;
  return cache;
}

at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "sr3fast::conv2d: x must be (B, C, H, W) and "
              "weight (O, C, kh, kw); got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2,
              "sr3fast::conv2d: stride and padding take two values each");
  const bool packable = onednn().has_value() && x.scalar_type() == at::kFloat &&
                        weight.scalar_type() == at::kFloat &&
                        (!bias || bias->scalar_type() == at::kFloat);
  if (!packable) {  // same maths, the plain way
    return at::conv2d(x, weight, bias, stride, padding).contiguous(at::MemoryFormat::ChannelsLast);
  }
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor packed = packed_weights().get(weight, stride, padding, input.sizes());
  const std::vector<int64_t> dilation{1, 1};
  return onednn()->convolve.call(input, packed, bias, padding, stride, dilation, 1, "none",
                                 c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CPU, m) { m.impl("conv2d", &conv2d_cpu); }

}  // namespace sr3fast::conv2d
