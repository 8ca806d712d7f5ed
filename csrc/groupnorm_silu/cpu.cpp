// groupnorm_silu on CPU: vectorised (at::vec) and parallel (at::parallel_for), float32 maths.
//
// Forward: moments per (b, c, chunk) -> per-(b, g) mean/rstd and the forward table ->
// y = act(z). Backward: the backward table -> per-(b, c, chunk) sums -> per-(b, g) A, B (the
// table's v, t) -> dx. math.h has the formulas and tables. Both layouts are read in place:
//   channels-first (B, C, S): a task is a run of positions of one (b, c);
//   channels-last  (B, S, C): a task is a block of rows (positions) of all C channels of one b.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/cpu_lanes.h"
#include "common/dispatch.h"
#include "groupnorm_silu/math.h"
#include "groupnorm_silu/problem.h"

namespace sr3fast::groupnorm_silu {
namespace {

using cpu::fVec;
using cpu::Lanes;

// A task touches about this many elements (32 KiB of float32: it stays in L1/L2 while the task
// makes its two passes). The split depends only on the shape, never on the thread count, so
// results are reproducible across machines.
constexpr int64_t kTaskElements = 8192;
// Fewer elements than this in total run on one thread (ATen's GRAIN_SIZE).
constexpr int64_t kParallelElements = 32768;

struct Tiling {
  int64_t chunk;       // positions per task
  int64_t num_chunks;  // tasks per (b, c) when channels-first, per b when channels-last
};

Tiling tiling_of(const Problem& p) {
  const int64_t per_task = p.layout == Layout::kChannelsFirst
                               ? kTaskElements
                               : std::max<int64_t>(1, kTaskElements / p.channels);
  const int64_t chunk = std::min(per_task, std::max<int64_t>(1, p.spatial));
  return {chunk, ceil_div(p.spatial, chunk)};
}

// One task: positions [k*chunk, k*chunk + count) of sample b, and channel c when channels-first.
struct Task {
  int64_t b, c, k, count;
  int64_t offset;  // of its first element in x
};

template <typename F>
void parallel_tasks(const Problem& p, const Tiling& tiling, const F& run) {
  const bool first = p.layout == Layout::kChannelsFirst;
  const int64_t per_sample = first ? p.channels * tiling.num_chunks : tiling.num_chunks;
  const int64_t task_elements = tiling.chunk * (first ? 1 : p.channels);
  const int64_t grain = std::max<int64_t>(1, kParallelElements / task_elements);
  at::parallel_for(0, p.batch * per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      Task task;
      task.b = index / per_sample;
      const int64_t rest = index % per_sample;
      task.c = first ? rest / tiling.num_chunks : 0;
      task.k = rest % tiling.num_chunks;
      const int64_t start = task.k * tiling.chunk;
      task.count = std::min(tiling.chunk, p.spatial - start);
      task.offset = first ? (task.b * p.channels + task.c) * p.spatial + start
                          : (task.b * p.spatial + start) * p.channels;
      run(task);
    }
  });
}

// Index of (b, k, c) in a per-chunk partial buffer (components, B, num_chunks, C).
int64_t partial_index(const Problem& p, const Tiling& tiling, int64_t b, int64_t k, int64_t c) {
  return (b * tiling.num_chunks + k) * p.channels + c;
}

// The float32 parameters (weight, bias, shift), null when absent.
struct Params {
  const float *weight, *bias, *shift;
  explicit Params(const Problem& p)
      : weight(data_or_null(p.weight)), bias(data_or_null(p.bias)), shift(data_or_null(p.shift)) {}
  static const float* data_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  }
};

inline float param_or(const float* param, int64_t index, float fallback) {
  return param != nullptr ? param[index] : fallback;
}

// ---- forward -----------------------------------------------------------------------------

