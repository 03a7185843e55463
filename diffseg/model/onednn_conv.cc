// 3D convolution on CPU through oneDNN, exposed to JAX as three XLA FFI handlers.
//
// XLA's CPU convolution runs far below this CPU's peak for 3D; oneDNN (the library behind
// PyTorch's CPU convolutions) does not. diffseg/model/onednn.py compiles this file on first use
// and registers the handlers; diffseg/model/conv.py wires them into a jax.custom_vjp.
//
// Every handler is float32, channels-last, stride 1, SAME padding with odd kernel sizes:
//   DiffsegConv3dFwd         x (N, D, H, W, Ci), w (kd, kh, kw, Ci, Co), b (Co) -> y (N, D, H, W, Co)
//   DiffsegConv3dBwdData     dy (N, D, H, W, Co), w (kd, kh, kw, Ci, Co)        -> dx (N, D, H, W, Ci)
//   DiffsegConv3dBwdWeights  x (N, D, H, W, Ci), dy (N, D, H, W, Co)   -> dw (kd, kh, kw, Ci, Co), db (Co)
// The bias rides along inside oneDNN's kernels, saving XLA a full pass over y (and one over dy).
// D, H, W are whatever the caller's three spatial axes are; the kernel's axes follow the same order.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

// N, D, H, W, Ci, Co, kd, kh, kw: everything a primitive depends on.
using Key = std::array<int64_t, 9>;

// The three primitives of one convolution shape, plus the weight reorders between the caller's
// (kd, kh, kw, Ci, Co) layout and whatever blocked layout oneDNN picked for this CPU.
struct Conv {
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  memory::desc src, dst, bias, user_w, fwd_w, bwd_data_w, bwd_diff_w;
  memory::desc fwd_scratch, bwd_data_scratch, bwd_weights_scratch;
  dnnl::reorder to_fwd_w, to_bwd_data_w, from_bwd_diff_w;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

Conv Build(const Key& k) {
  const auto f32 = memory::data_type::f32;
  const memory::dims src_dims = {k[0], k[4], k[1], k[2], k[3]};
  const memory::dims dst_dims = {k[0], k[5], k[1], k[2], k[3]};
  const memory::dims w_dims = {k[5], k[4], k[6], k[7], k[8]};
  const memory::dims strides = {1, 1, 1};
  const memory::dims pad = {k[6] / 2, k[7] / 2, k[8] / 2};
  Conv c;
  c.src = memory::desc(src_dims, f32, Tag::ndhwc);
  c.dst = memory::desc(dst_dims, f32, Tag::ndhwc);
  c.user_w = memory::desc(w_dims, f32, Tag::dhwio);
  c.bias = memory::desc({k[5]}, f32, Tag::x);
  const memory::desc any_w(w_dims, f32, Tag::any);
  auto& eng = Engine();
  const auto algo = dnnl::algorithm::convolution_direct;
  // Each call brings its own scratchpad: XLA may run the same primitive from two threads at once
  // (two devices, or independent ops), and a shared one deadlocked the weight-gradient reduction.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, algo, c.src,
                                                any_w, c.bias, c.dst, strides, pad, pad, attr);
  dnnl::convolution_backward_data::primitive_desc bwd_data(eng, algo, c.src, any_w, c.dst, strides, pad,
                                                           pad, fwd, attr);
  dnnl::convolution_backward_weights::primitive_desc bwd_weights(eng, algo, c.src, any_w, c.bias, c.dst,
                                                                 strides, pad, pad, fwd, attr);
  c.fwd_scratch = fwd.scratchpad_desc();
  c.bwd_data_scratch = bwd_data.scratchpad_desc();
  c.bwd_weights_scratch = bwd_weights.scratchpad_desc();
  c.fwd = dnnl::convolution_forward(fwd);
  c.bwd_data = dnnl::convolution_backward_data(bwd_data);
  c.bwd_weights = dnnl::convolution_backward_weights(bwd_weights);
  c.fwd_w = fwd.weights_desc();
  c.bwd_data_w = bwd_data.weights_desc();
  c.bwd_diff_w = bwd_weights.diff_weights_desc();
  c.to_fwd_w = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c.user_w, eng, c.fwd_w));
  c.to_bwd_data_w = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c.user_w, eng, c.bwd_data_w));
  c.from_bwd_diff_w = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c.bwd_diff_w, eng, c.user_w));
  return c;
}

