// 3x3 stride-1 convolutions (NHWC activations, HWIO kernels, float32) through oneDNN, as three
// XLA FFI handlers: forward, input gradient, weight gradient. Built and registered by
// hybrid_flax/onednn_conv.py, which says why.
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// A shape's primitives, built once: oneDNN JIT-compiles each kernel on creation.
struct Plan {
  dnnl::primitive conv;
  memory::desc wei_md;        // the kernel (or its gradient) as the primitive wants it
  memory::desc scratch_md;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // HWIO -> wei_md (forward, input grad) or back (weight grad)
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>;

Plan* GetPlan(Kind kind, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oc, int64_t pad,
              int threads) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  Key key{kind, n, h, w, c, oc, pad, threads};  // kernels are generated for a thread count
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second.get();

  auto& eng = Engine();
  memory::desc src_md({n, c, h, w}, dt::f32, tag::nhwc);
  memory::desc dst_md({n, oc, h, w}, dt::f32, tag::nhwc);
  memory::desc any_wei({oc, c, 3, 3}, dt::f32, tag::any);
  memory::desc user_wei({oc, c, 3, 3}, dt::f32, tag::hwio);
  memory::dims strides{1, 1}, padding{pad, pad};
  dnnl::primitive_attr attr;
  // Scratch memory per call, so two devices' threads never share a buffer.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_md,
      any_wei, dst_md, strides, padding, padding, attr);
  auto plan = std::make_unique<Plan>();
  if (kind == kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->wei_md = fwd.weights_desc();
    plan->scratch_md = fwd.scratchpad_desc();
  } else if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md, strides, padding,
        padding, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(bwd);
    plan->wei_md = bwd.weights_desc();
    plan->scratch_md = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md, strides, padding,
        padding, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(bwd);
    plan->wei_md = bwd.diff_weights_desc();
    plan->scratch_md = bwd.scratchpad_desc();
  }
  plan->reorder_weights = plan->wei_md != user_wei;
  if (plan->reorder_weights) {
    plan->weights_reorder = kind == kWeightGrad
                                ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                      eng, plan->wei_md, eng, user_wei))
                                : dnnl::reorder(dnnl::reorder::primitive_desc(
                                      eng, user_wei, eng, plan->wei_md));
  }
  Plan* result = plan.get();
  plans.emplace(key, std::move(plan));
  return result;
}

// x: the NHWC input (its gradient for kInputGrad); wgt: the HWIO kernel (its gradient for
// kWeightGrad); y: the NHWC output (its gradient for the two backward kinds).
void RunOrThrow(Kind kind, float* x, float* wgt, float* y, int64_t n, int64_t h, int64_t w,
                int64_t c, int64_t oc, int64_t pad, int64_t threads) {
  // Per calling thread: each device's XLA thread runs its own share of the batch.
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  Plan* plan = GetPlan(kind, n, h, w, c, oc, pad, static_cast<int>(threads));
  auto& eng = Engine();
  dnnl::stream stream(eng);
  memory::desc src_md({n, c, h, w}, dt::f32, tag::nhwc);
  memory::desc dst_md({n, oc, h, w}, dt::f32, tag::nhwc);
  memory::desc user_wei({oc, c, 3, 3}, dt::f32, tag::hwio);
  memory src(src_md, eng, x), dst(dst_md, eng, y), user_w(user_wei, eng, wgt);
  auto aligned = [](size_t bytes) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (p == nullptr) throw std::bad_alloc();
    return std::unique_ptr<void, decltype(&std::free)>(p, &std::free);
  };
  auto wstore = aligned(plan->reorder_weights ? plan->wei_md.get_size() : 0);
  auto sstore = aligned(plan->scratch_md.get_size());
  memory conv_w = plan->reorder_weights ? memory(plan->wei_md, eng, wstore.get()) : user_w;
  memory scratch(plan->scratch_md, eng, sstore.get());
  if (kind == kForward) {
    if (plan->reorder_weights) plan->weights_reorder.execute(stream, user_w, conv_w);
    plan->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, conv_w},
                                {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == kInputGrad) {
    if (plan->reorder_weights) plan->weights_reorder.execute(stream, user_w, conv_w);
    plan->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, conv_w},
                                {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, conv_w},
                                {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (plan->reorder_weights) plan->weights_reorder.execute(stream, conv_w, user_w);
  }
  stream.wait();
}

ffi::Error Run(Kind kind, float* x, float* wgt, float* y, int64_t n, int64_t h, int64_t w,
               int64_t c, int64_t oc, int64_t pad, int64_t threads) {
  try {
    RunOrThrow(kind, x, wgt, y, n, h, w, c, oc, pad, threads);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN conv: out of host memory");
  } catch (const std::exception& e) {  // dnnl::error among them
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pad, int64_t threads) {
  auto d = x.dimensions();
  auto k = w.dimensions();
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(), d[0], d[1], d[2], d[3],
             k[3], pad, threads);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t pad, int64_t threads) {
  auto d = dx->dimensions();
  auto k = w.dimensions();
  return Run(kInputGrad, dx->typed_data(), w.typed_data(), dy.typed_data(), d[0], d[1], d[2],
             d[3], k[3], pad, threads);
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t pad, int64_t threads) {
  auto d = x.dimensions();
  auto k = dw->dimensions();
  return Run(kWeightGrad, x.typed_data(), dw->typed_data(), dy.typed_data(), d[0], d[1], d[2],
             d[3], k[3], pad, threads);
}

// All three: two float32 operands, one float32 result, the padding and the thread count.
auto Signature() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad")
      .Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvForward, Forward, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvInputGrad, InputGrad, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvWeightGrad, WeightGrad, Signature());
