// CPU kernels of mae3d::masked_norm (see mae3d/ops/masked_norm.py for the op itself).
//
// Shared conventions of the four stage functions:
//   x, grad_out : (B, C, D, H, W) float32/float64/float16/bfloat16, either contiguous (NCDHW) or
//                 channels_last_3d (NDHWC); grad_out has exactly the strides of x.
//   mask        : (B, S) uint8 contiguous, S = D*H*W, nonzero = visible voxel.
//   per-group tensors (mean, rstd, scale, shift, coef_a, coef_b): (B, C) contiguous, accumulation
//                 dtype (float64 for float64 input, float32 otherwise).
//   act(v)      : v if negative_slope is absent, else (v > 0 ? v : v * negative_slope).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mae3d {

// Partial statistics over visible voxels. Returns (count, mean, m2), each (B, C, K) in the
// accumulation dtype, K >= 1 chunks of the spatial axis; mean is 0 and m2 is 0 for empty chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_stats_cpu(const at::Tensor& x,
                                                                     const at::Tensor& mask);

// out = mask ? act(x * scale + shift) : 0, same dtype and memory format as x.
at::Tensor masked_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& mask,
                               const at::Tensor& scale, const at::Tensor& shift,
                               std::optional<double> negative_slope);

// dy = mask ? grad_out * act'(x * scale + shift) : 0, xhat = (x - mean) * rstd.
// Returns (sum_s dy, sum_s dy * xhat), each (B, C) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> masked_norm_bwd_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const at::Tensor& shift, std::optional<double> negative_slope);

// grad_x = mask ? scale * (dy - coef_a - xhat * coef_b) : 0, same dtype and layout as x.
at::Tensor masked_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& mask, const at::Tensor& mean,
                               const at::Tensor& rstd, const at::Tensor& scale,
                               const at::Tensor& shift, std::optional<double> negative_slope,
                               const at::Tensor& coef_a, const at::Tensor& coef_b);

}  // namespace mae3d
