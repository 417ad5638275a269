// Training-mode batch norm + ReLU (+ 2x2 max-pool) on NHWC float32, as four XLA FFI handlers:
// the per-channel sums for the statistics, the normalise-ReLU-pool forward, the per-channel
// sums of the backward and the input gradient. Each is one pass over the conv's output, where
// XLA's CPU backend made six forward and six backward (docs/benchmark.md). Built with
// onednn_conv.cc by hybrid_flax/onednn_conv.py; hybrid_flax/fused_batch_norm.py says why, and
// does the per-channel arithmetic between the passes (and the cross-device sums).
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// [n, h, w, c] of the conv's output; with `pool` each output covers a 2x2 window of it.
struct Dims {
  int64_t n, h, w, c;
  bool pool;
  int64_t out_h() const { return pool ? h / 2 : h; }
  int64_t out_w() const { return pool ? w / 2 : w; }
  int64_t rows() const { return n * out_h(); }  // output rows: the unit of work
  // Where output row r starts in the output, and its first input row in the input.
  int64_t out_offset(int64_t r) const { return r * out_w() * c; }
  int64_t in_offset(int64_t r) const {
    return ((r / out_h()) * h + (r % out_h()) * (pool ? 2 : 1)) * w * c;
  }
};

// Runs row_fn(row, thread) for every output row on `threads` OpenMP threads (0: OpenMP's
// default). Per calling thread, as the convolutions set it: each device's XLA thread runs its
// own share of the batch.
template <typename F>
void ForEachRow(const Dims& d, int64_t threads, F row_fn) {
  const int n = parallel::Team(threads);
#pragma omp parallel for num_threads(n) schedule(static)
  for (int64_t row = 0; row < d.rows(); ++row) row_fn(row, omp_get_thread_num());
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void AddTo(double* total, const float* partial, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) total[i] += partial[i];
}

// Per-thread [2, c] sums: float within a row (at most one row of positions, so the float
// partial sums stay short), double across rows; then added over the threads into `out`.
class ChannelSums {
 public:
  ChannelSums(int threads, int64_t c)
      : c_(c), partial_(static_cast<size_t>(threads) * 2 * c), total_(partial_.size(), 0.0) {}
  // The thread's partial sums, zeroed for the next row.
  float* partial(int thread) {
    float* p = partial_.data() + thread * 2 * c_;
    std::memset(p, 0, 2 * c_ * sizeof(float));
    return p;
  }
  // Adds the thread's row (its partial sums) to its running totals.
  void Add(int thread) {
    AddTo(total_.data() + thread * 2 * c_, partial_.data() + thread * 2 * c_, 2 * c_);
  }
  void Write(float* out) const {
    const int64_t threads = static_cast<int64_t>(total_.size()) / (2 * c_);
    for (int64_t i = 0; i < 2 * c_; ++i) {
      double s = 0.0;
      for (int64_t t = 0; t < threads; ++t) s += total_[t * 2 * c_ + i];
      out[i] = static_cast<float>(s);
    }
  }

 private:
  int64_t c_;
  std::vector<float> partial_;
  std::vector<double> total_;
};

// The normalised, shifted value before the ReLU.
__attribute__((always_inline)) inline float Norm(float x, float mean, float mul, float bias) {
  return (x - mean) * mul + bias;
}

// s[0, :] += x, s[1, :] += x^2 over `count` positions of c channels.
__attribute__((target_clones("avx512f", "avx2", "default")))
void RowSums(const float* x, int64_t count, int64_t c, float* s) {
  for (int64_t p = 0; p < count; ++p) {
    const float* xp = x + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      s[k] += xp[k];
      s[c + k] += xp[k] * xp[k];
    }
  }
}

void Stats(const float* x, float* out, const Dims& d, int64_t threads) {
  ChannelSums sums(parallel::Team(threads), d.c);
  ForEachRow(d, threads, [&](int64_t r, int t) {
    RowSums(x + d.in_offset(r), d.w, d.c, sums.partial(t));
    sums.Add(t);
  });
  sums.Write(out);
}

// y = max(0, Norm(x)) for one row of positions.
__attribute__((target_clones("avx512f", "avx2", "default")))
void ForwardRow(const float* x, float* y, int64_t count, int64_t c, const float* mean,
                const float* mul, const float* bias) {
  for (int64_t p = 0; p < count; ++p) {
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float v = Norm(x[p * c + k], mean[k], mul[k], bias[k]);
      y[p * c + k] = v > 0.0f ? v : 0.0f;
    }
  }
}

