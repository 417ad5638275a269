// csrc/winograd.cc's kernels, built with AddressSanitizer by tests/test_onednn_conv.py: each
// shape and thread count once alone, then from four threads at once, every result bit for bit
// the one alone. Why: the weight gradient once added its per-thread sums after their scratch was
// freed. Alone that read the right values; with other threads allocating it corrupted a layer's
// gradient, seen only as killed-and-resumed training runs not ending where uninterrupted ones
// did. The sanitizer stops at the first such access (exit status non-zero, with a report).
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "winograd.cc"

namespace {

struct Shape {
  int64_t n, h, w, c, k;
};

// y, dx (the flipped kernel's convolution of dy) and du for one shape, `threads` per call.
std::vector<std::vector<float>> Run(const Shape& s, const std::vector<float>& x,
                                    const std::vector<float>& dy, const std::vector<float>& u,
                                    int64_t threads) {
  const Tiles tiles{s.n, s.h, s.w};
  std::vector<float> y(s.n * s.h * s.w * s.k), dx(x.size()), du(16 * s.c * s.k);
  ConvOrThrow(x.data(), u.data(), y.data(), tiles, s.c, s.k, false, threads);
  ConvOrThrow(dy.data(), u.data(), dx.data(), tiles, s.k, s.c, true, threads);
  WeightGradOrThrow(x.data(), dy.data(), du.data(), tiles, s.c, s.k, threads);
  return {y, dx, du};
}

}  // namespace

int main() {
  // Tile counts below, at and past one block of 64, and a last block part full.
  const Shape shapes[] = {{3, 4, 6, 8, 16}, {4, 8, 8, 32, 32}, {1, 18, 18, 16, 8}};
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  int mismatches = 0;
  for (const Shape& s : shapes) {
    std::vector<float> x(s.n * s.h * s.w * s.c), dy(s.n * s.h * s.w * s.k), u(16 * s.c * s.k);
    for (auto* v : {&x, &dy, &u}) {
      for (float& f : *v) f = normal(rng);
    }
    for (int64_t threads : {1, 2}) {
      const auto alone = Run(s, x, dy, u, threads);
      std::vector<std::thread> callers;
      std::vector<int> wrong(4, 0);
      for (int t = 0; t < 4; ++t) {
        callers.emplace_back([&, t] {
          for (int i = 0; i < 8; ++i) wrong[t] += Run(s, x, dy, u, threads) != alone;
        });
      }
      for (auto& caller : callers) caller.join();
      for (int w : wrong) mismatches += w;
    }
  }
  std::printf("%d results differed from the same call alone\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
