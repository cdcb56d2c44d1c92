// oneDNN convolutions for jaxpoison.ops on CPU, called from XLA through the typed FFI.
//
// Three handlers, one per kernel of a 2-D NHWC/HWIO fp32 convolution with explicit padding:
//   JaxpoisonConvForward        y  = conv(x, w)
//   JaxpoisonConvBackwardData   dx = d<conv(x, w), ct>/dx   (shape of x taken from the result)
//   JaxpoisonConvBackwardWeights dw = d<conv(x, w), ct>/dw   (kernel size taken from the result)
// Activations stay NHWC (oneDNN reads and writes them in place); the kernel is reordered between
// HWIO and the layout oneDNN picks for the primitive. Primitives are built once per geometry and
// cached; scratchpads and reordered kernels live in per-thread buffers that only grow, so a call
// allocates nothing once warm. Built at first use by jaxpoison/_cpu_kernels/onednn.py.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum class Kind : char { kForward = 'f', kBackwardData = 'd', kBackwardWeights = 'w' };

struct Geometry {
  int64_t n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr;

  std::string Key(Kind kind) const {
    std::string key(1, static_cast<char>(kind));
    for (int64_t v : {n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
  // oneDNN describes every tensor in its logical NCHW / OIHW order; the tag gives the layout.
  memory::desc Src() const { return {{n, ic, ih, iw}, memory::data_type::f32, tag::nhwc}; }
  memory::desc Dst() const { return {{n, oc, oh, ow}, memory::data_type::f32, tag::nhwc}; }
  memory::desc Weights(tag t) const { return {{oc, ic, kh, kw}, memory::data_type::f32, t}; }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadLow() const { return {pt, pl}; }
  memory::dims PadHigh() const { return {pb, pr}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.Weights(tag::any), g.Dst(), g.Strides(), g.PadLow(), g.PadHigh(), UserScratchpad());
}

// A primitive for one geometry, and the reorder between the user's HWIO kernel and its layout.
struct Plan {
  dnnl::primitive primitive;
  memory::desc weights;  // the primitive's kernel layout
  memory::desc scratchpad;
  bool reorder = false;
  dnnl::reorder to_or_from_hwio;  // HWIO -> weights (forward, data), weights -> HWIO (weights)
};

std::shared_ptr<Plan> MakePlan(Kind kind, const Geometry& g) {
  auto plan = std::make_shared<Plan>();
  const memory::desc hwio = g.Weights(tag::hwio);
  auto fwd = ForwardDesc(g);
  if (kind == Kind::kForward) {
    plan->primitive = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(tag::any), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), fwd, UserScratchpad());
    plan->primitive = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(tag::any), g.Dst(),
        g.Strides(), g.PadLow(), g.PadHigh(), fwd, UserScratchpad());
    plan->primitive = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  }
  plan->reorder = plan->weights != hwio;
  if (plan->reorder) {
    plan->to_or_from_hwio =
        kind == Kind::kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan->weights, Engine(), hwio))
            : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), plan->weights));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static auto* plans = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  const std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = plans->find(key);
    if (it != plans->end()) return it->second;
  }
  auto plan = MakePlan(kind, g);  // outside the lock: building a primitive JIT-compiles code
  std::lock_guard<std::mutex> lock(mu);
  return plans->emplace(key, std::move(plan)).first->second;
}

// A 64-byte aligned per-thread buffer that only grows.
class Arena {
 public:
  ~Arena() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 4095) / 4096 * 4096;
      data_ = std::aligned_alloc(64, size_);
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

