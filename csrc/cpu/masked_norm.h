// CPU kernels of mae3d::masked_norm (see mae3d/ops/masked_norm.py for the op itself).
//
// The backend contract, shared by the Triton launchers (kernels/masked_norm.py) and the torch
// reference backend (mae3d/ops/_torch_backends/masked_norm.py):
//   x, grad_out : (B, C, D, H, W) float32/float64/float16/bfloat16, either contiguous (NCDHW) or
//                 channels_last_3d (NDHWC); grad_out has the memory format of x.
//   mask        : (B, S) uint8 or bool, S = D*H*W, unit voxel stride, any batch stride (0: one mask
//                 row for the whole batch); nonzero = visible voxel. None = every voxel visible.
//   weight, bias, running_mean, running_var : (C,) contiguous floating tensors or None.
//   statistics  : mean, biased var and visible count per group, (B, C) in instance mode with input
//                 statistics, else (C,), in the accumulation dtype (float64 for float64 input,
//                 float32 otherwise).
//   partials    : every rank's partial statistics, (world, 3, C, P) (count, mean, M2) for the
//                 forward and (world, 2, C, P) (sum dy, sum dy * xhat) for the backward: batch mode
//                 across ranks only; P depends on the backend, not on the shapes.
//   act(v)      : v if negative_slope is absent, else (v > 0 ? v : v * negative_slope).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mae3d {

// The whole forward: statistics (from x, from `partials` when given, or the running statistics
// when !use_input_stats), then out = mask ? act(xhat * weight + bias) : 0 in the layout of x.
// With use_input_stats and a nonzero momentum, running_mean/var (if given) are updated in place
// like nn.BatchNorm3d / nn.InstanceNorm3d (unbiased variance; groups without a visible voxel do not
// count). Returns (out, mean, var, count); count is 0 when no statistics were taken.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_norm_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool instance, bool use_input_stats, double eps, std::optional<double> negative_slope,
    double momentum, const std::optional<at::Tensor>& partials);

// This rank's batch statistics as partials, (1, 3, C, 1).
at::Tensor masked_norm_partials_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask);

// The whole backward: dy = mask ? grad_out * act'(x * scale + shift) : 0 and
// grad_x = mask ? scale * (dy - mean(dy) - xhat * mean(dy * xhat)) : 0 per group (the means over
// the group's visible voxels, of every rank when `partials` is given; 0 without input
// statistics). Returns (grad_x, grad_weight, grad_bias); the latter two are this rank's sums,
// empty without weight (bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count, bool instance,
    bool use_input_stats, double eps, std::optional<double> negative_slope,
    const std::optional<at::Tensor>& partials, int64_t rank);

// This rank's batch-mode (sum dy, sum dy * xhat) as partials, (1, 2, C, 1).
at::Tensor masked_norm_bwd_partials_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& var, double eps,
    std::optional<double> negative_slope);

}  // namespace mae3d