// Creating a convolution's primitives and reorders takes ~0.2 ms each (ONEDNN_VERBOSE on the
// benchmark machine), against 1-40 ms per call of the U-Net's convolutions: build once per shape.
const Conv& Get(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Conv>(Build(key));
  return *slot;
}

using Buf = ffi::Buffer<ffi::F32, 5>;
using Out = ffi::ResultBuffer<ffi::F32, 5>;
using Vec = ffi::Buffer<ffi::F32, 1>;
using VecOut = ffi::ResultBuffer<ffi::F32, 1>;

// What every handler shares: checks the kernel sizes (w: kd, kh, kw, Ci, Co), finds the primitives
// for activations `act` (N, D, H, W, ...), runs `body(conv, stream)`, waits, and turns oneDNN's
// exceptions into an XLA error (exceptions must not cross the FFI).
template <typename F>
ffi::Error Run(ffi::Span<const int64_t> act, ffi::Span<const int64_t> w, F body) {
  for (int i = 0; i < 3; ++i)
    if (w[i] % 2 == 0) return ffi::Error::InvalidArgument("diffseg oneDNN conv3d: kernel sizes must be odd");
  try {
    const Conv& c = Get({act[0], act[1], act[2], act[3], w[3], w[4], w[0], w[1], w[2]});
    dnnl::stream s(Engine());
    body(c, s);
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("diffseg oneDNN conv3d: ") + e.what());
  }
  return ffi::Error::Success();
}

memory Wrap(const memory::desc& desc, void* data) { return memory(desc, Engine(), data); }

// The caller's (kd, kh, kw, Ci, Co) weights in the layout a primitive asked for.
memory Reordered(const Conv& c, const dnnl::reorder& to, const memory::desc& layout, float* w,
                 dnnl::stream& s) {
  memory user = Wrap(c.user_w, w), out(layout, Engine());
  to.execute(s, user, out);
  return out;
}

ffi::Error Fwd(Buf x, Buf w, Vec b, Out y) {
  return Run(x.dimensions(), w.dimensions(), [&](const Conv& c, dnnl::stream& s) {
    memory scratch(c.fwd_scratch, Engine());
    c.fwd.execute(s, {{DNNL_ARG_SRC, Wrap(c.src, x.typed_data())},
                      {DNNL_ARG_WEIGHTS, Reordered(c, c.to_fwd_w, c.fwd_w, w.typed_data(), s)},
                      {DNNL_ARG_BIAS, Wrap(c.bias, b.typed_data())},
                      {DNNL_ARG_DST, Wrap(c.dst, y->typed_data())},
                      {DNNL_ARG_SCRATCHPAD, scratch}});
  });
}

ffi::Error BwdData(Buf dy, Buf w, Out dx) {
  return Run(dy.dimensions(), w.dimensions(), [&](const Conv& c, dnnl::stream& s) {
    memory scratch(c.bwd_data_scratch, Engine());
    c.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.typed_data())},
                           {DNNL_ARG_WEIGHTS, Reordered(c, c.to_bwd_data_w, c.bwd_data_w, w.typed_data(), s)},
                           {DNNL_ARG_DIFF_SRC, Wrap(c.src, dx->typed_data())},
                           {DNNL_ARG_SCRATCHPAD, scratch}});
  });
}

ffi::Error BwdWeights(Buf x, Buf dy, Out dw, VecOut db) {
  return Run(x.dimensions(), dw->dimensions(), [&](const Conv& c, dnnl::stream& s) {
    memory conv_dw(c.bwd_diff_w, Engine()), scratch(c.bwd_weights_scratch, Engine());
    c.bwd_weights.execute(s, {{DNNL_ARG_SRC, Wrap(c.src, x.typed_data())},
                              {DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.typed_data())},
                              {DNNL_ARG_DIFF_WEIGHTS, conv_dw},
                              {DNNL_ARG_DIFF_BIAS, Wrap(c.bias, db->typed_data())},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    memory user_dw = Wrap(c.user_w, dw->typed_data());
    c.from_bwd_diff_w.execute(s, conv_dw, user_dw);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffsegConv3dFwd, Fwd,
                              ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Arg<Vec>().Ret<Buf>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffsegConv3dBwdData, BwdData,
                              ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<Buf>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffsegConv3dBwdWeights, BwdWeights,
                              ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<Buf>().Ret<Vec>());
