// CPU kernels of mae3d::window_attention3d (see mae3d/ops/window_attention.py for the op itself).
//
// Shared conventions:
//   q, k, v, grad_out : (B, D, H, W, heads, head_dim), float32/float64/float16/bfloat16, any
//                       strides with a unit stride on head_dim (e.g. slices of a qkv linear's
//                       output); D, H, W are multiples of the window (the op pads before).
//   out               : (B, D, H, W, heads, head_dim) contiguous, dtype of q.
//   lse               : (B, D, H, W, heads) contiguous, log-sum-exp of every query row's logits,
//                       in the accumulation dtype (float64 for float64 input, float32 otherwise).
//   table             : optional ((2Bd-1)(2Bh-1)(2Bw-1), heads) bias table, Bx = bias_window.
//   window, shift, bias_window : three ints each; 0 <= shift < window <= bias_window.
// Window w of the grid rolled by -shift holds the tokens ((w_d*Wd + a + Sd) mod D, ...): tokens
// are gathered from and scattered to their unrolled positions, so the roll never materialises.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace mae3d {

// Returns (out, lse).
std::tuple<at::Tensor, at::Tensor> window_attention3d_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, std::vector<int64_t> window,
    std::vector<int64_t> shift, std::vector<int64_t> bias_window, double scale);

// Returns (grad_q, grad_k, grad_v, grad_table); grad_* are contiguous in the dtype of q; grad_table
// has the table's shape and dtype (an empty tensor without a table). The table gradient is summed
// over windows and samples in a fixed order: bitwise reproducible for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention3d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& table,
    std::vector<int64_t> window, std::vector<int64_t> shift, std::vector<int64_t> bias_window,
    double scale);

}  // namespace mae3d