// Sum over n contiguous values of f(value) (f maps a float vector), with four independent
// accumulators so the additions overlap; values past the last whole vector are left to the caller.
template <typename T, typename F>
float vector_sum(const T* x, int64_t n, const F& f) {
  using L = Lanes<T>;
  constexpr int kUnroll = 4;
  fVec acc[kUnroll] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
  int64_t i = 0;
  for (; i + kUnroll * L::kSize <= n; i += kUnroll * L::kSize) {
    for (int u = 0; u < kUnroll; ++u) {
      const L value = L::load(x + i + u * L::kSize);
      for (int j = 0; j < L::kVecs; ++j) {
        acc[u] = acc[u] + f(value.v[j]);
      }
    }
  }
  for (; i + L::kSize <= n; i += L::kSize) {
    const L value = L::load(x + i);
    for (int j = 0; j < L::kVecs; ++j) {
      acc[0] = acc[0] + f(value.v[j]);
    }
  }
  return cpu::horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Moments of n contiguous values, two passes over data that a task keeps in L1/L2: the sum,
// then the squared deviations from the mean (exact to rounding, unlike sum-of-squares).
template <typename T>
Moments run_moments(const T* x, int64_t n) {
  const int64_t vector_end = n - n % Lanes<T>::kSize;
  float total = vector_sum(x, n, [](const fVec& v) { return v; });
  for (int64_t i = vector_end; i < n; ++i) {
    total += static_cast<float>(x[i]);
  }
  const float mean = total / static_cast<float>(n);
  const fVec centre(mean);
  float m2 = vector_sum(x, n, [&](const fVec& v) { return (v - centre) * (v - centre); });
  for (int64_t i = vector_end; i < n; ++i) {
    const float deviation = static_cast<float>(x[i]) - mean;
    m2 += deviation * deviation;
  }
  return {static_cast<float>(n), mean, m2};
}

// Moments per channel of `rows` rows of C values, the same two passes, a block of kBlock
// channels at a time with its sums in registers: mean and m2 (C,) are written (every
// channel's count is `rows`).
template <typename T>
void rows_moments(const T* x, int64_t rows, int64_t channels, float* mean, float* m2) {
  using L = Lanes<T>;
  constexpr int kBlockLanes = std::max(1, 4 / L::kVecs);  // four float vectors
  constexpr int64_t kBlock = kBlockLanes * L::kSize;
  const float inv_rows = 1.f / static_cast<float>(rows);
  int64_t c = 0;
  // Runs both passes over channels [c, c + lanes * kSize), lanes <= kBlockLanes.
  const auto block = [&](int lanes) {
    fVec sum[kBlockLanes][L::kVecs], squares[kBlockLanes][L::kVecs], centre[kBlockLanes][L::kVecs];
    for (int l = 0; l < lanes; ++l) {
      for (int j = 0; j < L::kVecs; ++j) {
        sum[l][j] = fVec(0.f);
        squares[l][j] = fVec(0.f);
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      for (int l = 0; l < lanes; ++l) {
        const L value = L::load(x + row * channels + c + l * L::kSize);
        for (int j = 0; j < L::kVecs; ++j) {
          sum[l][j] = sum[l][j] + value.v[j];
        }
      }
    }
    for (int l = 0; l < lanes; ++l) {
      for (int j = 0; j < L::kVecs; ++j) {
        centre[l][j] = sum[l][j] * fVec(inv_rows);
        centre[l][j].store(mean + c + l * L::kSize + j * fVec::size());
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      for (int l = 0; l < lanes; ++l) {
        const L value = L::load(x + row * channels + c + l * L::kSize);
        for (int j = 0; j < L::kVecs; ++j) {
          const fVec deviation = value.v[j] - centre[l][j];
          squares[l][j] = at::vec::fmadd(deviation, deviation, squares[l][j]);
        }
      }
    }
    for (int l = 0; l < lanes; ++l) {
      for (int j = 0; j < L::kVecs; ++j) {
        squares[l][j].store(m2 + c + l * L::kSize + j * fVec::size());
      }
    }
  };
  for (; c + kBlock <= channels; c += kBlock) {
    block(kBlockLanes);
  }
  for (; c + L::kSize <= channels; c += L::kSize) {
    block(1);
  }
  for (; c < channels; ++c) {  // channels past the last whole vector
    float sum = 0.f;
    for (int64_t row = 0; row < rows; ++row) {
      sum += static_cast<float>(x[row * channels + c]);
    }
    mean[c] = sum * inv_rows;
    float squares = 0.f;
    for (int64_t row = 0; row < rows; ++row) {
      const float deviation = static_cast<float>(x[row * channels + c]) - mean[c];
      squares += deviation * deviation;
    }
    m2[c] = squares;
  }
}

// y = act((x + shift - mean)*alpha + beta) over n contiguous values of one channel;
// k: the channel's kForwardCoefs coefficients.
template <typename T>
void run_forward(const T* x, T* y, int64_t n, const float* k, bool act) {
  using L = Lanes<T>;
  const fVec shift(k[kShift]), mean(k[kMean]), alpha(k[kAlpha]), beta(k[kBeta]);
  const int64_t vector_end = n - n % L::kSize;
  for (int64_t i = 0; i < vector_end; i += L::kSize) {
    L value = L::load(x + i);
    for (int j = 0; j < L::kVecs; ++j) {
      const fVec z = at::vec::fmadd((value.v[j] + shift) - mean, alpha, beta);
      value.v[j] = act ? cpu::silu(z) : z;
    }
    value.store(y + i);
  }
  for (int64_t i = vector_end; i < n; ++i) {
    const float h = centered(static_cast<float>(x[i]), k[kShift], k[kMean]);
    y[i] = static_cast<T>(activate(h * k[kAlpha] + k[kBeta], act));
  }
}

// Per-channel coefficients of a channels-last row: coef[k] points at coefficient k of channel 0.
template <int K>
struct RowCoefs {
  const float* coef[K];
  RowCoefs(const float* table, int64_t stride) {
    for (int k = 0; k < K; ++k) {
      coef[k] = table + k * stride;
    }
  }
  template <typename L>
  L load(int k, int64_t c) const { return L::load_float(coef[k] + c); }
  float at(int k, int64_t c) const { return coef[k][c]; }
};

// The same over `rows` rows of C values; table: the forward table at sample b.
template <typename T>
void rows_forward(const T* x, T* y, int64_t rows, int64_t channels, const float* table,
                  int64_t table_stride, bool act) {
  using L = Lanes<T>;
  const RowCoefs<kForwardCoefs> k(table, table_stride);
  const int64_t vector_end = channels - channels % L::kSize;
  for (int64_t row = 0; row < rows; ++row) {
    const T* in = x + row * channels;
    T* out = y + row * channels;
    for (int64_t c = 0; c < vector_end; c += L::kSize) {
      L value = L::load(in + c);
      const L shift = k.load<L>(kShift, c), mean = k.load<L>(kMean, c);
      const L alpha = k.load<L>(kAlpha, c), beta = k.load<L>(kBeta, c);
      for (int j = 0; j < L::kVecs; ++j) {
        const fVec z = at::vec::fmadd((value.v[j] + shift.v[j]) - mean.v[j], alpha.v[j], beta.v[j]);
        value.v[j] = act ? cpu::silu(z) : z;
      }
      value.store(out + c);
    }
    for (int64_t c = vector_end; c < channels; ++c) {
      const float h = centered(static_cast<float>(in[c]), k.at(kShift, c), k.at(kMean, c));
      out[c] = static_cast<T>(activate(h * k.at(kAlpha, c) + k.at(kBeta, c), act));
    }
  }
}

// Per-(b, g) statistics from the per-chunk moments; fills mean, rstd (B, G) and the forward table.
// The chunks merge in closed form (mean of means, then m2 = sum of m2 + n*(chunk mean - mean)^2):
// two passes over the partials instead of a chain of pairwise merges.
void finalize_forward(const Problem& p, const Tiling& tiling, const float* partial, double eps,
                      float* mean_out, float* rstd_out, float* table) {
  const int64_t D = p.channels_per_group(), C = p.channels, BC = p.batch * C;
  const int64_t components = p.batch * tiling.num_chunks * C;
  const float* count = partial;
  const float* chunk_mean = partial + components;
  const float* chunk_m2 = partial + 2 * components;
  const Params params(p);
  at::parallel_for(0, p.batch * p.groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups, c0 = (bg % p.groups) * D;
      const auto shift = [&](int64_t c) { return param_or(params.shift, b * C + c, 0.f); };
      float total = 0.f, weighted = 0.f;
      for (int64_t k = 0; k < tiling.num_chunks; ++k) {
        const int64_t i = partial_index(p, tiling, b, k, 0);
        for (int64_t c = c0; c < c0 + D; ++c) {
          total += count[i + c];
          weighted += count[i + c] * (chunk_mean[i + c] + shift(c));
        }
      }
      const float mean = weighted / total;
      float m2 = 0.f;
      for (int64_t k = 0; k < tiling.num_chunks; ++k) {
        const int64_t i = partial_index(p, tiling, b, k, 0);
        for (int64_t c = c0; c < c0 + D; ++c) {
          const float offset = chunk_mean[i + c] + shift(c) - mean;
          m2 += chunk_m2[i + c] + count[i + c] * offset * offset;
        }
      }
      const float rstd = 1.f / std::sqrt(std::max(m2 / total, 0.f) + static_cast<float>(eps));
      mean_out[bg] = mean;
      rstd_out[bg] = rstd;
      for (int64_t c = c0; c < c0 + D; ++c) {
        const int64_t bc = b * C + c;
        table[kShift * BC + bc] = shift(c);
        table[kMean * BC + bc] = mean;
        table[kAlpha * BC + bc] = rstd * param_or(params.weight, c, 1.f);
        table[kBeta * BC + bc] = param_or(params.bias, c, 0.f);
      }
    }
  });
}

template <typename T>
void forward(const Problem& p, double eps, bool act, at::Tensor& y, at::Tensor& mean,
             at::Tensor& rstd) {
  const Tiling tiling = tiling_of(p);
  const int64_t C = p.channels, BC = p.batch * C;
  // (count, mean, m2) per (b, chunk, c)
  auto partial = at::empty({3, p.batch, tiling.num_chunks, C}, p.x.options().dtype(at::kFloat));
  const int64_t components = partial.numel() / 3;
  float* part = partial.data_ptr<float>();
  const T* x = p.x.data_ptr<T>();
  parallel_tasks(p, tiling, [&](const Task& t) {
    const int64_t i = partial_index(p, tiling, t.b, t.k, t.c);
    if (p.layout == Layout::kChannelsFirst) {
      const Moments m = run_moments(x + t.offset, t.count);
      part[i] = m.count;
      part[components + i] = m.mean;
      part[2 * components + i] = m.m2;
    } else {
      std::fill_n(part + i, C, static_cast<float>(t.count));
      rows_moments(x + t.offset, t.count, C, part + components + i, part + 2 * components + i);
    }
  });

  auto table = at::empty({kForwardCoefs, p.batch, C}, partial.options());
  const float* coef = table.data_ptr<float>();
  finalize_forward(p, tiling, part, eps, mean.data_ptr<float>(), rstd.data_ptr<float>(),
                   table.data_ptr<float>());

  T* out = y.data_ptr<T>();
  parallel_tasks(p, tiling, [&](const Task& t) {
    if (p.layout == Layout::kChannelsFirst) {
      float k[kForwardCoefs];
      for (int j = 0; j < kForwardCoefs; ++j) {
        k[j] = coef[j * BC + t.b * C + t.c];
      }
      run_forward(x + t.offset, out + t.offset, t.count, k, act);
    } else {
      rows_forward(x + t.offset, out + t.offset, t.count, C, coef + t.b * C, BC, act);
    }
  });
}

// ---- backward ----------------------------------------------------------------------------

// A channel's backward coefficients as vectors: broadcast (one channel) or per lane (a row).
struct GradCoefs {
  fVec shift, mean, rstd, weight, bias, v, t;
};

GradCoefs broadcast(const float* k, bool with_vt) {
  return {fVec(k[kShift]), fVec(k[kMean]), fVec(k[kRstd]), fVec(k[kWeight]), fVec(k[kBias]),
          fVec(with_vt ? k[kV] : 0.f), fVec(with_vt ? k[kT] : 0.f)};
}

// dz (the gradient reaching the pre-activation z) and xhat, for a vector of x and dy.
struct GradTerms {
  fVec dz, xhat;
};

inline fVec xhat_of(const fVec& x, const GradCoefs& k) { return ((x + k.shift) - k.mean) * k.rstd; }

inline GradTerms grad_terms(const fVec& x, const fVec& dy, const GradCoefs& k, bool act) {
  const fVec xhat = xhat_of(x, k);
  if (!act) {
    return {dy, xhat};
  }
  const fVec z = at::vec::fmadd(xhat, k.weight, k.bias);
  const fVec one(1.f);
  const fVec s = one / (one + z.neg().exp_u20());
  return {dy * s * at::vec::fmadd(z, one - s, one), xhat};
}

// The same for one value; k: the channel's kBackwardCoefs coefficients, `stride` apart.
inline std::pair<float, float> grad_terms(float x, float dy, const float* k, int64_t stride,
                                          bool act) {
  const float xhat = centered(x, k[kShift * stride], k[kMean * stride]) * k[kRstd * stride];
  const float z = xhat * k[kWeight * stride] + k[kBias * stride];
  return {activation_grad(z, dy, act), xhat};
}

// Sums of dz, dz*xhat and xhat over n contiguous values of one channel into sums[kSums].
// dz_cache (n floats, or null): receives dz, so the gradient pass need not recompute the sigmoid.
template <typename T>
void run_sums(const T* x, const T* dy, int64_t n, const float* k, bool act, float* sums,
              float* dz_cache) {
  using L = Lanes<T>;
  const GradCoefs coefs = broadcast(k, /*with_vt=*/false);
  fVec dz_sum(0.f), dzx_sum(0.f), x_sum(0.f);
  const int64_t vector_end = n - n % L::kSize;
  for (int64_t i = 0; i < vector_end; i += L::kSize) {
    const L value = L::load(x + i), grad = L::load(dy + i);
    for (int j = 0; j < L::kVecs; ++j) {
      const GradTerms g = grad_terms(value.v[j], grad.v[j], coefs, act);
      if (dz_cache != nullptr) {
        g.dz.store(dz_cache + i + j * fVec::size());
      }
      dz_sum = dz_sum + g.dz;
      dzx_sum = at::vec::fmadd(g.dz, g.xhat, dzx_sum);
      x_sum = x_sum + g.xhat;
    }
  }
  sums[kSumDz] = cpu::horizontal_sum(dz_sum);
  sums[kSumDzXhat] = cpu::horizontal_sum(dzx_sum);
  sums[kSumXhat] = cpu::horizontal_sum(x_sum);
  for (int64_t i = vector_end; i < n; ++i) {
    const auto [dz, xhat] =
        grad_terms(static_cast<float>(x[i]), static_cast<float>(dy[i]), k, 1, act);
    if (dz_cache != nullptr) {
      dz_cache[i] = dz;
    }
    sums[kSumDz] += dz;
    sums[kSumDzXhat] += dz * xhat;
    sums[kSumXhat] += xhat;
  }
}

// The same sums per channel over `rows` rows of C values. table: the backward table at sample b;
// sums: kSums arrays of C floats, `stride` apart, starting at zero; dz_cache as above.
template <typename T>
void rows_sums(const T* x, const T* dy, int64_t rows, int64_t channels, const float* table,
               int64_t table_stride, bool act, float* sums, int64_t stride, float* dz_cache) {
  using L = Lanes<T>;
  const RowCoefs<kBackwardCoefs> k(table, table_stride);
  const int64_t vector_end = channels - channels % L::kSize;
  float* dz_sum = sums + kSumDz * stride;
  float* dzx_sum = sums + kSumDzXhat * stride;
  float* x_sum = sums + kSumXhat * stride;
  for (int64_t row = 0; row < rows; ++row) {
    const T* in = x + row * channels;
    const T* grad_in = dy + row * channels;
    for (int64_t c = 0; c < vector_end; c += L::kSize) {
      const L value = L::load(in + c), grad = L::load(grad_in + c);
      const L shift = k.load<L>(kShift, c), mean = k.load<L>(kMean, c);
      const L rstd = k.load<L>(kRstd, c), weight = k.load<L>(kWeight, c);
      const L bias = k.load<L>(kBias, c);
      L s_dz = L::load_float(dz_sum + c), s_dzx = L::load_float(dzx_sum + c);
      L s_x = L::load_float(x_sum + c);
      for (int j = 0; j < L::kVecs; ++j) {
        const GradCoefs coefs{shift.v[j], mean.v[j], rstd.v[j], weight.v[j], bias.v[j],
                              fVec(0.f), fVec(0.f)};
        const GradTerms g = grad_terms(value.v[j], grad.v[j], coefs, act);
        if (dz_cache != nullptr) {
          g.dz.store(dz_cache + row * channels + c + j * fVec::size());
        }
        s_dz.v[j] = s_dz.v[j] + g.dz;
        s_dzx.v[j] = at::vec::fmadd(g.dz, g.xhat, s_dzx.v[j]);
        s_x.v[j] = s_x.v[j] + g.xhat;
      }
      s_dz.store_float(dz_sum + c);
      s_dzx.store_float(dzx_sum + c);
      s_x.store_float(x_sum + c);
    }
    for (int64_t c = vector_end; c < channels; ++c) {
      const auto [dz, xhat] = grad_terms(static_cast<float>(in[c]), static_cast<float>(grad_in[c]),
                                         table + c, table_stride, act);
      if (dz_cache != nullptr) {
        dz_cache[row * channels + c] = dz;
      }
      dz_sum[c] += dz;
      dzx_sum[c] += dz * xhat;
      x_sum[c] += xhat;
    }
  }
}

// dx = rstd*w*dz + v*xhat + t over n contiguous values; k: the channel's coefficients;
// dz_cache: dz from the sum pass (it may be dx itself, read before written), or null.
template <typename T>
void run_grad(const T* x, const T* dy, T* dx, int64_t n, const float* k, bool act,
              const float* dz_cache) {
  using L = Lanes<T>;
  const GradCoefs coefs = broadcast(k, /*with_vt=*/true);
  const fVec u = coefs.rstd * coefs.weight;
  const int64_t vector_end = n - n % L::kSize;
  for (int64_t i = 0; i < vector_end; i += L::kSize) {
    const L value = L::load(x + i), grad = L::load(dy + i);
    L out;
    for (int j = 0; j < L::kVecs; ++j) {
      const GradTerms g =
          dz_cache != nullptr
              ? GradTerms{fVec::loadu(dz_cache + i + j * fVec::size()), xhat_of(value.v[j], coefs)}
              : grad_terms(value.v[j], grad.v[j], coefs, act);
      out.v[j] = at::vec::fmadd(u, g.dz, at::vec::fmadd(coefs.v, g.xhat, coefs.t));
    }
    out.store(dx + i);
  }
  for (int64_t i = vector_end; i < n; ++i) {
    auto [dz, xhat] = grad_terms(static_cast<float>(x[i]), static_cast<float>(dy[i]), k, 1, act);
    dz = dz_cache != nullptr ? dz_cache[i] : dz;
    dx[i] = static_cast<T>(k[kRstd] * k[kWeight] * dz + k[kV] * xhat + k[kT]);
  }
}

// The same over `rows` rows of C values; table: the backward table at sample b.
template <typename T>
void rows_grad(const T* x, const T* dy, T* dx, int64_t rows, int64_t channels, const float* table,
               int64_t table_stride, bool act, const float* dz_cache) {
  using L = Lanes<T>;
  const RowCoefs<kBackwardCoefs> k(table, table_stride);
  const int64_t vector_end = channels - channels % L::kSize;
  for (int64_t row = 0; row < rows; ++row) {
    const T* in = x + row * channels;
    const T* grad_in = dy + row * channels;
    T* out = dx + row * channels;
    for (int64_t c = 0; c < vector_end; c += L::kSize) {
      const L value = L::load(in + c), grad = L::load(grad_in + c);
      const L shift = k.load<L>(kShift, c), mean = k.load<L>(kMean, c);
      const L rstd = k.load<L>(kRstd, c), weight = k.load<L>(kWeight, c);
      const L bias = k.load<L>(kBias, c), v = k.load<L>(kV, c), t = k.load<L>(kT, c);
      L result;
      for (int j = 0; j < L::kVecs; ++j) {
        const GradCoefs coefs{shift.v[j], mean.v[j], rstd.v[j], weight.v[j], bias.v[j], v.v[j],
                              t.v[j]};
        const GradTerms g =
            dz_cache != nullptr
                ? GradTerms{fVec::loadu(dz_cache + row * channels + c + j * fVec::size()),
                            xhat_of(value.v[j], coefs)}
                : grad_terms(value.v[j], grad.v[j], coefs, act);
        result.v[j] = at::vec::fmadd(rstd.v[j] * weight.v[j], g.dz,
                                     at::vec::fmadd(v.v[j], g.xhat, t.v[j]));
      }
      result.store(out + c);
    }
    for (int64_t c = vector_end; c < channels; ++c) {
      auto [dz, xhat] = grad_terms(static_cast<float>(in[c]), static_cast<float>(grad_in[c]),
                                   table + c, table_stride, act);
      dz = dz_cache != nullptr ? dz_cache[row * channels + c] : dz;
      out[c] = static_cast<T>(k.at(kRstd, c) * k.at(kWeight, c) * dz + k.at(kV, c) * xhat +
                              k.at(kT, c));
    }
  }
}

// The backward table's per-(b, c) coefficients known from the forward statistics.
void backward_table(const Problem& p, const float* mean, const float* rstd, float* table) {
  const int64_t C = p.channels, BC = p.batch * C, D = p.channels_per_group();
  const Params params(p);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bg = b * p.groups + c / D, bc = b * C + c;
      table[kShift * BC + bc] = param_or(params.shift, bc, 0.f);
      table[kMean * BC + bc] = mean[bg];
      table[kRstd * BC + bc] = rstd[bg];
      table[kWeight * BC + bc] = param_or(params.weight, c, 1.f);
      table[kBias * BC + bc] = param_or(params.bias, c, 0.f);
    }
  }
}

