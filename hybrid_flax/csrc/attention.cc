// The self-attention core softmax(scale * q k^T) v on [batch, length, heads, depth] float32
// (the projections' own layout: no transposes), forward and backward, as two XLA FFI handlers.
// Each (example, head) pair's [length, length] scores stay in the calling core's cache: two
// oneDNN sgemms and a softmax forward; the backward recomputes the scores from the forward's
// row log-sum-exps and runs five sgemms. Built with onednn_conv.cc by
// hybrid_flax/onednn_conv.py; hybrid_flax/onednn_attention.py says why.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 (a score minus its row's max or log-sum-exp): 2^n * p(r), r = x - n ln 2
// in [-ln2/2, ln2/2], p the degree-7 Taylor polynomial (relative error under 1e-7 over
// [-87, 0]). No libm call, so the loops over a row vectorize, and no float-to-int conversion:
// adding 1.5 * 2^23 rounds x log2(e) to the integer n and leaves n in the sum's low mantissa
// bits, whence the exponent bits of 2^n (the row's exp pass 9.4 -> 7.9 ms at paper width).
// The clamp at -87 is a bit select, not `x < -87 ? -87 : x`: GCC 12 threads that branch through
// the inlined polynomial and leaves the AVX2 clone's loop scalar (a 256x256 row pass 484 -> 71
// us on the AVX2 Zen 3); NaNs still pass through unclamped.
__attribute__((always_inline)) inline float Exp(float x) {
  const uint32_t low = 0u - static_cast<uint32_t>(x < -87.0f);  // all ones where clamped
  uint32_t x_bits;
  std::memcpy(&x_bits, &x, 4);
  x_bits = (x_bits & ~low) | (0xC2AE0000u & low);  // 0xC2AE0000: -87.0f
  std::memcpy(&x, &x_bits, 4);
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  bits = (bits - 0x4B400000 + 127) << 23;  // 0x4B400000: the shifter's own bits
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// A row of scores s -> exp(s - sub) in place; returns their sum. Cloned for AVX-512 and AVX2
// hosts (the default clone gets SSE2), picked when the library loads.
__attribute__((target_clones("avx512f", "avx2", "default")))
float ExpRow(float* s, int64_t n, float sub) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    float e = Exp(s[j] - sub);
    s[j] = e;
    total += e;
  }
  return total;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
float RowMax(const float* s, int64_t n) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// ds = p * (dp - delta), in dp.
__attribute__((target_clones("avx512f", "avx2", "default")))
void SoftmaxGradRow(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// C = alpha A B (row-major, either transposed); false where oneDNN fails.
bool Gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  return dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, 0.0f, c, ldc) == dnnl_success;
}

// [b, t, h, d] row-major: pair (example, head) starts at offset(pair), rows row() apart.
struct Dims {
  int64_t b, t, h, d;
  int64_t row() const { return h * d; }
  int64_t offset(int64_t pair) const { return (pair / h) * t * h * d + (pair % h) * d; }
};

// Runs pair_fn(pair, scratch) for every (example, head) pair on `threads` OpenMP threads (0:
// OpenMP's default), each with its own `per_thread` floats of scratch (parallel::ForEach).
template <typename F>
void ForEachPair(int64_t pairs, int64_t threads, int64_t per_thread, F pair_fn) {
  const int team = parallel::Team(threads);
  const auto scratch = parallel::ZeroedScratch(team, per_thread);
  parallel::ForEach(pairs, team, scratch.get(), per_thread, "oneDNN's sgemm failed", pair_fn);
}

// y = softmax(scale q k^T) v, as exp(s - max) v / sum: one division per output, not per score;
// lse [b, h, t]: each row's log-sum-exp, for the backward.
void ForwardOrThrow(const float* q, const float* k, const float* v, float* y, float* lse, Dims s,
                    float scale, int64_t threads) {
  const int64_t t = s.t, d = s.d, ld = s.row();
  ForEachPair(s.b * s.h, threads, t * t + t, [&](int64_t pair, float* p) {
    const int64_t o = s.offset(pair);
    float* inv = p + t * t;
    float* l = lse + pair * t;
    if (!Gemm('N', 'T', t, t, d, scale, q + o, ld, k + o, ld, p, t)) return false;
    for (int64_t i = 0; i < t; ++i) {
      float m = RowMax(p + i * t, t);
      float total = ExpRow(p + i * t, t, m);
      l[i] = m + std::log(total);
      inv[i] = 1.0f / total;
    }
    if (!Gemm('N', 'N', t, d, t, 1.0f, p, t, v + o, ld, y + o, ld)) return false;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < d; ++j) y[o + i * ld + j] *= inv[i];
    return true;
  });
}

// dv = P^T dy, ds = P * (dy v^T - rowsum(dy * y)), dq = scale ds k, dk = scale ds^T q, with
// P = exp(scale q k^T - lse) recomputed.
void BackwardOrThrow(const float* q, const float* k, const float* v, const float* y,
                     const float* lse, const float* dy, float* dq, float* dk, float* dv, Dims s,
                     float scale, int64_t threads) {
  const int64_t t = s.t, d = s.d, ld = s.row();
  ForEachPair(s.b * s.h, threads, 2 * t * t, [&](int64_t pair, float* p) {
    const int64_t o = s.offset(pair);
    const float* l = lse + pair * t;
    float* dp = p + t * t;
    if (!Gemm('N', 'T', t, t, d, scale, q + o, ld, k + o, ld, p, t)) return false;
    for (int64_t i = 0; i < t; ++i) ExpRow(p + i * t, t, l[i]);
    if (!Gemm('T', 'N', t, d, t, 1.0f, p, t, dy + o, ld, dv + o, ld)) return false;
    if (!Gemm('N', 'T', t, t, d, 1.0f, dy + o, ld, v + o, ld, dp, t)) return false;
    for (int64_t i = 0; i < t; ++i) {
      float delta = 0.0f;
      for (int64_t j = 0; j < d; ++j) delta += dy[o + i * ld + j] * y[o + i * ld + j];
      SoftmaxGradRow(p + i * t, dp + i * t, t, delta);
    }
    return Gemm('N', 'N', t, d, t, scale, dp, t, k + o, ld, dq + o, ld) &&
           Gemm('T', 'N', t, d, t, scale, dp, t, q + o, ld, dk + o, ld);
  });
}

template <typename F>
ffi::Error Guard(F f) {
  try {
    f();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "attention: out of host memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("attention: ") + e.what());
  }
  return ffi::Error::Success();
}

Dims DimsOf(const ffi::Buffer<ffi::F32>& q) {
  auto d = q.dimensions();
  return {d[0], d[1], d[2], d[3]};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> lse, float scale,
                   int64_t threads) {
  return Guard([&] {
    ForwardOrThrow(q.typed_data(), k.typed_data(), v.typed_data(), y->typed_data(),
                   lse->typed_data(), DimsOf(q), scale, threads);
  });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t threads) {
  return Guard([&] {
    BackwardOrThrow(q.typed_data(), k.typed_data(), v.typed_data(), y.typed_data(),
                    lse.typed_data(), dy.typed_data(), dq->typed_data(), dk->typed_data(),
                    dv->typed_data(), DimsOf(q), scale, threads);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));
