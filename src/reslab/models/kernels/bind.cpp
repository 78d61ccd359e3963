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
  m.def("add", &add, "a + b for two channels_last tensors of one shape and dtype");
  m.def("add_subsampled", &add_subsampled, "dx[:, :, ::s, ::s] += g[:, lo:lo + C], in place");
  m.def("conv3x3_wgrad_available", &conv3x3_wgrad_available,
        "whether conv3x3_wgrad runs here (built with AMX, and the OS lets this process use it)");
  m.def("conv3x3_wgrad", &conv3x3_wgrad,
        "a 3x3 padding-1 conv's weight gradient (stride 1 or 2): fp32, or bf16 channels_last",
        py::arg("x"), py::arg("dy"), py::arg("stride") = 1, py::arg("bf16_channels_last") = false);
  m.def("conv3x3_forward", &conv3x3_forward,
        "a 3x3 stride-1 padding-1 conv (or, transposed, its input gradient) on AMX tiles, bf16; "
        "add: a tensor of the result's shape added to it (where add_mask's bit is set)",
        py::arg("x"), py::arg("w"), py::arg("transposed") = false, py::arg("add") = py::none(),
        py::arg("add_mask") = py::none());
  m.def("basic_block_train", &basic_block_train,
        "a stride-1 BasicBlock's training forward as one autograd op (kernels/block.cpp)");
}