ffi::Error Run(Kind kind, const Geometry& g, float* x, float* w, float* y) {
  // x: input (or its gradient), w: HWIO kernel (or its gradient), y: output (or its gradient).
  if (g.n == 0 || g.ic == 0 || g.oc == 0) {  // an empty sum: the result is zero
    if (kind == Kind::kForward) std::memset(y, 0, sizeof(float) * g.n * g.oh * g.ow * g.oc);
    if (kind == Kind::kBackwardData) std::memset(x, 0, sizeof(float) * g.n * g.ih * g.iw * g.ic);
    if (kind == Kind::kBackwardWeights) {
      std::memset(w, 0, sizeof(float) * g.kh * g.kw * g.ic * g.oc);
    }
    return ffi::Error::Success();
  }
  thread_local Arena scratch_arena, weights_arena;
  thread_local dnnl::stream stream(Engine());
  try {
    auto plan = GetPlan(kind, g);
    memory src(g.Src(), Engine(), x), dst(g.Dst(), Engine(), y);
    memory hwio(g.Weights(tag::hwio), Engine(), w);
    memory weights = plan->reorder
                         ? memory(plan->weights, Engine(),
                                  weights_arena.Get(plan->weights.get_size()))
                         : hwio;
    memory scratchpad(plan->scratchpad, Engine(),
                      scratch_arena.Get(plan->scratchpad.get_size()));
    if (kind == Kind::kForward) {
      if (plan->reorder) plan->to_or_from_hwio.execute(stream, hwio, weights);
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                       {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DST, dst},
                                       {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (kind == Kind::kBackwardData) {
      if (plan->reorder) plan->to_or_from_hwio.execute(stream, hwio, weights);
      plan->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dst},
                                       {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DIFF_SRC, src},
                                       {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                       {DNNL_ARG_DIFF_DST, dst},
                                       {DNNL_ARG_DIFF_WEIGHTS, weights},
                                       {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan->reorder) plan->to_or_from_hwio.execute(stream, weights, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what() +
                                " (geometry " + g.Key(kind) + ")");
  }
  return ffi::Error::Success();
}

// vmap: JAX hands batched calls over with the batch dimensions in front ("expand_dims": every
// operand gets the same leading dimensions, 1 where it is not batched). Each index of the
// result's leading dimensions is one convolution; an operand of size 1 there is shared. When the
// kernel is shared and the activations are not, the leading dimensions fold into the batch.
struct Operand {
  float* data;
  ffi::Span<const int64_t> dims;
  int64_t Size(size_t from) const {
    int64_t n = 1;
    for (size_t i = from; i < dims.size(); ++i) n *= dims[i];
    return n;
  }
};

ffi::Error Batched(Kind kind, Operand x, Operand w, Operand y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const size_t rank = y.dims.size();
  if (rank < 4 || x.dims.size() != rank || w.dims.size() != rank) {
    return ffi::Error::InvalidArgument("jaxpoison oneDNN conv: operands of one rank >= 4");
  }
  const size_t lead = rank - 4;
  auto conv_dim = [&](const Operand& o, size_t i) { return o.dims[lead + i]; };
  int64_t count = 1;
  bool w_shared = true, act_full = true;
  for (size_t i = 0; i < lead; ++i) {
    const int64_t n = std::max({x.dims[i], w.dims[i], y.dims[i]});
    count *= n;
    for (const Operand* o : {&x, &w, &y}) {
      if (o->dims[i] != 1 && o->dims[i] != n) {
        return ffi::Error::InvalidArgument("jaxpoison oneDNN conv: mismatched batch dimensions");
      }
    }
    w_shared &= w.dims[i] == 1;
    act_full &= x.dims[i] == n && y.dims[i] == n;
  }
  Geometry g{conv_dim(x, 0), conv_dim(x, 1), conv_dim(x, 2), conv_dim(x, 3),
             conv_dim(y, 1), conv_dim(y, 2), conv_dim(y, 3), conv_dim(w, 0),
             conv_dim(w, 1), sh, sw, pt, pb, pl, pr};
  if (kind != Kind::kBackwardWeights && w_shared && act_full) {
    g.n *= count;  // one convolution over all batched examples
    return Run(kind, g, x.data, w.data, y.data);
  }
  const int64_t x_size = x.Size(lead), w_size = w.Size(lead), y_size = y.Size(lead);
  for (int64_t index = 0; index < count; ++index) {
    // Offsets of this index in each operand (mixed radix over the leading dimensions).
    int64_t rest = index, xo = 0, wo = 0, yo = 0, xs = 1, ws = 1, ys = 1;
    for (size_t i = lead; i-- > 0;) {
      const int64_t n = std::max({x.dims[i], w.dims[i], y.dims[i]});
      const int64_t d = rest % n;
      rest /= n;
      if (x.dims[i] != 1) xo += d * xs, xs *= n;
      if (w.dims[i] != 1) wo += d * ws, ws *= n;
      if (y.dims[i] != 1) yo += d * ys, ys *= n;
    }
    auto e = Run(kind, g, x.data + xo * x_size, w.data + wo * w_size, y.data + yo * y_size);
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

Operand In(ffi::Buffer<ffi::F32>& b) { return {b.typed_data(), b.dimensions()}; }
Operand Out(ffi::ResultBuffer<ffi::F32>& b) { return {b->typed_data(), b->dimensions()}; }

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Batched(Kind::kForward, In(x), In(w), Out(y), sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Batched(Kind::kBackwardData, Out(dx), In(w), In(ct), sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  return Batched(Kind::kBackwardWeights, In(x), Out(dw), In(ct), sh, sw, pt, pb, pl, pr);
}

}  // namespace

// Two rank-4 fp32 arrays in, one out; strides and explicit (low, high) padding as attributes.
#define JAXPOISON_CONV_BINDING   \
  ffi::Ffi::Bind()               \
      .Arg<ffi::Buffer<ffi::F32>>() \
      .Arg<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>() \
      .Attr<int64_t>("sh")       \
      .Attr<int64_t>("sw")       \
      .Attr<int64_t>("pt")       \
      .Attr<int64_t>("pb")       \
      .Attr<int64_t>("pl")       \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpoisonConvForward, Forward, JAXPOISON_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpoisonConvBackwardData, BackwardData, JAXPOISON_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpoisonConvBackwardWeights, BackwardWeights,
                              JAXPOISON_CONV_BINDING);
