// C = op(A) op(B) for float32 matrices through oneDNN's sgemm, as an XLA FFI handler: the dense
// layers' products (forward, input gradient and kernel gradient). Built with onednn_conv.cc by
// hybrid_flax/onednn_conv.py; hybrid_flax/onednn_dense.py says why.
#include <omp.h>

#include <cstdint>
#include <string>

#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// a: [m, k], or [k, m] with transpose_a; b: [k, n], or [n, k] with transpose_b; c: [m, n].
ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                  bool transpose_a, bool transpose_b, int64_t threads) {
  // Per calling thread: each device's XLA thread runs its own share of the batch.
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t m = cd[0], n = cd[1], k = transpose_a ? ad[0] : ad[1];
  if ((transpose_a ? ad[1] : ad[0]) != m || (transpose_b ? bd[1] : bd[0]) != k ||
      (transpose_b ? bd[0] : bd[1]) != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "matmul: operand shapes do not agree");
  }
  dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', m, n, k,
                                    1.0f, a.typed_data(), ad[1], b.typed_data(), bd[1], 0.0f,
                                    c->typed_data(), n);
  if (status != dnnl_success) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "matmul: oneDNN's sgemm failed with status " + std::to_string(status));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int64_t>("threads"));