// The 2x2 windows of two input rows (x0 above x1): y = the window's max of max(0, Norm(x)),
// idx = which element holds it, the first in row-major order (0 1 / 2 3), as
// select-and-scatter sends the gradient.
__attribute__((target_clones("avx512f", "avx2", "default")))
void ForwardPoolRow(const float* x0, const float* x1, float* y, uint8_t* idx, int64_t count,
                    int64_t c, const float* mean, const float* mul, const float* bias) {
  for (int64_t j = 0; j < count; ++j) {
    const float* a = x0 + 2 * j * c;
    const float* b = x1 + 2 * j * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      float v0 = Norm(a[k], mean[k], mul[k], bias[k]);
      float v1 = Norm(a[c + k], mean[k], mul[k], bias[k]);
      float v2 = Norm(b[k], mean[k], mul[k], bias[k]);
      float v3 = Norm(b[c + k], mean[k], mul[k], bias[k]);
      v0 = v0 > 0.0f ? v0 : 0.0f;
      v1 = v1 > 0.0f ? v1 : 0.0f;
      v2 = v2 > 0.0f ? v2 : 0.0f;
      v3 = v3 > 0.0f ? v3 : 0.0f;
      const float top = v0 > v1 ? v0 : v1;
      const float bottom = v2 > v3 ? v2 : v3;
      const float m = top > bottom ? top : bottom;
      y[j * c + k] = m;
      idx[j * c + k] = v0 == m ? 0 : v1 == m ? 1 : v2 == m ? 2 : 3;
    }
  }
}

void Forward(const float* x, const float* mean, const float* mul, const float* bias, float* y,
             uint8_t* idx, const Dims& d, int64_t threads) {
  ForEachRow(d, threads, [&](int64_t r, int) {
    const float* x0 = x + d.in_offset(r);
    const int64_t o = d.out_offset(r);
    if (d.pool) {
      ForwardPoolRow(x0, x0 + d.w * d.c, y + o, idx + o, d.out_w(), d.c, mean, mul, bias);
    } else {
      ForwardRow(x0, y + o, d.w, d.c, mean, mul, bias);
    }
  });
}

// s[0, :] += dz, s[1, :] += dz (x - mean), dz the gradient before the ReLU, for one output row.
__attribute__((target_clones("avx512f", "avx2", "default")))
void BackwardSumsRow(const float* x, const float* y, const float* dy, int64_t count, int64_t c,
                     const float* mean, float* s) {
  for (int64_t p = 0; p < count; ++p) {
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float dz = y[p * c + k] > 0.0f ? dy[p * c + k] : 0.0f;
      s[k] += dz;
      s[c + k] += dz * (x[p * c + k] - mean[k]);
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void BackwardSumsPoolRow(const float* x0, const float* x1, const float* y, const uint8_t* idx,
                         const float* dy, int64_t count, int64_t c, const float* mean, float* s) {
  for (int64_t j = 0; j < count; ++j) {
    const float* a = x0 + 2 * j * c;
    const float* b = x1 + 2 * j * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float e = idx[j * c + k];
      const float g = y[j * c + k] > 0.0f ? dy[j * c + k] : 0.0f;
      // Only the chosen element gets g: pick its x rather than summing four products.
      const float xe = e == 0.0f ? a[k] : e == 1.0f ? a[c + k] : e == 2.0f ? b[k] : b[c + k];
      s[k] += g;
      s[c + k] += g * (xe - mean[k]);
    }
  }
}

void BackwardSums(const float* x, const float* y, const uint8_t* idx, const float* dy,
                  const float* mean, float* out, const Dims& d, int64_t threads) {
  ChannelSums sums(parallel::Team(threads), d.c);
  ForEachRow(d, threads, [&](int64_t r, int t) {
    const float* x0 = x + d.in_offset(r);
    const int64_t o = d.out_offset(r);
    if (d.pool) {
      BackwardSumsPoolRow(x0, x0 + d.w * d.c, y + o, idx + o, dy + o, d.out_w(), d.c, mean,
                          sums.partial(t));
    } else {
      BackwardSumsRow(x0, y + o, dy + o, d.w, d.c, mean, sums.partial(t));
    }
    sums.Add(t);
  });
  sums.Write(out);
}

// dx = mul dz - k0 - (x - mean) k1 for one row.
__attribute__((target_clones("avx512f", "avx2", "default")))
void BackwardRow(const float* x, const float* y, const float* dy, float* dx, int64_t count,
                 int64_t c, const float* mean, const float* mul, const float* k0,
                 const float* k1) {
  for (int64_t p = 0; p < count; ++p) {
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float dz = y[p * c + k] > 0.0f ? dy[p * c + k] : 0.0f;
      dx[p * c + k] = mul[k] * dz - k0[k] - (x[p * c + k] - mean[k]) * k1[k];
    }
  }
}

// One element `e` (0-3) of each 2x2 window along a row: its input `x` and gradient `dx`, one
// input position apart (two for a window), `dy` and `y` one output position apart.
__attribute__((target_clones("avx512f", "avx2", "default")))
void BackwardPoolRow(const float* x, const float* y, const uint8_t* idx, const float* dy,
                     float* dx, int64_t count, int64_t c, uint8_t e, const float* mean,
                     const float* mul, const float* k0, const float* k1) {
  for (int64_t j = 0; j < count; ++j) {
    const float* xj = x + 2 * j * c;
    float* dxj = dx + 2 * j * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float dz = idx[j * c + k] == e && y[j * c + k] > 0.0f ? dy[j * c + k] : 0.0f;
      dxj[k] = mul[k] * dz - k0[k] - (xj[k] - mean[k]) * k1[k];
    }
  }
}

