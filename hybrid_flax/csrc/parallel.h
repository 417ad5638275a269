// The OpenMP work-sharing the C++ kernels share: the team a call runs on, per-thread scratch,
// and a loop over independent items that reports a failure after the region. Included by
// winograd.cc, attention.cc and batch_norm.cc (hybrid_flax/onednn_conv.py builds them).
#ifndef HYBRID_FLAX_CSRC_PARALLEL_H_
#define HYBRID_FLAX_CSRC_PARALLEL_H_

#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

namespace parallel {

// `n` floats rounded up to whole 64-byte lines.
constexpr int64_t Lines(int64_t n) { return (n + 15) / 16 * 16; }

// The OpenMP team of a region here: `threads` (0: OpenMP's default), set per calling thread:
// each device's XLA thread runs its own share of the batch, and a one-thread region's sgemm
// would otherwise take every core.
inline int Team(int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  return omp_get_max_threads();
}

using Scratch = std::unique_ptr<float, decltype(&std::free)>;

// `team` threads' scratch, `per_thread` zeroed floats each, every part starting on a cache line
// of its own. The caller owns it, so what a thread leaves in it outlives the region.
inline Scratch ZeroedScratch(int team, int64_t per_thread) {
  const size_t bytes = static_cast<size_t>(team) * Lines(per_thread) * sizeof(float);
  Scratch scratch(static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
  if (scratch == nullptr) throw std::bad_alloc();
  std::memset(scratch.get(), 0, bytes);
  return scratch;
}

// Runs item_fn(item, thread's scratch) for items [0, count) on `team` OpenMP threads (static
// schedule), thread i's scratch at scratch + i * Lines(per_thread). Nothing may throw inside an
// OpenMP region, so an item that fails returns false, the rest are skipped, and this throws
// `failure` after the region.
template <typename F>
void ForEach(int64_t count, int team, float* scratch, int64_t per_thread, const char* failure,
             F item_fn) {
  bool failed = false;
#pragma omp parallel num_threads(team) reduction(|| : failed)
  {
    float* mine = scratch + omp_get_thread_num() * Lines(per_thread);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < count; ++item) failed = failed || !item_fn(item, mine);
  }
  if (failed) throw std::runtime_error(failure);
}

}  // namespace parallel

#endif  // HYBRID_FLAX_CSRC_PARALLEL_H_
