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
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };
enum Operand { kX = 0, kW = 1, kY = 2 };  // the handler's x, wgt and y pointers

// One argument of the primitive: which operand it is, and the reorder between the layout XLA
// holds it in and the one the primitive wants, where they differ.
struct Arg {
  int dnnl_arg;
  Operand operand;
  bool output;
  memory::desc md;  // the primitive's
  bool reordered = false;
  dnnl::reorder reorder;  // user -> md for inputs, md -> user for outputs
};

// A shape's primitives, built once: oneDNN JIT-compiles each kernel on creation.
struct Plan {
  dnnl::primitive conv;
  Arg args[3];
  memory::desc scratch_md;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// XLA's layouts: NHWC activations, HWIO kernels.
memory::desc UserDesc(Operand operand, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oc) {
  if (operand == kW) return memory::desc({oc, c, 3, 3}, dt::f32, tag::hwio);
  return memory::desc({n, operand == kX ? c : oc, h, w}, dt::f32, tag::nhwc);
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool>;

Plan* GetPlan(Kind kind, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oc, int64_t pad,
              int threads, bool blocked) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  // Kernels are generated for a thread count.
  Key key{kind, n, h, w, c, oc, pad, threads, blocked};
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second.get();

  auto& eng = Engine();
  // Blocked: the activations in whatever layout the primitive picks (on small maps its blocked
  // kernels beat its NHWC ones by more than the reorders cost); else XLA's NHWC, no reorder.
  tag act = blocked ? tag::any : tag::nhwc;
  memory::desc src_md({n, c, h, w}, dt::f32, act);
  memory::desc dst_md({n, oc, h, w}, dt::f32, act);
  memory::desc any_wei({oc, c, 3, 3}, dt::f32, tag::any);
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
    plan->args[0] = {DNNL_ARG_SRC, kX, false, fwd.src_desc()};
    plan->args[1] = {DNNL_ARG_WEIGHTS, kW, false, fwd.weights_desc()};
    plan->args[2] = {DNNL_ARG_DST, kY, true, fwd.dst_desc()};
    plan->scratch_md = fwd.scratchpad_desc();
  } else if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md, strides, padding,
        padding, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(bwd);
    plan->args[0] = {DNNL_ARG_DIFF_DST, kY, false, bwd.diff_dst_desc()};
    plan->args[1] = {DNNL_ARG_WEIGHTS, kW, false, bwd.weights_desc()};
    plan->args[2] = {DNNL_ARG_DIFF_SRC, kX, true, bwd.diff_src_desc()};
    plan->scratch_md = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md, strides, padding,
        padding, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(bwd);
    plan->args[0] = {DNNL_ARG_SRC, kX, false, bwd.src_desc()};
    plan->args[1] = {DNNL_ARG_DIFF_DST, kY, false, bwd.diff_dst_desc()};
    plan->args[2] = {DNNL_ARG_DIFF_WEIGHTS, kW, true, bwd.diff_weights_desc()};
    plan->scratch_md = bwd.scratchpad_desc();
  }
  for (Arg& arg : plan->args) {
    memory::desc user = UserDesc(arg.operand, n, h, w, c, oc);
    arg.reordered = arg.md != user;
    if (arg.reordered) {
      arg.reorder = dnnl::reorder(arg.output
                                      ? dnnl::reorder::primitive_desc(eng, arg.md, eng, user)
                                      : dnnl::reorder::primitive_desc(eng, user, eng, arg.md));
    }
  }
  Plan* result = plan.get();
  plans.emplace(key, std::move(plan));
  return result;
}

using Storage = std::unique_ptr<void, decltype(&std::free)>;

Storage Allocate(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (p == nullptr) throw std::bad_alloc();
  return Storage(p, &std::free);
}

// x: the NHWC input (its gradient for kInputGrad); wgt: the HWIO kernel (its gradient for
// kWeightGrad); y: the NHWC output (its gradient for the two backward kinds).
void RunOrThrow(Kind kind, float* x, float* wgt, float* y, int64_t n, int64_t h, int64_t w,
                int64_t c, int64_t oc, int64_t pad, int64_t threads, bool blocked) {
  // Per calling thread: each device's XLA thread runs its own share of the batch.
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  Plan* plan = GetPlan(kind, n, h, w, c, oc, pad, static_cast<int>(threads), blocked);
  auto& eng = Engine();
  dnnl::stream stream(eng);
  float* pointers[3] = {x, wgt, y};
  std::vector<Storage> storage;
  std::unordered_map<int, memory> args;
  const Arg* output = nullptr;  // the one output, where it needs a reorder after the primitive
  memory output_mine, output_user;
  for (const Arg& arg : plan->args) {
    memory user(UserDesc(arg.operand, n, h, w, c, oc), eng, pointers[arg.operand]);
    if (!arg.reordered) {
      args.emplace(arg.dnnl_arg, user);
      continue;
    }
    storage.push_back(Allocate(arg.md.get_size()));
    memory mine(arg.md, eng, storage.back().get());
    args.emplace(arg.dnnl_arg, mine);
    if (arg.output) {
      output = &arg;
      output_mine = mine;
      output_user = user;
    } else {
      arg.reorder.execute(stream, user, mine);
    }
  }
  storage.push_back(Allocate(plan->scratch_md.get_size()));
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(plan->scratch_md, eng, storage.back().get()));
  plan->conv.execute(stream, args);
  if (output != nullptr) output->reorder.execute(stream, output_mine, output_user);
  stream.wait();
}

ffi::Error Run(Kind kind, float* x, float* wgt, float* y, int64_t n, int64_t h, int64_t w,
               int64_t c, int64_t oc, int64_t pad, int64_t threads, int64_t blocked) {
  try {
    RunOrThrow(kind, x, wgt, y, n, h, w, c, oc, pad, threads, blocked != 0);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN conv: out of host memory");
  } catch (const std::exception& e) {  // dnnl::error among them
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pad, int64_t threads,
                   int64_t blocked) {
  auto d = x.dimensions();
  auto k = w.dimensions();
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(), d[0], d[1], d[2], d[3],
             k[3], pad, threads, blocked);
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t pad, int64_t threads,
                     int64_t blocked) {
  auto d = dx->dimensions();
  auto k = w.dimensions();
  return Run(kInputGrad, dx->typed_data(), w.typed_data(), dy.typed_data(), d[0], d[1], d[2],
             d[3], k[3], pad, threads, blocked);
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t pad, int64_t threads,
                      int64_t blocked) {
  auto d = x.dimensions();
  auto k = dw->dimensions();
  return Run(kWeightGrad, x.typed_data(), dw->typed_data(), dy.typed_data(), d[0], d[1], d[2],
             d[3], k[3], pad, threads, blocked);
}

// All three: two float32 operands, one float32 result, the padding, the thread count and
// whether the activations go to the primitive's own (blocked) layout.
auto Signature() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("pad")
      .Attr<int64_t>("threads")
      .Attr<int64_t>("blocked");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvForward, Forward, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvInputGrad, InputGrad, Signature());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HfConvWeightGrad, WeightGrad, Signature());