// From the per-chunk sums: the table's v and t, and the parameter gradients (float32).
void finalize_backward(const Problem& p, const Tiling& tiling, const float* partial, float* table,
                       float* grad_weight, float* grad_bias, float* grad_shift) {
  const int64_t C = p.channels, BC = p.batch * C, D = p.channels_per_group();
  const int64_t components = p.batch * tiling.num_chunks * C;
  const float count = static_cast<float>(D * p.spatial);
  std::vector<float> totals(kSums * BC, 0.f);  // per (b, c) sums over all chunks
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t g = 0; g < p.groups; ++g) {
      float weighted_dzx = 0.f, weighted_dz = 0.f;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const int64_t bc = b * C + c;
        for (int64_t k = 0; k < tiling.num_chunks; ++k) {
          const int64_t i = partial_index(p, tiling, b, k, c);
          for (int s = 0; s < kSums; ++s) {
            totals[s * BC + bc] += partial[s * components + i];
          }
        }
        weighted_dzx += table[kWeight * BC + bc] * totals[kSumDzXhat * BC + bc];
        weighted_dz += table[kWeight * BC + bc] * totals[kSumDz * BC + bc];
      }
      const float r = table[kRstd * BC + b * C + g * D];
      const float v = -r * (weighted_dzx / count), t = -r * (weighted_dz / count);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const int64_t bc = b * C + c;
        table[kV * BC + bc] = v;
        table[kT * BC + bc] = t;
        grad_shift[bc] = r * table[kWeight * BC + bc] * totals[kSumDz * BC + bc] +
                         v * totals[kSumXhat * BC + bc] + static_cast<float>(p.spatial) * t;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float dw = 0.f, db = 0.f;
    for (int64_t b = 0; b < p.batch; ++b) {
      dw += totals[kSumDzXhat * BC + b * C + c];
      db += totals[kSumDz * BC + b * C + c];
    }
    grad_weight[c] = dw;
    grad_bias[c] = db;
  }
}

