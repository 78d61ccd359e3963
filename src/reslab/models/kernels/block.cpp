// A BasicBlock as one autograd op for CPU training steps:
//   out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))   (a plain block adds nothing)
// of stride 1 and equal widths (shortcut: the identity), or a stage's first block of stride 2
// with option A's shortcut (x subsampled, zero channels padded; session 35), computed with the
// kernels of this extension: the convolutions' outputs and input gradients from
// conv_fwd.cpp, their weight gradients from conv_wgrad.cpp, batch norm + ReLU (+ the add) from
// bn_act.cpp; x's two gradients (the shortcut's and conv1's) are summed as conv1's input
// gradient is written, the shortcut's read from the output's gradient and bn2's ReLU bits
// (conv_fwd.cpp's add and add_mask: the bits of the sum after it, three x-sized passes over
// memory less a block; session 34). Built with bn_act.cpp by reslab/models/bn_act.py; used by
// reslab/models/block_op.py.
//
// A stride-2 block's conv1 takes conv_fwd.cpp's stride-2 output and input gradient (oneDNN's
// before session 37, and still beyond 64 output channels, or for the input gradient where they
// are not a multiple of 32) and the AMX weight gradient, as the per-op path's
// layers._ConvSubsamplePad does, and the shortcut's gradient is added at the subsampled
// positions of x's (bn_act.cpp's add_subsampled).
//
// The block's per-op training step took five Python autograd Functions (the fork of x, two
// convs, two batch norms), two weight casts and their gradients' casts back, and a dozen Python
// checks: 0.17-0.33 ms a block on a 2-core Xeon whatever the batch size (ResNet-56's step
// x1.065-1.093 without them: benchmarks/ab_block_op.py, session 30). Here the forward is one
// Python call and the backward runs in C++ alone. The same kernels on the same tensors as that
// path (whose fork sums x's gradients with bn_act.cpp's add): the same bits (outputs, every
// gradient, the running statistics; tests/models/test_block_op.py).
#include <ATen/core/grad_mode.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <vector>

#include "api.h"

// 0 sums x's two gradients in a pass of their own after conv1's input gradient (before session 34),
// to compare.
#ifndef RESLAB_BLOCK_FUSED_ADD
#define RESLAB_BLOCK_FUSED_ADD 1
#endif
// 0 has bn2's backward store the shortcut's gradient for that sum (session 34's first step), to
// compare; 1 (with the sum inside) has the sum read it from dout and bn2's ReLU mask.
#if RESLAB_BLOCK_FUSED_ADD && !defined(RESLAB_BLOCK_MASKED_ADD)
#define RESLAB_BLOCK_MASKED_ADD 1
#endif
#ifndef RESLAB_BLOCK_MASKED_ADD
#define RESLAB_BLOCK_MASKED_ADD 0
#endif
#if RESLAB_BLOCK_MASKED_ADD && !RESLAB_BLOCK_FUSED_ADD
#error "RESLAB_BLOCK_MASKED_ADD needs RESLAB_BLOCK_FUSED_ADD"
#endif

// 0 takes oneDNN's stride-2 output (before session 37), to compare; the per-op path takes the
// same as the default (models/conv_wgrad.py's STRIDE2_FORWARD).
#ifndef RESLAB_BLOCK_S2_FORWARD
#define RESLAB_BLOCK_S2_FORWARD 1
#endif
// 0 takes oneDNN's stride-2 input gradient (before session 37), to compare (STRIDE2_INPUT_GRAD).
#ifndef RESLAB_BLOCK_S2_INPUT_GRAD
#define RESLAB_BLOCK_S2_INPUT_GRAD 1
#endif

