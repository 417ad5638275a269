// csrc/attention.cc's kernels under AddressSanitizer (tests/test_csrc_asan.py): the forward and
// the backward, one and two threads, alone and from four threads at once.
#include "check.h"
#include "attention.cc"

int main() {
  const Dims shapes[] = {{2, 16, 2, 8}, {3, 9, 1, 12}};  // [b, t, h, d]
  std::mt19937 rng(0);
  int differing = 0;
  for (const Dims& s : shapes) {
    const size_t size = s.b * s.t * s.h * s.d;
    const auto q = check::Normal(size, rng), k = check::Normal(size, rng);
    const auto v = check::Normal(size, rng), dy = check::Normal(size, rng);
    const float scale = 0.3f;
    for (int64_t threads : {1, 2}) {
      differing += check::Differing([&] {
        std::vector<float> y(size), lse(s.b * s.h * s.t), dq(size), dk(size), dv(size);
        ForwardOrThrow(q.data(), k.data(), v.data(), y.data(), lse.data(), s, scale, threads);
        BackwardOrThrow(q.data(), k.data(), v.data(), y.data(), lse.data(), dy.data(), dq.data(),
                        dk.data(), dv.data(), s, scale, threads);
        return check::Results{y, lse, dq, dk, dv};
      });
    }
  }
  return check::Report(differing);
}
