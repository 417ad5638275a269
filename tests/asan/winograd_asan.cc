// csrc/winograd.cc's kernels under AddressSanitizer (tests/test_csrc_asan.py). Why this exists:
// the weight gradient once added its per-thread sums after their scratch was freed. Alone that
// read the right values; with other threads allocating it corrupted a layer's gradient, seen
// only as killed-and-resumed training runs not ending where uninterrupted ones did.
#include "check.h"
#include "winograd.cc"

int main() {
  // Tile counts below, at and past one block of 64, and a last block part full.
  struct Shape {
    int64_t n, h, w, c, k;
  };
  const Shape shapes[] = {{3, 4, 6, 8, 16}, {4, 8, 8, 32, 32}, {1, 18, 18, 16, 8}};
  std::mt19937 rng(0);
  int differing = 0;
  for (const Shape& s : shapes) {
    const auto x = check::Normal(s.n * s.h * s.w * s.c, rng);
    const auto dy = check::Normal(s.n * s.h * s.w * s.k, rng);
    const auto u = check::Normal(16 * s.c * s.k, rng);
    const Tiles tiles{s.n, s.h, s.w};
    for (int64_t threads : {1, 2}) {
      differing += check::Differing([&] {
        std::vector<float> y(dy.size()), dx(x.size()), du(u.size());
        ConvOrThrow(x.data(), u.data(), y.data(), tiles, s.c, s.k, false, threads);
        ConvOrThrow(dy.data(), u.data(), dx.data(), tiles, s.k, s.c, true, threads);
        WeightGradOrThrow(x.data(), dy.data(), du.data(), tiles, s.c, s.k, threads);
        return check::Results{y, dx, du};
      });
    }
  }
  return check::Report(differing);
}
