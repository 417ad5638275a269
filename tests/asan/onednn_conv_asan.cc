// csrc/onednn_conv.cc's three convolutions under AddressSanitizer (tests/test_csrc_asan.py): in
// XLA's layout and oneDNN's blocked one, one and two threads, alone and from four threads at
// once (its plans are shared between threads).
#include "check.h"
#include "onednn_conv.cc"

int main() {
  const int64_t n = 2, h = 6, w = 5, c = 8, oc = 16;
  std::mt19937 rng(0);
  const auto x = check::Normal(n * h * w * c, rng), wgt = check::Normal(9 * c * oc, rng);
  const auto dy = check::Normal(n * h * w * oc, rng);
  int differing = 0;
  for (bool blocked : {false, true}) {
    for (int64_t threads : {1, 2}) {
      differing += check::Differing([&] {
        // The handlers' pointers are not const: copies of the inputs.
        auto xs = x, ws = wgt, dys = dy;
        std::vector<float> y(dy.size()), dx(x.size()), dw(wgt.size());
        RunOrThrow(kForward, xs.data(), ws.data(), y.data(), n, h, w, c, oc, 1, threads, blocked);
        RunOrThrow(kInputGrad, dx.data(), ws.data(), dys.data(), n, h, w, c, oc, 1, threads,
                   blocked);
        RunOrThrow(kWeightGrad, xs.data(), dw.data(), dys.data(), n, h, w, c, oc, 1, threads,
                   false);
        return check::Results{y, dx, dw};
      });
    }
  }
  return check::Report(differing);
}
