// A 3x3, stride-1, padding-1 NHWC float32 convolution by Winograd's F(2x2, 3x3) algorithm, as
// two XLA FFI handlers: the convolution, for the forward and the input gradient (the same
// operation on the output gradient with the kernel turned round and transposed, read from the
// forward's transformed kernel: `flip`), and the transformed kernel's gradient, from which XLA
// gets the weight gradient (the transform's transpose). Each 2x2 block of outputs ("tile") comes
// from its 4x4 window of inputs: the window goes through the input transform V = B^T d B (adds
// only), its 16 positions multiply the transformed kernel U = G g G^T (done in XLA, which also
// differentiates it) as 16 matrix products over the channels, and the output transform
// A^T M A (adds only) gives the tile: 16 multiply-adds per input-output channel pair for 4
// outputs where the direct convolution does 36. Tiles go 64 at a time, so one block's
// transformed inputs and products stay in the core's cache between the three steps. Built with
// onednn_conv.cc by hybrid_flax/onednn_conv.py, which says why.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using parallel::Lines;

namespace {

constexpr int64_t kBlock = 64;  // tiles per block: 16 x 64 rows of each product's operands

// d: the window's 16 input rows (row-major over the 4x4 window; padding points at zeros);
// v: the 16 transformed rows. Cloned for AVX-512 and AVX2 hosts, picked when the library loads.
__attribute__((target_clones("avx512f", "avx2", "default")))
void InputTransform(const float* const* d, float* const* v, int64_t c) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) {
    float t[4][4];  // B^T d
    for (int b = 0; b < 4; ++b) {
      const float d0 = d[b][i], d1 = d[4 + b][i], d2 = d[8 + b][i], d3 = d[12 + b][i];
      t[0][b] = d0 - d2;
      t[1][b] = d1 + d2;
      t[2][b] = d2 - d1;
      t[3][b] = d1 - d3;
    }
    for (int a = 0; a < 4; ++a) {
      v[4 * a][i] = t[a][0] - t[a][2];
      v[4 * a + 1][i] = t[a][1] + t[a][2];
      v[4 * a + 2][i] = t[a][2] - t[a][1];
      v[4 * a + 3][i] = t[a][1] - t[a][3];
    }
  }
}

// m: a tile's 16 product rows; o: its four output rows (row-major over the 2x2 block).
__attribute__((target_clones("avx512f", "avx2", "default")))
void OutputTransform(const float* const* m, float* const* o, int64_t k) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    float t[2][4];  // A^T m
    for (int b = 0; b < 4; ++b) {
      t[0][b] = m[b][i] + m[4 + b][i] + m[8 + b][i];
      t[1][b] = m[4 + b][i] - m[8 + b][i] - m[12 + b][i];
    }
    for (int a = 0; a < 2; ++a) {
      o[2 * a][i] = t[a][0] + t[a][1] + t[a][2];
      o[2 * a + 1][i] = t[a][1] - t[a][2] - t[a][3];
    }
  }
}

// The maps' 2x2 output tiles, numbered example by example, row by row.
struct Tiles {
  int64_t n, h, w;
  int64_t count() const { return n * (h / 2) * (w / 2); }
  // The offset, in positions, of the map point (2 ty + dy, 2 tx + dx) of tile t; -1 off the map
  // (the padding).
  int64_t at(int64_t t, int64_t dy, int64_t dx) const {
    const int64_t tw = w / 2, th = h / 2;
    const int64_t b = t / (th * tw), row = 2 * (t / tw % th) + dy, col = 2 * (t % tw) + dx;
    return row < 0 || row >= h || col < 0 || col >= w ? -1 : (b * h + row) * w + col;
  }
};

