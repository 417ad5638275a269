// csrc/batch_norm.cc's four passes under AddressSanitizer (tests/test_csrc_asan.py): with and
// without the 2x2 max-pool, one and two threads, alone and from four threads at once.
#include "check.h"
#include "batch_norm.cc"

int main() {
  std::mt19937 rng(0);
  int differing = 0;
  for (const Dims& d : {Dims{3, 6, 4, 24, false}, Dims{2, 8, 6, 16, true}}) {
    const size_t in = d.n * d.h * d.w * d.c, out = d.n * d.out_h() * d.out_w() * d.c;
    const auto x = check::Normal(in, rng), dy = check::Normal(out, rng);
    const auto mean = check::Normal(d.c, rng), mul = check::Normal(d.c, rng);
    const auto bias = check::Normal(d.c, rng), k0 = check::Normal(d.c, rng);
    const auto k1 = check::Normal(d.c, rng);
    for (int64_t threads : {1, 2}) {
      differing += check::Differing([&] {
        std::vector<float> stats(2 * d.c), y(out), sums(2 * d.c), dx(in);
        std::vector<uint8_t> idx(out);
        Stats(x.data(), stats.data(), d, threads);
        Forward(x.data(), mean.data(), mul.data(), bias.data(), y.data(), idx.data(), d, threads);
        BackwardSums(x.data(), y.data(), idx.data(), dy.data(), mean.data(), sums.data(), d,
                     threads);
        Backward(x.data(), y.data(), idx.data(), dy.data(), mean.data(), mul.data(), k0.data(),
                 k1.data(), dx.data(), d, threads);
        return check::Results{stats, y, std::vector<float>(idx.begin(), idx.end()), sums, dx};
      });
    }
  }
  return check::Report(differing);
}