namespace {

// Stride 2 takes the kernel up to this many output channels, as the per-op path does
// (models/conv_wgrad.py's STRIDE2_MAX_CHANNELS: oneDNN's measured faster at 128).
constexpr int64_t kStride2MaxChannels = 64;

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A batch norm's state that the forward updates in place (not an input of the op: no gradient).
struct Norm {
  at::Tensor running_mean, running_var, num_batches_tracked;
  double momentum, eps;
};

// The weight as the convolution kernels take it: bf16 (autocast's cast of an fp32 weight; its
// layout kept, as .to() keeps it).
at::Tensor kernel_weight(const at::Tensor& w) {
  return w.scalar_type() == at::kBFloat16 ? w : w.to(at::kBFloat16);
}

// The weight gradient in w's dtype and layout: the kernel's fp32 sums rounded once to bf16 (as
// oneDNN's bf16 gradient is), then cast as autocast's cast of the weight passes it back.
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& w,
                       int64_t stride) {
  const at::Tensor dw = conv3x3_wgrad(x, dy, stride, /*bf16_channels_last=*/true);
  return dw.to(w.scalar_type()).contiguous(w.suggest_memory_format());
}

// A stage's first block: conv1 of stride 2 (conv_fwd.cpp's, or oneDNN's, as the per-op path's
// layers._ConvSubsamplePad and conv_wgrad.AmxWgradConv call them), and, for a residual block,
// option A's shortcut (section 3.3): x subsampled by 2 with `lo` zero channels before x's and
// `hi` after.
struct Transition {
  int64_t stride, lo, hi;
};

// The 3x3 convolution of stride s, padding 1 (x [N, C, H, W] -> [N, P, H/s, W/s]; the block op
// takes even sides), and its input gradient: the kernel's where the per-op path takes it
// (conv_wgrad._fwd_kernel), else oneDNN's (conv_wgrad.conv_args).
at::Tensor conv_s(const at::Tensor& x, const at::Tensor& k, int64_t s) {
  if (RESLAB_BLOCK_S2_FORWARD && k.size(0) <= kStride2MaxChannels)
    return conv3x3_forward(x, k, false, std::nullopt, std::nullopt, s);
  return at::convolution(x, k, std::nullopt, {s, s}, {1, 1}, {1, 1}, false, {0, 0}, 1);
}

at::Tensor conv_s_input_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& k,
                             int64_t s) {
  if (RESLAB_BLOCK_S2_INPUT_GRAD && dy.size(1) % 32 == 0 && dy.size(1) <= kStride2MaxChannels)
    return conv3x3_forward(dy, k, true, std::nullopt, std::nullopt, s);
  return std::get<0>(at::convolution_backward(dy, x, k, std::nullopt, {s, s}, {1, 1}, {1, 1},
                                              false, {0, 0}, 1, {true, false, false}));
}