// Runs block_fn(first tile, tile count, thread's scratch) for every block of kBlock tiles
// (parallel::ForEach).
template <typename F>
void ForEachBlock(const Tiles& tiles, int team, float* scratch, int64_t per_thread, F block_fn) {
  const int64_t blocks = (tiles.count() + kBlock - 1) / kBlock;
  parallel::ForEach(blocks, team, scratch, per_thread, "oneDNN's sgemm failed",
                    [&](int64_t block, float* mine) {
    const int64_t first = block * kBlock;
    return block_fn(first, std::min(kBlock, tiles.count() - first), mine);
  });
}

// The input transform of tiles [first, first + count) of x ([n, h, w, c]) into v: 16 rows of
// kBlock x c; `zeros` (c floats) stands for the padding.
void TransformInputs(const float* x, const Tiles& tiles, int64_t c, int64_t first, int64_t count,
                     const float* zeros, float* v) {
  const float* d[16];
  float* rows[16];
  for (int64_t i = 0; i < count; ++i) {
    for (int a = 0; a < 16; ++a) {
      const int64_t at = tiles.at(first + i, a / 4 - 1, a % 4 - 1);
      d[a] = at < 0 ? zeros : x + at * c;
      rows[a] = v + (a * kBlock + i) * c;
    }
    InputTransform(d, rows, c);
  }
}

// y = the convolution of x ([n, h, w, c]) by u: [16, c, k], the transformed kernel, or with
// `flip` [16, k, c], the transformed kernel of the convolution whose input gradient this is;
// y: [n, h, w, k]; h and w even. Turning a 3x3 kernel round swaps the first and last rows of
// G g (G's middle rows are symmetric), so position (i, j) reads the forward's (s(i), s(j)), s
// swapping 0 and 3, transposed.
void ConvOrThrow(const float* x, const float* u, float* y, const Tiles& tiles, int64_t c,
                 int64_t k, bool flip, int64_t threads) {
  static constexpr int kSwap[4] = {3, 1, 2, 0};
  // Each thread's transformed inputs, products, and a row of zeros for the padding.
  const int team = parallel::Team(threads);
  const int64_t per_thread = 16 * kBlock * (Lines(c) + Lines(k)) + Lines(c);
  const auto scratch = parallel::ZeroedScratch(team, per_thread);
  ForEachBlock(tiles, team, scratch.get(), per_thread,
               [&](int64_t first, int64_t count, float* v) {
    float* m = v + 16 * kBlock * Lines(c);
    TransformInputs(x, tiles, c, first, count, m + 16 * kBlock * Lines(k), v);
    for (int p = 0; p < 16; ++p) {
      const float* up = u + (flip ? kSwap[p / 4] * 4 + kSwap[p % 4] : p) * c * k;
      if (dnnl_sgemm('N', flip ? 'T' : 'N', count, k, c, 1.0f, v + p * kBlock * c, c, up,
                     flip ? c : k, 0.0f, m + p * kBlock * k, k) != dnnl_success) {
        return false;
      }
    }
    const float* rows[16];
    float* out[4];
    for (int64_t i = 0; i < count; ++i) {
      for (int a = 0; a < 16; ++a) rows[a] = m + (a * kBlock + i) * k;
      for (int a = 0; a < 4; ++a) out[a] = y + tiles.at(first + i, a / 2, a % 2) * k;
      OutputTransform(rows, out, k);
    }
    return true;
  });
}

// A tile's four output-gradient rows dy (2x2, row-major) -> the 16 rows dm = A dy A^T, the
// output transform's adjoint.
__attribute__((target_clones("avx512f", "avx2", "default")))
void OutputTransformAdjoint(const float* const* dy, float* const* dm, int64_t k) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    float t[4][2];  // A dy
    for (int b = 0; b < 2; ++b) {
      const float d0 = dy[b][i], d1 = dy[2 + b][i];
      t[0][b] = d0;
      t[1][b] = d0 + d1;
      t[2][b] = d0 - d1;
      t[3][b] = -d1;
    }
    for (int a = 0; a < 4; ++a) {
      dm[4 * a][i] = t[a][0];
      dm[4 * a + 1][i] = t[a][0] + t[a][1];
      dm[4 * a + 2][i] = t[a][0] - t[a][1];
      dm[4 * a + 3][i] = -t[a][1];
    }
  }
}