template <typename T>
void backward(const Problem& p, const at::Tensor& grad_y, const at::Tensor& mean,
              const at::Tensor& rstd, bool act, at::Tensor& grad_x, at::Tensor& grad_weight,
              at::Tensor& grad_bias, at::Tensor& grad_shift) {
  const Tiling tiling = tiling_of(p);
  const int64_t C = p.channels, BC = p.batch * C;
  const auto options = p.x.options().dtype(at::kFloat);
  auto table_tensor = at::empty({kBackwardCoefs, p.batch, C}, options);
  float* table = table_tensor.data_ptr<float>();
  backward_table(p, mean.data_ptr<float>(), rstd.data_ptr<float>(), table);

  auto partial = at::zeros({kSums, p.batch, tiling.num_chunks, C}, options);
  const int64_t components = partial.numel() / kSums;
  float* part = partial.data_ptr<float>();
  const T* x = p.x.data_ptr<T>();
  const T* dy = grad_y.data_ptr<T>();
  T* dx = grad_x.data_ptr<T>();
  // float32: the sum pass leaves dz in grad_x for the gradient pass (one sigmoid per element
  // instead of two); reduced dtypes recompute it, as dz would not survive rounding to them.
  float* dz_cache = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    dz_cache = act ? dx : nullptr;
  }
  const auto cache_at = [&](const Task& t) { return dz_cache ? dz_cache + t.offset : nullptr; };
  const auto channel_coefs = [&](const Task& t, float (&k)[kBackwardCoefs]) {
    for (int j = 0; j < kBackwardCoefs; ++j) {
      k[j] = table[j * BC + t.b * C + t.c];
    }
  };
  parallel_tasks(p, tiling, [&](const Task& t) {
    const int64_t i = partial_index(p, tiling, t.b, t.k, t.c);
    if (p.layout == Layout::kChannelsFirst) {
      float k[kBackwardCoefs], sums[kSums];
      channel_coefs(t, k);
      run_sums(x + t.offset, dy + t.offset, t.count, k, act, sums, cache_at(t));
      for (int s = 0; s < kSums; ++s) {
        part[s * components + i] = sums[s];
      }
    } else {
      rows_sums(x + t.offset, dy + t.offset, t.count, C, table + t.b * C, BC, act, part + i,
                components, cache_at(t));
    }
  });

  finalize_backward(p, tiling, part, table, grad_weight.data_ptr<float>(),
                    grad_bias.data_ptr<float>(), grad_shift.data_ptr<float>());

  parallel_tasks(p, tiling, [&](const Task& t) {
    if (p.layout == Layout::kChannelsFirst) {
      float k[kBackwardCoefs];
      channel_coefs(t, k);
      run_grad(x + t.offset, dy + t.offset, dx + t.offset, t.count, k, act, cache_at(t));
    } else {
      rows_grad(x + t.offset, dy + t.offset, dx + t.offset, t.count, C, table + t.b * C, BC, act,
                cache_at(t));
    }
  });
}

