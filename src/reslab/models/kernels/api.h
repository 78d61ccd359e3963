// The functions of reslab's CPU kernels extension that cross its files: defined in bn_act.cpp,
// conv_wgrad.cpp, conv_fwd.cpp, block.cpp and augment.cpp, bound to Python in bind.cpp (the build:
// reslab/models/bn_act.py).
//
// The compute files include ATen's core headers only, and bind.cpp torch's pybind11 glue: the
// catch-all <torch/extension.h> (the C++ frontend and the Python bindings) takes ~36 s per file
// to compile against 6 s for <ATen/core/Tensor.h> and 11 s for <torch/csrc/utils/pybind.h>
// (2-core AMD Zen 3), and the kernels are built on first use, while a user waits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// bn_act.cpp
std::string bn_act_simd();
int64_t bn_act_threads();
std::vector<at::Tensor> bn_act_forward(const at::Tensor& x, const std::optional<at::Tensor>& r,
                                       const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& shift, double eps);
std::vector<at::Tensor> bn_act_forward_train(const at::Tensor& x,
                                             const std::optional<at::Tensor>& r,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             at::Tensor running_mean, at::Tensor running_var,
                                             at::Tensor num_batches_tracked, double momentum,
                                             double eps);
std::vector<at::Tensor> bn_act_backward(const at::Tensor& dy, const at::Tensor& x,
                                        const at::Tensor& mask, const at::Tensor& mean,
                                        const at::Tensor& rstd, const at::Tensor& weight,
                                        bool with_residual);
void add_subsampled(at::Tensor dx, const at::Tensor& g, int64_t s, int64_t lo);
at::Tensor subsample_pad(const at::Tensor& x, int64_t s, int64_t lo, int64_t hi);
at::Tensor add(const at::Tensor& a, const at::Tensor& b);

// conv_wgrad.cpp
bool conv3x3_wgrad_available();
at::Tensor conv3x3_wgrad(const at::Tensor& x, const at::Tensor& dy, int64_t stride,
                         bool bf16_channels_last);

// conv_fwd.cpp
at::Tensor conv3x3_forward(const at::Tensor& x, const at::Tensor& w, bool transposed,
                           const std::optional<at::Tensor>& add = std::nullopt,
                           const std::optional<at::Tensor>& add_mask = std::nullopt,
                           int64_t stride = 1);
at::Tensor conv3x3_bias_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const std::optional<at::Tensor>& add, bool relu, int64_t stride = 1);

// augment.cpp
at::Tensor crop_normalize(const at::Tensor& images, const at::Tensor& idx, const at::Tensor& rows,
                          const at::Tensor& cols, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t pad);

// block.cpp
at::Tensor basic_block_train(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& g1,
                             const at::Tensor& b1, const at::Tensor& running_mean1,
                             const at::Tensor& running_var1, const at::Tensor& batches1,
                             double momentum1, double eps1, const at::Tensor& w2,
                             const at::Tensor& g2, const at::Tensor& b2,
                             const at::Tensor& running_mean2, const at::Tensor& running_var2,
                             const at::Tensor& batches2, double momentum2, double eps2,
                             bool residual, int64_t stride = 1, int64_t pad_lo = 0,
                             int64_t pad_hi = 0);
at::Tensor basic_block_infer(const at::Tensor& x, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b2, bool residual,
                             int64_t stride = 1, int64_t pad_lo = 0, int64_t pad_hi = 0);
