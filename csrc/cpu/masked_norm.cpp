// CPU kernels of mae3d::masked_norm: visible-voxel statistics, the fused normalise + affine +
// (leaky) ReLU forward, and the two backward stages.
//
// Work splitting depends only on tensor shapes (never on the thread count) and every partial
// result has its own slot that is merged in a fixed order, so results are bitwise reproducible
// for any number of threads. Inner loops are branch-free (selects, not multiplies by the mask, so
// NaN/inf under masked voxels never leaks) so that `#pragma omp simd` vectorises them. Kernels are
// templates outside the AT_DISPATCH lambdas because pragmas are not allowed in macro arguments.
#include "masked_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mae3d {
namespace {

// float for float/half/bfloat16, double for double: half-precision sums lose too much.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per chunk: 16 KiB of float plus 4 KiB of mask stays in L1, so the second pass of the
// two-pass moments re-reads cache, not DRAM. Partial sums of this many floats (in 8 SIMD lanes)
// keep float rounding far below tolerance; chunks are then combined in double.
constexpr int64_t kChunk = 4096;
// Reductions are split into about this many tasks: enough to load-balance any realistic core
// count (e.g. B=1, C=3 with a large volume) while keeping K and the caller's merge small.
constexpr int64_t kTargetTasks = 64;
// Below this many elements per parallel_for call, thread wake-up costs more than it saves.
constexpr int64_t kGrain = 32768;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  int64_t B, C, S;
  bool channels_last;  // NDHWC storage; otherwise NCDHW.
  // Spatial chunk and task length (in voxels) of the reductions, and the task count per row
  // (NCDHW) or per sample (NDHWC). A chunk is ~kChunk elements in both layouts.
  int64_t chunk, step, tasks;
};

Geometry check_inputs(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.device().is_cpu() && mask.device().is_cpu(), "masked_norm (cpu): tensors must be on CPU");
  TORCH_CHECK(x.dim() == 5, "masked_norm (cpu): x must be 5-D (B, C, D, H, W), got ", x.dim(), "-D");
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4), false, kChunk, 0, 0};
  // C == 1 or S == 1 makes both predicates true; NCDHW indexing is then the right one.
  if (!x.is_contiguous()) {
    g.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
    TORCH_CHECK(g.channels_last, "masked_norm (cpu): x must be contiguous or channels_last_3d");
  }
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool,
              "masked_norm (cpu): mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == g.B && mask.size(1) == g.S && mask.is_contiguous(),
              "masked_norm (cpu): mask must be a contiguous (B, D*H*W) = (", g.B, ", ", g.S,
              ") tensor, got ", mask.sizes());
  const int64_t rows = g.channels_last ? g.B : g.B * g.C;
  if (g.channels_last) g.chunk = std::max<int64_t>(1, kChunk / g.C);
  const int64_t want = std::max<int64_t>(1, ceil_div(kTargetTasks, std::max<int64_t>(1, rows)));
  g.step = std::max<int64_t>(1, ceil_div(ceil_div(g.S, want), g.chunk)) * g.chunk;
  g.tasks = std::max<int64_t>(1, ceil_div(g.S, g.step));
  return g;
}

void check_grad(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.sizes() == x.sizes() && grad_out.strides() == x.strides(),
              "masked_norm (cpu): grad_out must match x in device, dtype, shape and strides");
}

template <typename A>
const A* group_ptr(const at::Tensor& t, const Geometry& g, const char* name) {
  constexpr auto kType = c10::CppTypeToScalarType<A>::value;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == kType && t.dim() == 2 && t.size(0) == g.B &&
                  t.size(1) == g.C && t.is_contiguous(),
              "masked_norm (cpu): ", name, " must be a contiguous (B, C) ", kType, " tensor, got ",
              t.scalar_type(), " ", t.sizes());
  return t.const_data_ptr<A>();
}