class BasicBlockOp : public torch::autograd::Function<BasicBlockOp> {
 public:
  // x [N, C, H, W] bf16 channels_last; w1 [P, C, 3, 3], w2 [P, P, 3, 3] (fp32 under autocast,
  // or bf16; P = C at stride 1); g, b: the norms' fp32 weights and biases.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& g2, const at::Tensor& b2, Norm n1, Norm n2,
                            bool residual, Transition t) {
    // The convolutions take bf16 operands as they are (autocast would only cast them to bf16).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor k1 = kernel_weight(w1), k2 = kernel_weight(w2);
    // conv1(x): [N, P, H/s, W/s]
    const at::Tensor y1 = t.stride == 1 ? conv3x3_forward(x, k1, false) : conv_s(x, k1, t.stride);
    // -> (z1 = relu(bn1(y1)), mask, mean, rstd)
    const std::vector<at::Tensor> f1 =
        bn_act_forward_train(y1, std::nullopt, g1, b1, n1.running_mean, n1.running_var,
                             n1.num_batches_tracked, n1.momentum, n1.eps);
    const at::Tensor y2 = conv3x3_forward(f1[0], k2, false);  // conv2(z1)
    std::optional<at::Tensor> shortcut;
    if (residual) shortcut = t.stride == 1 ? x : subsample_pad(x, t.stride, t.lo, t.hi);
    const std::vector<at::Tensor> f2 =
        bn_act_forward_train(y2, shortcut, g2, b2, n2.running_mean, n2.running_var,
                             n2.num_batches_tracked, n2.momentum, n2.eps);
    ctx->save_for_backward(
        {x, w1, k1, y1, f1[1], f1[2], f1[3], g1, f1[0], w2, k2, y2, f2[1], f2[2], f2[3], g2});
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["stride"] = t.stride;
    ctx->saved_data["lo"] = t.lo;
    return f2[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The kernels' results are not differentiable: a gradient of this gradient (create_graph)
    // would silently lose the block's terms.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "reslab: a gradient of a gradient (create_graph=True) cannot pass a block "
                "computed as one CPU op; turn off the CPU training paths for it (config "
                "fused_bn_act: false)");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w1 = s[1], &k1 = s[2], &y1 = s[3], &m1 = s[4], &mean1 = s[5],
                     &rstd1 = s[6], &g1 = s[7], &z1 = s[8], &w2 = s[9], &k2 = s[10], &y2 = s[11],
                     &m2 = s[12], &mean2 = s[13], &rstd2 = s[14], &g2 = s[15];
    const bool residual = ctx->saved_data["residual"].toBool();
    const int64_t stride = ctx->saved_data["stride"].toInt(), lo = ctx->saved_data["lo"].toInt();
    const at::Tensor dout = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    // bn2 (+ the shortcut's gradient): (dy2, dg2, db2, dx from the shortcut). An identity
    // shortcut's gradient is dout where relu passed it (mask m2): conv1's input gradient adds
    // it from dout and m2 as it writes dx (conv_fwd.cpp's add_mask), so it is never stored.
    // Option A's ([N, P, H/2, W/2], its padding's channels dropped) is stored and added at
    // the subsampled positions of oneDNN's input gradient, as the per-op path adds it.
    const bool identity = residual && stride == 1;
    const bool shortcut_grad = residual && (!identity || !RESLAB_BLOCK_MASKED_ADD);
    const std::vector<at::Tensor> d2 =
        bn_act_backward(dout, y2, m2, mean2, rstd2, g2, shortcut_grad);
    const at::Tensor dz1 = conv3x3_forward(d2[0], k2, true);
    const at::Tensor dw2 = weight_grad(z1, d2[0], w2, 1);
    const std::vector<at::Tensor> d1 = bn_act_backward(dz1, y1, m1, mean1, rstd1, g1, false);
    const at::Tensor dw1 = weight_grad(x, d1[0], w1, stride);
    at::Tensor dx;  // where x needs one: conv1's input gradient (+ the shortcut's)
    if (ctx->needs_input_grad(0) && stride != 1) {
      dx = conv_s_input_grad(d1[0], x, k1, stride).contiguous(at::MemoryFormat::ChannelsLast);
      if (residual) add_subsampled(dx, d2[3], stride, lo);  // bn_act.cpp's, in place
    } else if (ctx->needs_input_grad(0)) {
#if RESLAB_BLOCK_FUSED_ADD
      // the shortcut's term added as the convolution writes its result: the bits of the sum
      // after it (conv_fwd.cpp's store16), one pass over x-sized memory less
      if (!residual)
        dx = conv3x3_forward(d1[0], k1, true);
      else if (shortcut_grad)
        dx = conv3x3_forward(d1[0], k1, true, d2[3]);
      else
        dx = conv3x3_forward(d1[0], k1, true, dout, m2);
#else
      dx = conv3x3_forward(d1[0], k1, true);
      if (residual) dx = ::add(dx, d2[3]);  // bn_act.cpp's (at::add is another)
#endif
    }
    return {dx,           dw1,          d1[1],        d1[2],        dw2,         d2[1],
            d2[2],        at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The block ops' shapes: stride 1 or 2, channels padded only at stride 2, and the shortcut as
// wide as the block's output (w2's channels).
void check_geometry(const at::Tensor& x, const at::Tensor& w2, bool residual, int64_t stride,
                    int64_t pad_lo, int64_t pad_hi) {
  TORCH_CHECK(stride == 1 || stride == 2, "reslab: a block op of stride 1 or 2, not ", stride);
  TORCH_CHECK(pad_lo >= 0 && pad_hi >= 0 && (stride == 2 || pad_lo + pad_hi == 0),
              "reslab: a block op's shortcut pads channels only at stride 2");
  TORCH_CHECK(!residual || x.size(1) + pad_lo + pad_hi == w2.size(0),
              "reslab: the shortcut's channels (", x.size(1), " + ", pad_lo, " + ", pad_hi,
              ") must be the block's (", w2.size(0), ")");
}

}  // namespace

at::Tensor basic_block_train(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& g1,
                             const at::Tensor& b1, const at::Tensor& running_mean1,
                             const at::Tensor& running_var1, const at::Tensor& batches1,
                             double momentum1, double eps1, const at::Tensor& w2,
                             const at::Tensor& g2, const at::Tensor& b2,
                             const at::Tensor& running_mean2, const at::Tensor& running_var2,
                             const at::Tensor& batches2, double momentum2, double eps2,
                             bool residual, int64_t stride, int64_t pad_lo, int64_t pad_hi) {
  RECORD_FUNCTION("reslab::basic_block", std::vector<c10::IValue>());  // for profiles
  check_geometry(x, w2, residual, stride, pad_lo, pad_hi);
  return BasicBlockOp::apply(x, w1, g1, b1, w2, g2, b2,
                             Norm{running_mean1, running_var1, batches1, momentum1, eps1},
                             Norm{running_mean2, running_var2, batches2, momentum2, eps2},
                             residual, Transition{stride, pad_lo, pad_hi});
}

// Inference (session 39): an eval-mode BasicBlock whose BatchNorms are folded into its
// convolutions (reslab.inference.fold_batchnorm: conv + bias), as `reslab eval` and a run's
// evaluations compute it: relu(conv2(relu(conv1(x) + b1)) + b2 [+ shortcut(x)]) as two calls of
// conv_fwd.cpp's inference epilogue, each writing its output once (bias, the shortcut's add and
// the ReLU applied to the fp32 sums, rounded once), where eager ops write conv1's output, then
// its ReLU, conv2's, the sum, its ReLU. Stride 1 with the identity shortcut (or none), or a
// stage's first block of stride 2 with option A's (x subsampled, pad_lo and pad_hi zero
// channels) or none; used by reslab/models/block_op.py's `infer`. No autograd: the caller
// checks that no gradient is wanted.
at::Tensor basic_block_infer(const at::Tensor& x, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b2, bool residual, int64_t stride,
                             int64_t pad_lo, int64_t pad_hi) {
  RECORD_FUNCTION("reslab::basic_block_infer", std::vector<c10::IValue>());  // for profiles
  check_geometry(x, w2, residual, stride, pad_lo, pad_hi);
  // The convolutions take bf16 operands as they are (autocast would only cast them to bf16).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto bias = [](const std::optional<at::Tensor>& b, const at::Tensor& w) {
    return b.has_value() ? b->to(at::kFloat).contiguous()
                         : at::zeros({w.size(0)}, w.options().dtype(at::kFloat));
  };
  // relu(conv1(x) + b1): [N, P, H/s, W/s]
  const at::Tensor z1 =
      conv3x3_bias_act(x, kernel_weight(w1), bias(b1, w1), std::nullopt, true, stride);
  std::optional<at::Tensor> shortcut;
  if (residual) shortcut = stride == 1 ? x : subsample_pad(x, stride, pad_lo, pad_hi);
  return conv3x3_bias_act(z1, kernel_weight(w2), bias(b2, w2), shortcut, true, 1);
}