// du ([16, c, k]) = the gradient of the transformed kernel for input x ([n, h, w, c]) and output
// gradient dy ([n, h, w, k]): per position, the transformed inputs' transpose times the output
// gradient's adjoint transform, summed over the tiles (each thread its own sums, then added).
void WeightGradOrThrow(const float* x, const float* dy, float* du, const Tiles& tiles, int64_t c,
                       int64_t k, int64_t threads) {
  const int64_t sums = 16 * c * k;
  // Each thread's scratch: transformed inputs, products, a row of zeros, then its sums.
  const int64_t at_sums = 16 * kBlock * (Lines(c) + Lines(k)) + Lines(c);
  const int64_t per_thread = at_sums + sums;
  const int team = parallel::Team(threads);
  // Outlives the region: the sums are added up after it.
  const auto scratch = parallel::ZeroedScratch(team, per_thread);
  ForEachBlock(tiles, team, scratch.get(), per_thread,
               [&](int64_t first, int64_t count, float* v) {
    float* m = v + 16 * kBlock * Lines(c);
    const float* zeros = m + 16 * kBlock * Lines(k);
    float* total = v + at_sums;
    TransformInputs(x, tiles, c, first, count, zeros, v);
    const float* rows[4];
    float* out[16];
    for (int64_t i = 0; i < count; ++i) {
      for (int a = 0; a < 4; ++a) rows[a] = dy + tiles.at(first + i, a / 2, a % 2) * k;
      for (int a = 0; a < 16; ++a) out[a] = m + (a * kBlock + i) * k;
      OutputTransformAdjoint(rows, out, k);
    }
    for (int p = 0; p < 16; ++p) {
      if (dnnl_sgemm('T', 'N', c, k, count, 1.0f, v + p * kBlock * c, c, m + p * kBlock * k, k,
                     1.0f, total + p * c * k, k) != dnnl_success) {
        return false;
      }
    }
    return true;
  });
  // Thread t's sums, at its part of the scratch (parallel::ForEach); zeros where it got no block.
  std::fill(du, du + sums, 0.0f);
  for (int t = 0; t < team; ++t) {
    const float* total = scratch.get() + t * Lines(per_thread) + at_sums;
    for (int64_t i = 0; i < sums; ++i) du[i] += total[i];
  }
}

template <typename F>
ffi::Error Guard(F f) {
  try {
    f();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "winograd: out of host memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("winograd: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Conv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> y,
                bool flip, int64_t threads) {
  auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || ud.size() != 3 || yd.size() != 4 || ud[0] != 16 ||
      ud[flip ? 2 : 1] != xd[3] || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2] ||
      yd[3] != ud[flip ? 1 : 2] || xd[1] % 2 || xd[2] % 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "winograd: x must be [n, h, w, c] with h and w even, u [16, c, k] ([16, k, "
                      "c] with flip) and y [n, h, w, k]");
  }
  return Guard([&] {
    ConvOrThrow(x.typed_data(), u.typed_data(), y->typed_data(), Tiles{xd[0], xd[1], xd[2]},
                xd[3], yd[3], flip, threads);
  });
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> du, int64_t threads) {
  auto xd = x.dimensions(), yd = dy.dimensions(), ud = du->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || ud.size() != 3 || yd[0] != xd[0] || yd[1] != xd[1] ||
      yd[2] != xd[2] || ud[0] != 16 || ud[1] != xd[3] || ud[2] != yd[3] || xd[1] % 2 ||
      xd[2] % 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "winograd: x must be [n, h, w, c] with h and w even, dy [n, h, w, k] and "
                      "du [16, c, k]");
  }
  return Guard([&] {
    WeightGradOrThrow(x.typed_data(), dy.typed_data(), du->typed_data(),
                      Tiles{xd[0], xd[1], xd[2]}, xd[3], yd[3], threads);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfWinogradConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfWinogradWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
