// The Python module of reslab's CPU kernels (kernels/api.h lists what it binds; the build:
// reslab/models/bn_act.py). The only file of the extension that includes torch's pybind11 glue.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "api.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd", &bn_act_simd, "the vector code this build runs");
  m.def("threads", &bn_act_threads, "threads the kernel's parallel loops run on");
  m.def("forward", &bn_act_forward, "BatchNorm (+residual) + ReLU forward, training mode");
  m.def("forward_train", &bn_act_forward_train,
        "forward, and the running statistics and batch counter updated in place");
  m.def("backward", &bn_act_backward, "BatchNorm (+residual) + ReLU backward");
  m.def("subsample_pad", &subsample_pad,
        "x[:, :, ::s, ::s] with lo zero channels before and hi after, channels_last");
  m.def("add", &add, "a + b for two channels_last tensors of one shape and dtype");
  m.def("add_subsampled", &add_subsampled, "dx[:, :, ::s, ::s] += g[:, lo:lo + C], in place");
  m.def("conv3x3_wgrad_available", &conv3x3_wgrad_available,
        "whether conv3x3_wgrad runs here (built with AMX, and the OS lets this process use it)");
  m.def("conv3x3_wgrad", &conv3x3_wgrad,
        "a 3x3 padding-1 conv's weight gradient (stride 1 or 2): fp32, or bf16 channels_last",
        py::arg("x"), py::arg("dy"), py::arg("stride") = 1, py::arg("bf16_channels_last") = false);
  m.def("conv3x3_forward", &conv3x3_forward,
        "a 3x3 padding-1 conv of stride 1 or 2 (or, transposed, its input gradient) on AMX "
        "tiles, bf16; "
        "add: a tensor of the result's shape added to it (where add_mask's bit is set)",
        py::arg("x"), py::arg("w"), py::arg("transposed") = false, py::arg("add") = py::none(),
        py::arg("add_mask") = py::none(), py::arg("stride") = 1);
  m.def("conv3x3_bias_act", &conv3x3_bias_act,
        "inference: relu(conv3x3(x, w, stride, padding 1) + bias [+ add]) on AMX tiles, bf16, "
        "rounded once",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("add") = py::none(),
        py::arg("relu") = true, py::arg("stride") = 1);
  m.def("crop_normalize", &crop_normalize,
        "a training batch of uint8 images normalised, padded, cropped and mirrored in one pass "
        "(kernels/augment.cpp)");
  m.def("basic_block_train", &basic_block_train,
        "a BasicBlock's training forward as one autograd op (kernels/block.cpp): stride 1 with "
        "an identity shortcut (or none), or stride 2 with option A's (pad_lo, pad_hi zero "
        "channels) or none",
        py::arg("x"), py::arg("w1"), py::arg("g1"), py::arg("b1"), py::arg("running_mean1"),
        py::arg("running_var1"), py::arg("batches1"), py::arg("momentum1"), py::arg("eps1"),
        py::arg("w2"), py::arg("g2"), py::arg("b2"), py::arg("running_mean2"),
        py::arg("running_var2"), py::arg("batches2"), py::arg("momentum2"), py::arg("eps2"),
        py::arg("residual"), py::arg("stride") = 1, py::arg("pad_lo") = 0,
        py::arg("pad_hi") = 0);
  m.def("basic_block_infer", &basic_block_infer,
        "an eval-mode BasicBlock with its BatchNorms folded into the convolutions' biases as "
        "two kernel calls (kernels/block.cpp): stride 1 with an identity shortcut (or none), or "
        "stride 2 with option A's or none",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("residual"), py::arg("stride") = 1, py::arg("pad_lo") = 0,
        py::arg("pad_hi") = 0);
}
