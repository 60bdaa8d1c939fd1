// The Python module mae3d._C: the only translation unit that includes <torch/extension.h>.
// Kernel files include <ATen/ATen.h> only, which keeps rebuilds of a kernel fast.
#include <torch/extension.h>

#include "cpu/masked_norm.h"
#include "cpu/window_attention.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "mae3d C++ kernels";
  m.def("masked_norm_stats_cpu", &mae3d::masked_norm_stats_cpu, py::arg("x"), py::arg("mask"));
  m.def("masked_norm_fwd_cpu", &mae3d::masked_norm_fwd_cpu, py::arg("x"), py::arg("mask"),
        py::arg("scale"), py::arg("shift"), py::arg("negative_slope"));
  m.def("masked_norm_bwd_reduce_cpu", &mae3d::masked_norm_bwd_reduce_cpu, py::arg("grad_out"),
        py::arg("x"), py::arg("mask"), py::arg("mean"), py::arg("rstd"), py::arg("scale"),
        py::arg("shift"), py::arg("negative_slope"));
  m.def("masked_norm_bwd_cpu", &mae3d::masked_norm_bwd_cpu, py::arg("grad_out"), py::arg("x"),
        py::arg("mask"), py::arg("mean"), py::arg("rstd"), py::arg("scale"), py::arg("shift"),
        py::arg("negative_slope"), py::arg("coef_a"), py::arg("coef_b"));
  m.def("window_attention3d_fwd_cpu", &mae3d::window_attention3d_fwd_cpu, py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("table"), py::arg("window"), py::arg("shift"),
        py::arg("bias_window"), py::arg("scale"));
  m.def("window_attention3d_bwd_cpu", &mae3d::window_attention3d_bwd_cpu, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("table"), py::arg("window"), py::arg("shift"), py::arg("bias_window"),
        py::arg("scale"));
}