// ---- ops ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_cpu(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& shift,
    bool act) {
  const Problem p = make_problem("sr3fast::groupnorm_silu", x, num_groups, weight, bias, shift,
                                 /*params_in_float32=*/true);
  ForwardOutputs out = allocate_forward(p);
  if (x.numel() > 0) {
    SR3FAST_DISPATCH_FLOATING_TYPES(x.scalar_type(), "groupnorm_silu_cpu", [&] {
      forward<scalar_t>(p, eps, act, out.y, out.mean, out.rstd);
    });
  }
  return {out.y, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift, bool act) {
  const Problem p = make_problem("sr3fast::groupnorm_silu_backward", x, num_groups, weight, bias,
                                 shift, /*params_in_float32=*/true);
  const at::Tensor dy = check_backward(p, grad_y, mean, rstd);
  BackwardOutputs g = allocate_backward(p);
  if (x.numel() > 0) {
    SR3FAST_DISPATCH_FLOATING_TYPES(x.scalar_type(), "groupnorm_silu_backward_cpu", [&] {
      backward<scalar_t>(p, dy, mean.contiguous(), rstd.contiguous(), act, g.grad_x, g.grad_weight,
                         g.grad_bias, g.grad_shift);
    });
  }
  return backward_result(x, g, weight, bias, shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(sr3fast, CPU, m) {
  m.impl("groupnorm_silu", &groupnorm_silu_cpu);
  m.impl("groupnorm_silu_backward", &groupnorm_silu_backward_cpu);
}

}  // namespace sr3fast::groupnorm_silu