// Per-(b, c) parameters of the stages; pointers index as [b * C + c].
template <typename A>
struct Groups {
  const A *scale = nullptr, *shift = nullptr, *mean = nullptr, *rstd = nullptr;
  const A *coef_a = nullptr, *coef_b = nullptr;
  A slope = 0;
};

// Everything a kernel needs besides its outputs.
template <typename T>
struct Inputs {
  const T* x;
  const T* grad;  // null in the forward stages
  const uint8_t* mask;
};

template <typename T>
Inputs<T> inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor* grad = nullptr) {
  return {x.const_data_ptr<T>(), grad ? grad->const_data_ptr<T>() : nullptr,
          static_cast<const uint8_t*>(mask.const_data_ptr())};
}

// Preserve-format: x is dense, so the result gets exactly x's strides (the same element order
// the kernels assume for x), including the ambiguous strides of size-1 dims.
at::Tensor empty_out(const at::Tensor& x) { return at::empty_like(x); }

// Calls f(std::bool_constant<has_slope>) so that the leaky-ReLU select is compiled out if absent.
template <typename F>
void with_slope(const std::optional<double>& slope, F&& f) {
  if (slope.has_value()) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Upstream gradient through the activation; the pre-activation is recomputed rather than stored
// because the op is memory-bound.
template <bool kSlope, typename A>
inline A act_grad(A g, A xv, A sc, A sh, A slope) {
  if constexpr (kSlope) return xv * sc + sh > A(0) ? g : g * slope;
  return g;
}

template <bool kSlope, typename A>
inline A act(A v, A slope) {
  if constexpr (kSlope) return v > A(0) ? v : v * slope;
  return v;
}

// y where the voxel is visible, else +0. An AND with an all-ones/all-zeros bit mask rather than
// `m ? y : 0`: GCC 12 turns that select into a branch around the store and gives up vectorising.
// Like a select (and unlike y * m) it also drops NaN/inf computed from masked voxels.
template <typename A>
inline A keep_if(uint8_t m, A y) {
  using U = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  return std::bit_cast<A>(std::bit_cast<U>(y) & (U(0) - U(m != 0)));
}

// Running (count, mean, M2) in double, combined with Chan et al.'s pairwise update.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double n_ab = n + nb, d = mb - mean;
    mean += d * (nb / n_ab);
    m2 += m2b + d * d * (n * nb / n_ab);
    n = n_ab;
  }
};

// Chunk moments from sums over visible voxels of 1, x (pass 1) and of e = x - mu, e^2 (pass 2,
// mu = pass-1 mean). Adding the residual sum(e) back is the "corrected two-pass" algorithm: it
// cancels the rounding of mu, and no cancellation involves |mean|, so x = 1000 + N(0, 1) keeps a
// float-accurate variance.
inline void merge_chunk(Moments& acc, double cnt, double mu, double res, double sq) {
  acc.merge(cnt, mu + res / cnt, std::max(0.0, sq - res * res / cnt));
}

// ---- NCDHW: every (b, c) row is contiguous; the mask row of b is shared by its C rows. ----

template <typename T, typename A = acc_t<T>>
void stats_ncdhw(const Geometry& g, Inputs<T> in, A* cnt_out, A* mean_out, A* m2_out) {
  const int64_t S = g.S, K = g.tasks;
  at::parallel_for(0, g.B * g.C * K, ceil_div(kGrain, g.step), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / K, s0 = (t % K) * g.step, s1 = std::min(S, s0 + g.step);
      Moments acc;
      for (int64_t s = s0; s < s1; s += g.chunk) {
        const int64_t n = std::min(g.chunk, s1 - s);
        const T* __restrict x = in.x + row * S + s;
        const uint8_t* __restrict m = in.mask + (row / g.C) * S + s;
        A cnt = 0, sum = 0;
#pragma omp simd reduction(+ : cnt, sum)
        for (int64_t i = 0; i < n; ++i) {
          const bool v = m[i] != 0;
          cnt += v ? A(1) : A(0);
          sum += v ? static_cast<A>(x[i]) : A(0);
        }
        if (cnt == 0) continue;
        const A mu = sum / cnt;
        A res = 0, sq = 0;
#pragma omp simd reduction(+ : res, sq)
        for (int64_t i = 0; i < n; ++i) {
          const bool v = m[i] != 0;
          const A e = static_cast<A>(x[i]) - mu;
          res += v ? e : A(0);
          sq += v ? e * e : A(0);
        }
        merge_chunk(acc, cnt, mu, res, sq);
      }
      cnt_out[t] = static_cast<A>(acc.n);
      mean_out[t] = static_cast<A>(acc.mean);
      m2_out[t] = static_cast<A>(acc.m2);
    }
  });
}

