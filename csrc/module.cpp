// The Python module mae3d._C: the only translation unit that includes <torch/extension.h>.
// Kernel files include <ATen/ATen.h> only, which keeps rebuilds of a kernel fast.
#include <torch/extension.h>

#include "cpu/masked_norm.h"
#include "cpu/window_attention.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "mae3d C++ kernels";
  m.def("masked_norm_forward_cpu", &mae3d::masked_norm_forward_cpu, py::arg("x"), py::arg("mask"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("instance"), py::arg("use_input_stats"), py::arg("eps"),
        py::arg("negative_slope"), py::arg("momentum"), py::arg("partials") = py::none());
  m.def("masked_norm_partials_cpu", &mae3d::masked_norm_partials_cpu, py::arg("x"),
        py::arg("mask"));
  m.def("masked_norm_backward_cpu", &mae3d::masked_norm_backward_cpu, py::arg("grad_out"),
        py::arg("x"), py::arg("mask"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("var"), py::arg("count"), py::arg("instance"), py::arg("use_input_stats"),
        py::arg("eps"), py::arg("negative_slope"), py::arg("partials") = py::none(),
        py::arg("rank") = 0);
  m.def("masked_norm_bwd_partials_cpu", &mae3d::masked_norm_bwd_partials_cpu, py::arg("grad_out"),
        py::arg("x"), py::arg("mask"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("var"), py::arg("eps"), py::arg("negative_slope"));
  m.def("window_attention3d_fwd_cpu", &mae3d::window_attention3d_fwd_cpu, py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("table"), py::arg("window"), py::arg("shift"),
        py::arg("bias_window"), py::arg("scale"));
  m.def("window_attention3d_bwd_cpu", &mae3d::window_attention3d_bwd_cpu, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("table"), py::arg("window"), py::arg("shift"), py::arg("bias_window"),
        py::arg("scale"));
}