void Backward(const float* x, const float* y, const uint8_t* idx, const float* dy,
              const float* mean, const float* mul, const float* k0, const float* k1, float* dx,
              const Dims& d, int64_t threads) {
  ForEachRow(d, threads, [&](int64_t r, int) {
    const int64_t in = d.in_offset(r), o = d.out_offset(r);
    if (!d.pool) {
      BackwardRow(x + in, y + o, dy + o, dx + in, d.w, d.c, mean, mul, k0, k1);
      return;
    }
    for (uint8_t e = 0; e < 4; ++e) {
      const int64_t at = in + ((e / 2) * d.w + e % 2) * d.c;  // the element's first window
      BackwardPoolRow(x + at, y + o, idx + o, dy + o, dx + at, d.out_w(), d.c, e, mean, mul, k0,
                      k1);
    }
  });
}

// The shapes agree, or an error naming the first that does not.
ffi::Error Check(const Dims& d, const ffi::Buffer<ffi::F32>& x,
                 const std::vector<int64_t>& out_sizes,
                 const std::vector<int64_t>& channel_sizes) {
  auto xd = x.dimensions();
  if (xd.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "batch norm: x must be [n, h, w, c]");
  }
  if (d.pool && (d.h % 2 || d.w % 2)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "batch norm: the fused 2x2 max-pool needs even heights and widths");
  }
  const int64_t out = d.n * d.out_h() * d.out_w() * d.c;
  for (int64_t s : out_sizes) {
    if (s != out) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "batch norm: an output-shaped operand has " + std::to_string(s) +
                            " elements, not " + std::to_string(out));
    }
  }
  for (int64_t s : channel_sizes) {
    if (s != d.c) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "batch norm: a per-channel operand has " + std::to_string(s) +
                            " elements, not " + std::to_string(d.c));
    }
  }
  return ffi::Error::Success();
}

Dims DimsOf(const ffi::Buffer<ffi::F32>& x, bool pool) {
  auto d = x.dimensions();
  if (d.size() != 4) return {0, 0, 0, 1, pool};
  return {d[0], d[1], d[2], d[3], pool};
}

template <typename F>
ffi::Error Guard(ffi::Error checked, F f) {
  if (checked.failure()) return checked;
  try {
    f();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "batch norm: out of host memory");
  }
  return ffi::Error::Success();
}

ffi::Error StatsFfi(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out, int64_t threads) {
  const Dims d = DimsOf(x, false);
  return Guard(Check(d, x, {}, {out->element_count() / 2}),
               [&] { Stats(x.typed_data(), out->typed_data(), d, threads); });
}

ffi::Error ForwardFfi(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> bias,
                      ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> idx, bool pool,
                      int64_t threads) {
  const Dims d = DimsOf(x, pool);
  std::vector<int64_t> outs = {y->element_count()};
  if (pool) outs = {y->element_count(), idx->element_count()};
  return Guard(Check(d, x, outs, {mean.element_count(), mul.element_count(),
                                  bias.element_count()}),
               [&] {
                 Forward(x.typed_data(), mean.typed_data(), mul.typed_data(), bias.typed_data(),
                         y->typed_data(), idx->typed_data(), d, threads);
               });
}

ffi::Error BackwardSumsFfi(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                           ffi::Buffer<ffi::U8> idx, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> out, bool pool,
                           int64_t threads) {
  const Dims d = DimsOf(x, pool);
  std::vector<int64_t> outs = {y.element_count(), dy.element_count()};
  if (pool) outs = {y.element_count(), dy.element_count(), idx.element_count()};
  return Guard(Check(d, x, outs, {mean.element_count(), out->element_count() / 2}), [&] {
    BackwardSums(x.typed_data(), y.typed_data(), idx.typed_data(), dy.typed_data(),
                 mean.typed_data(), out->typed_data(), d, threads);
  });
}

ffi::Error BackwardFfi(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::U8> idx,
                       ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mean,
                       ffi::Buffer<ffi::F32> mul, ffi::Buffer<ffi::F32> k0,
                       ffi::Buffer<ffi::F32> k1, ffi::ResultBuffer<ffi::F32> dx, bool pool,
                       int64_t threads) {
  const Dims d = DimsOf(x, pool);
  if (dx->element_count() != x.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "batch norm: dx must be x's shape");
  }
  std::vector<int64_t> outs = {y.element_count(), dy.element_count()};
  if (pool) outs = {y.element_count(), dy.element_count(), idx.element_count()};
  return Guard(Check(d, x, outs, {mean.element_count(), mul.element_count(), k0.element_count(),
                                  k1.element_count()}),
               [&] {
                 Backward(x.typed_data(), y.typed_data(), idx.typed_data(), dy.typed_data(),
                          mean.typed_data(), mul.typed_data(), k0.typed_data(), k1.typed_data(),
                          dx->typed_data(), d, threads);
               });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfBnStats, StatsFfi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfBnReluForward, ForwardFfi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<bool>("pool")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfBnReluBackwardSums, BackwardSumsFfi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("pool")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfBnReluBackward, BackwardFfi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("pool")
                                  .Attr<int64_t>("threads"));