template <bool kSlope, typename T, typename A = acc_t<T>>
void fwd_ncdhw(const Geometry& g, Inputs<T> in, const Groups<A>& p, T* out) {
  const int64_t S = g.S;
  at::parallel_for(0, g.B * g.C * S, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end;) {
      const int64_t row = i0 / S, s = i0 - row * S, n = std::min(S - s, end - i0);
      const T* __restrict x = in.x + i0;
      const uint8_t* __restrict m = in.mask + (row / g.C) * S + s;
      T* __restrict o = out + i0;
      const A sc = p.scale[row], sh = p.shift[row], slope = p.slope;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const A y = act<kSlope>(static_cast<A>(x[i]) * sc + sh, slope);
        o[i] = static_cast<T>(keep_if(m[i], y));
      }
      i0 += n;
    }
  });
}

// part[t] = {sum dy, sum dy * (x - mean)} of task t.
template <bool kSlope, typename T, typename A = acc_t<T>>
void bwd_reduce_ncdhw(const Geometry& g, Inputs<T> in, const Groups<A>& p, double* part) {
  const int64_t S = g.S, K = g.tasks;
  at::parallel_for(0, g.B * g.C * K, ceil_div(kGrain, g.step), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / K, s0 = (t % K) * g.step, s1 = std::min(S, s0 + g.step);
      const A sc = p.scale[row], sh = p.shift[row], mu = p.mean[row], slope = p.slope;
      double d1 = 0, d2 = 0;
      for (int64_t s = s0; s < s1; s += g.chunk) {
        const int64_t n = std::min(g.chunk, s1 - s);
        const T* __restrict x = in.x + row * S + s;
        const T* __restrict gr = in.grad + row * S + s;
        const uint8_t* __restrict m = in.mask + (row / g.C) * S + s;
        A a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t i = 0; i < n; ++i) {
          const bool v = m[i] != 0;
          const A xv = static_cast<A>(x[i]);
          const A dy = act_grad<kSlope>(static_cast<A>(gr[i]), xv, sc, sh, slope);
          a1 += v ? dy : A(0);
          a2 += v ? dy * (xv - mu) : A(0);
        }
        d1 += a1;
        d2 += a2;
      }
      part[2 * t] = d1;
      part[2 * t + 1] = d2;
    }
  });
}

template <bool kSlope, typename T, typename A = acc_t<T>>
void bwd_ncdhw(const Geometry& g, Inputs<T> in, const Groups<A>& p, T* out) {
  const int64_t S = g.S;
  at::parallel_for(0, g.B * g.C * S, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end;) {
      const int64_t row = i0 / S, s = i0 - row * S, n = std::min(S - s, end - i0);
      const T* __restrict x = in.x + i0;
      const T* __restrict gr = in.grad + i0;
      const uint8_t* __restrict m = in.mask + (row / g.C) * S + s;
      T* __restrict o = out + i0;
      const A sc = p.scale[row], sh = p.shift[row], mu = p.mean[row], ca = p.coef_a[row];
      const A w = p.rstd[row] * p.coef_b[row], slope = p.slope;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const A xv = static_cast<A>(x[i]);
        const A dy = act_grad<kSlope>(static_cast<A>(gr[i]), xv, sc, sh, slope);
        const A gx = sc * (dy - ca - (xv - mu) * w);
        o[i] = static_cast<T>(keep_if(m[i], gx));
      }
      i0 += n;
    }
  });
}

