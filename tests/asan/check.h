// What the AddressSanitizer harnesses beside it share (tests/test_csrc_asan.py builds each with
// its kernel source): random operands, and each call's results alone against the same call
// from four threads at once.
#ifndef HYBRID_FLAX_TESTS_ASAN_CHECK_H_
#define HYBRID_FLAX_TESTS_ASAN_CHECK_H_

#include <cstdio>
#include <random>
#include <thread>
#include <vector>

namespace check {

using Results = std::vector<std::vector<float>>;

inline std::vector<float> Normal(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& f : v) f = normal(rng);
  return v;
}

// How many of 32 calls of `run` (eight from each of four threads at once) returned other
// results than one call alone: 0 where the kernel reads only its operands and its own scratch.
template <typename F>
int Differing(F run) {
  const Results alone = run();
  std::vector<int> wrong(4, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) wrong[t] += run() != alone;
    });
  }
  for (auto& caller : callers) caller.join();
  int total = 0;
  for (int w : wrong) total += w;
  return total;
}

// The harness's last line, which the test reads, and its exit status.
inline int Report(int differing) {
  std::printf("%d results differed from the same call alone\n", differing);
  return differing == 0 ? 0 : 1;
}

}  // namespace check

#endif  // HYBRID_FLAX_TESTS_ASAN_CHECK_H_