// ---- NDHWC: a voxel is C contiguous values; masked voxels are skipped (or zero-filled) whole,
// which saves their memory traffic. Reductions keep per-channel accumulator arrays. ----

template <typename T, typename A = acc_t<T>>
void stats_ndhwc(const Geometry& g, Inputs<T> in, A* cnt_out, A* mean_out, A* m2_out) {
  const int64_t S = g.S, C = g.C, K = g.tasks;
  at::parallel_for(0, g.B * K, ceil_div(kGrain, g.step * C), [&](int64_t begin, int64_t end) {
    std::vector<A> abuf(3 * C);
    std::vector<double> dbuf(2 * C);
    A* __restrict mu = abuf.data();
    A* __restrict res = mu + C;
    A* __restrict sq = res + C;
    double* __restrict dmean = dbuf.data();
    double* __restrict dm2 = dmean + C;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / K, k = t % K, v0 = k * g.step, v1 = std::min(S, v0 + g.step);
      const uint8_t* m = in.mask + b * S;
      double n = 0;
      std::fill(dbuf.begin(), dbuf.end(), 0.0);
      for (int64_t c0 = v0; c0 < v1; c0 += g.chunk) {
        const int64_t c1 = std::min(v1, c0 + g.chunk);
        int64_t cnt = 0;
        std::fill(abuf.begin(), abuf.end(), A(0));
        for (int64_t v = c0; v < c1; ++v) {
          if (!m[v]) continue;
          ++cnt;
          const T* __restrict x = in.x + (b * S + v) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) mu[c] += static_cast<A>(x[c]);
        }
        if (cnt == 0) continue;
        const A inv = A(1) / static_cast<A>(cnt);
        for (int64_t c = 0; c < C; ++c) mu[c] *= inv;
        for (int64_t v = c0; v < c1; ++v) {
          if (!m[v]) continue;
          const T* __restrict x = in.x + (b * S + v) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const A e = static_cast<A>(x[c]) - mu[c];
            res[c] += e;
            sq[c] += e * e;
          }
        }
        // Same Chan update as Moments::merge, with the count shared by all channels.
        const double nb = static_cast<double>(cnt), n_ab = n + nb, w = n * nb / n_ab;
        for (int64_t c = 0; c < C; ++c) {
          const double r = res[c], mb = double(mu[c]) + r / nb;
          const double d = mb - dmean[c];
          dmean[c] += d * (nb / n_ab);
          dm2[c] += std::max(0.0, double(sq[c]) - r * r / nb) + d * d * w;
        }
        n = n_ab;
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (b * C + c) * K + k;
        cnt_out[o] = static_cast<A>(n);
        mean_out[o] = static_cast<A>(dmean[c]);
        m2_out[o] = static_cast<A>(dm2[c]);
      }
    }
  });
}

template <bool kSlope, typename T, typename A = acc_t<T>>
void fwd_ndhwc(const Geometry& g, Inputs<T> in, const Groups<A>& p, T* out) {
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.B * S, ceil_div(kGrain, C), [&](int64_t begin, int64_t end) {
    for (int64_t vox = begin; vox < end; ++vox) {
      T* __restrict o = out + vox * C;
      if (!in.mask[vox]) {
        std::fill(o, o + C, static_cast<T>(0));
        continue;
      }
      const T* __restrict x = in.x + vox * C;
      const A* __restrict sc = p.scale + (vox / S) * C;
      const A* __restrict sh = p.shift + (vox / S) * C;
      const A slope = p.slope;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<T>(act<kSlope>(static_cast<A>(x[c]) * sc[c] + sh[c], slope));
      }
    }
  });
}

// part[t * 2C + {0, C} + c] = {sum dy, sum dy * (x - mean)} of channel c in task t.
template <bool kSlope, typename T, typename A = acc_t<T>>
void bwd_reduce_ndhwc(const Geometry& g, Inputs<T> in, const Groups<A>& p, double* part) {
  const int64_t S = g.S, C = g.C, K = g.tasks;
  at::parallel_for(0, g.B * K, ceil_div(kGrain, g.step * C), [&](int64_t begin, int64_t end) {
    std::vector<A> abuf(2 * C);
    A* __restrict a1 = abuf.data();
    A* __restrict a2 = a1 + C;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / K, v0 = (t % K) * g.step, v1 = std::min(S, v0 + g.step);
      const A* __restrict sc = p.scale + b * C;
      const A* __restrict sh = p.shift + b * C;
      const A* __restrict mu = p.mean + b * C;
      const A slope = p.slope;
      double* __restrict d1 = part + t * 2 * C;
      double* __restrict d2 = d1 + C;
      std::fill(d1, d1 + 2 * C, 0.0);
      for (int64_t c0 = v0; c0 < v1; c0 += g.chunk) {
        const int64_t c1 = std::min(v1, c0 + g.chunk);
        std::fill(abuf.begin(), abuf.end(), A(0));
        for (int64_t v = c0; v < c1; ++v) {
          if (!in.mask[b * S + v]) continue;
          const T* __restrict x = in.x + (b * S + v) * C;
          const T* __restrict gr = in.grad + (b * S + v) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const A xv = static_cast<A>(x[c]);
            const A dy = act_grad<kSlope>(static_cast<A>(gr[c]), xv, sc[c], sh[c], slope);
            a1[c] += dy;
            a2[c] += dy * (xv - mu[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += a1[c];
          d2[c] += a2[c];
        }
      }
    }
  });
}

template <bool kSlope, typename T, typename A = acc_t<T>>
void bwd_ndhwc(const Geometry& g, Inputs<T> in, const Groups<A>& p, T* out) {
  const int64_t S = g.S, C = g.C;
  at::parallel_for(0, g.B * S, ceil_div(kGrain, C), [&](int64_t begin, int64_t end) {
    for (int64_t vox = begin; vox < end; ++vox) {
      T* __restrict o = out + vox * C;
      if (!in.mask[vox]) {
        std::fill(o, o + C, static_cast<T>(0));
        continue;
      }
      const int64_t j = (vox / S) * C;
      const T* __restrict x = in.x + vox * C;
      const T* __restrict gr = in.grad + vox * C;
      const A* __restrict sc = p.scale + j;
      const A* __restrict sh = p.shift + j;
      const A* __restrict mu = p.mean + j;
      const A* __restrict rs = p.rstd + j;
      const A* __restrict ca = p.coef_a + j;
      const A* __restrict cb = p.coef_b + j;
      const A slope = p.slope;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A xv = static_cast<A>(x[c]);
        const A dy = act_grad<kSlope>(static_cast<A>(gr[c]), xv, sc[c], sh[c], slope);
        o[c] = static_cast<T>(sc[c] * (dy - ca[c] - (xv - mu[c]) * rs[c] * cb[c]));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_stats_cpu(const at::Tensor& x,
                                                                     const at::Tensor& mask) {
  const Geometry g = check_inputs(x, mask);
  at::Tensor count, mean, m2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_stats_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    count = at::empty({g.B, g.C, g.tasks}, opts);
    mean = at::empty({g.B, g.C, g.tasks}, opts);
    m2 = at::empty({g.B, g.C, g.tasks}, opts);
    const auto in = inputs<scalar_t>(x, mask);
    auto kernel = g.channels_last ? stats_ndhwc<scalar_t> : stats_ncdhw<scalar_t>;
    kernel(g, in, count.mutable_data_ptr<A>(), mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>());
  });
  return {count, mean, m2};
}

at::Tensor masked_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale,
                               const at::Tensor& shift, std::optional<double> negative_slope) {
  const Geometry g = check_inputs(x, mask);
  at::Tensor out = empty_out(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    Groups<A> p;
    p.scale = group_ptr<A>(scale, g, "scale");
    p.shift = group_ptr<A>(shift, g, "shift");
    p.slope = static_cast<A>(negative_slope.value_or(0.0));
    const auto in = inputs<scalar_t>(x, mask);
    with_slope(negative_slope, [&](auto has_slope) {
      constexpr bool kSlope = decltype(has_slope)::value;
      auto kernel = g.channels_last ? fwd_ndhwc<kSlope, scalar_t> : fwd_ncdhw<kSlope, scalar_t>;
      kernel(g, in, p, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_norm_bwd_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& scale, const at::Tensor& shift,
    std::optional<double> negative_slope) {
  const Geometry g = check_inputs(x, mask);
  check_grad(grad_out, x);
  at::Tensor sum_dy, sum_dy_xhat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_bwd_reduce_cpu", [&] {
    using A = acc_t<scalar_t>;
    Groups<A> p;
    p.scale = group_ptr<A>(scale, g, "scale");
    p.shift = group_ptr<A>(shift, g, "shift");
    p.mean = group_ptr<A>(mean, g, "mean");
    const A* rstd_p = group_ptr<A>(rstd, g, "rstd");
    p.slope = static_cast<A>(negative_slope.value_or(0.0));
    const auto in = inputs<scalar_t>(x, mask, &grad_out);
    // Per-task partial sums in double, one slot per task: reduced below in a fixed order, so no
    // atomics and no dependence on the thread count.
    const int64_t B = g.B, C = g.C, K = g.tasks;
    std::vector<double> part(B * C * K * 2);
    with_slope(negative_slope, [&](auto has_slope) {
      constexpr bool kSlope = decltype(has_slope)::value;
      auto kernel = g.channels_last ? bwd_reduce_ndhwc<kSlope, scalar_t> : bwd_reduce_ncdhw<kSlope, scalar_t>;
      kernel(g, in, p, part.data());
    });
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    sum_dy = at::empty({B, C}, opts);
    sum_dy_xhat = at::empty({B, C}, opts);
    A* o1 = sum_dy.mutable_data_ptr<A>();
    A* o2 = sum_dy_xhat.mutable_data_ptr<A>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = g.channels_last ? (b * K + k) * 2 * C + c : ((b * C + c) * K + k) * 2;
          s1 += part[i];
          s2 += part[i + (g.channels_last ? C : 1)];
        }
        // rstd is constant per group, so xhat's scaling is applied once to the sum.
        o1[b * C + c] = static_cast<A>(s1);
        o2[b * C + c] = static_cast<A>(s2 * rstd_p[b * C + c]);
      }
    }
  });
  return {sum_dy, sum_dy_xhat};
}

at::Tensor masked_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                               const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
                               const at::Tensor& shift, std::optional<double> negative_slope,
                               const at::Tensor& coef_a, const at::Tensor& coef_b) {
  const Geometry g = check_inputs(x, mask);
  check_grad(grad_out, x);
  at::Tensor grad_x = empty_out(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Groups<A> p{group_ptr<A>(scale, g, "scale"),   group_ptr<A>(shift, g, "shift"),
                      group_ptr<A>(mean, g, "mean"),     group_ptr<A>(rstd, g, "rstd"),
                      group_ptr<A>(coef_a, g, "coef_a"), group_ptr<A>(coef_b, g, "coef_b"),
                      static_cast<A>(negative_slope.value_or(0.0))};
    const auto in = inputs<scalar_t>(x, mask, &grad_out);
    with_slope(negative_slope, [&](auto has_slope) {
      constexpr bool kSlope = decltype(has_slope)::value;
      auto kernel = g.channels_last ? bwd_ndhwc<kSlope, scalar_t> : bwd_ncdhw<kSlope, scalar_t>;
      kernel(g, in, p, grad_x.mutable_data_ptr<scalar_t>());
    });
  });
  return grad_x;
}

}  // namespace mae3d
