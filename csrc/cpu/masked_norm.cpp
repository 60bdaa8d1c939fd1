// CPU kernels of mae3d::masked_norm: the whole forward and backward pass per call (statistics,
// normalise + affine + (leaky) ReLU, running-statistics update; the backward's reductions and
// input gradient), nothing left to torch between the stages.
//
// NCDHW (the layout of the nnU-Net / S3D models): one task owns a few channels of one sample
// (instance mode) or of the whole batch (batch mode) and runs their statistics and, while the
// rows are still in cache, their normalisation (backward: its reductions, then the input
// gradient): one pass over the group. NDHWC: reduction tasks over (sample, voxel run) write
// partials, merged in a fixed order, then an elementwise pass.
//
// Every reduction has its own output slot and is merged in a fixed order: results are bitwise
// identical for any thread count. Inner loops are branch-free so that `#pragma omp simd`
// vectorises them; masked voxels are removed with bit-mask selects, never by multiplying with the
// mask, so NaN/inf stored under them cannot leak. Kernels are reached through dispatch(), so that
// no loop pragma sits inside an AT_DISPATCH macro argument (pragmas are not allowed there).
//
// Build note: with torch's OpenMP backend at::parallel_for is header-only and runs serially unless
// this file is compiled with -fopenmp.
#include "masked_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mae3d {
namespace {

// float for float/half/bfloat16, double for double: half-precision sums lose too much.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename A>
using bits_t = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;

// A reduction chunk is ~kChunk elements. Its x (32 KiB of float) and lane masks stay in L2 for
// the second pass of the two-pass moments, and runs this long keep the hardware prefetchers
// streaming (1K-voxel NCDHW chunks measured 1.7x slower). Float partial sums over a chunk
// keep rounding far below tolerance; chunks are combined in double.
constexpr int64_t kChunk = 8192;
// Reductions are split into about this many tasks: enough to load-balance any realistic core
// count (e.g. B=1, C=3 with a large volume) while keeping K and the merges small.
constexpr int64_t kTargetTasks = 64;
// Below this many elements per parallel_for call, waking threads costs more than it saves.
constexpr int64_t kGrain = 32768;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Branch-free `c ? a : b` on bit patterns: GCC 12 turns a plain ?: whose arms differ in cost, or
// that feeds a store, into a branch and then gives up vectorising the loop.
template <typename A>
inline A select(bool c, A a, A b) {
  using U = bits_t<A>;
  const U m = U(0) - U(c);
  return std::bit_cast<A>((std::bit_cast<U>(a) & m) | (std::bit_cast<U>(b) & ~m));
}
template <typename A>
inline A keep_if(uint8_t m, A y) { return select(m != 0, y, A(0)); }
template <typename A>
inline A keep_bits(bits_t<A> k, A y) { return std::bit_cast<A>(std::bit_cast<bits_t<A>>(y) & k); }

// Element access. Half/bfloat16 are handled as raw bits with branch-free conversions, as the
// c10 class conversions (a temporary object, branches) block vectorisation. The fp16 pair is
// c10's own algorithm (from the FP16 library) with `select` for ?:, so results match torch's
// conversions bit for bit (round to nearest even, subnormals, inf, NaN).
template <typename T>
struct Io {  // float, double
  using raw_t = T;
  static T load(T v) { return v; }
  static T store(T v) { return v; }
};
template <>
struct Io<c10::BFloat16> {
  using raw_t = uint16_t;
  static float load(uint16_t v) { return std::bit_cast<float>(uint32_t(v) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    return static_cast<uint16_t>(select(f != f, 0x7FC0u, (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
  }
};
template <>
struct Io<c10::Half> {
  using raw_t = uint16_t;
  static float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16, two_w = w + w;
    const float normal = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
    const float mag = select(two_w < (1u << 27), subnormal, normal);
    return std::bit_cast<float>((w & 0x80000000u) | std::bit_cast<uint32_t>(mag));
  }
  static uint16_t store(float f) {
    const uint32_t w = std::bit_cast<uint32_t>(f), shl1_w = w + w;
    const float mag = std::bit_cast<float>(w & 0x7FFFFFFFu);
    const uint32_t exp = shl1_w & 0xFF000000u, bias = select(exp < 0x71000000u, 0x71000000u, exp);
    const uint32_t bits = std::bit_cast<uint32_t>(std::bit_cast<float>((bias >> 1) + 0x07800000u) +
                                                  (mag * 0x1.0p+112f) * 0x1.0p-110f);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const uint32_t sign = (w & 0x80000000u) >> 16;
    return static_cast<uint16_t>(sign | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};
template <typename T>
using raw_t = typename Io<T>::raw_t;

template <bool kSlope, typename A>
inline A act(A v, A slope) {
  if constexpr (kSlope) return select(v > A(0), v, v * slope);
  return v;
}

// Upstream gradient through the activation; the pre-activation is recomputed, not stored,
// because the op is memory-bound.
template <bool kSlope, typename A>
inline A act_grad(A g, A xv, A sc, A sh, A slope) {
  if constexpr (kSlope) return select(xv * sc + sh > A(0), g, g * slope);
  return g;
}

// rstd, scale, shift of a group from its (rounded) statistics: one expression for forward and
// backward, so the backward's LeakyReLU branch matches the forward's bit for bit.
template <typename A>
struct Coef {
  A rstd, scale, shift;
};
template <typename A>
inline Coef<A> coef(A mean, A var, A eps, A w, A b) {
  const A rstd = A(1) / std::sqrt(var + eps);
  return {rstd, rstd * w, b - mean * rstd * w};
}

// Running (count, mean, M2) in double, combined with Chan et al.'s pairwise update.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  // Adds a chunk given its count, first-pass mean mu, and the sums of e = x - mu and e^2 over
  // its visible voxels. Adding sum(e) back ("corrected two-pass") cancels the rounding of mu,
  // and no cancellation involves |mean|: x = 1000 + N(0, 1) keeps a float-accurate variance.
  void add_chunk(double nb, double mu, double res, double sq) {
    add(nb, mu + res / nb, std::max(0.0, sq - res * res / nb));
  }
  void add(double nb, double mb, double m2b) {
    if (nb <= 0) return;
    const double n_ab = n + nb, d = mb - mean;
    mean += d * (nb / n_ab);
    m2 += m2b + d * d * (n * nb / n_ab);
    n = n_ab;
  }
  double var() const { return n > 0 ? m2 / n : 0.0; }
};

// s1, s2 = sums over i in [0, n) of what term(i, s1, s2) adds, as four partial sums over the
// quarters of the range. With one accumulator per sum the loop is bound by FP-add latency
// (~4 cycles per vector); four independent chains measured 2x faster.
template <typename A, typename F>
inline void sum2(int64_t n, A& s1, A& s2, F&& term) {
  const int64_t q = n / 4;
  A a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t i = 0; i < q; ++i) {
    term(i, a0, b0);
    term(i + q, a1, b1);
    term(i + 2 * q, a2, b2);
    term(i + 3 * q, a3, b3);
  }
  for (int64_t i = 4 * q; i < n; ++i) term(i, a0, b0);
  s1 = (a0 + a1) + (a2 + a3);
  s2 = (b0 + b1) + (b2 + b3);
}

// All-ones / zero lane masks for a chunk of a mask row (shared by all channels of an NCDHW
// task); returns the chunk's visible count.
template <typename U>
int64_t lane_masks(const uint8_t* __restrict m, int64_t n, U* __restrict keep) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    keep[i] = U(0) - U(m[i] != 0);
    cnt += m[i] != 0;
  }
  return cnt;
}

// ---- Geometry, inputs --------------------------------------------------------------------

// A reduction task: sample b, channels [c0, c1), voxels [v0, v1) = the k-th of `pieces` runs.
struct Task {
  int64_t b, k, c0, c1, v0, v1;
};
struct Geometry {
  int64_t B, C, S;
  int64_t ms;          // mask row (batch) stride; 0: one row for every sample
  bool channels_last;  // NDHWC storage; otherwise NCDHW.
  int64_t chunk, step, pieces, group, groups;  // chunk and step in voxels, group in channels

  int64_t num_tasks() const { return B * groups * pieces; }
  int64_t grain() const { return ceil_div(kGrain, step * group); }
  Task task(int64_t t) const {
    const int64_t k = t % pieces, grp = (t / pieces) % groups, b = t / (pieces * groups);
    return {b, k, grp * group, std::min(C, (grp + 1) * group), k * step,
            std::min(S, (k + 1) * step)};
  }
};

// The mask as a row pointer and stride; an absent mask is one all-visible row.
struct Mask {
  std::vector<uint8_t> ones;
  const uint8_t* ptr = nullptr;
};

Geometry check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& mask, Mask& mv) {
  TORCH_CHECK(x.device().is_cpu(), "masked_norm (cpu): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 5, "masked_norm (cpu): x must be (B, C, D, H, W), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "masked_norm (cpu): x must be float32/float64/float16/bfloat16, got ", dt);
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4), 0, false, 0, 0, 0, 0, 0};
  // C == 1 or S == 1 makes both predicates true; NCDHW indexing is then the right one.
  if (!x.is_contiguous()) {
    g.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
    TORCH_CHECK(g.channels_last, "masked_norm (cpu): x must be contiguous or channels_last_3d");
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "masked_norm (cpu): mask must be a CPU tensor, got ",
                m.device());
    TORCH_CHECK(m.scalar_type() == at::kByte || m.scalar_type() == at::kBool,
                "masked_norm (cpu): mask must be uint8 or bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == g.B && m.size(1) == g.S &&
                    (m.stride(1) == 1 || g.S <= 1) && m.stride(0) >= 0,
                "masked_norm (cpu): mask must be a (B, D*H*W) = (", g.B, ", ", g.S,
                ") tensor with unit voxel stride, got ", m.sizes(), " with strides ", m.strides());
    mv.ptr = static_cast<const uint8_t*>(m.const_data_ptr());
    g.ms = g.B > 1 ? m.stride(0) : g.S;
  } else {
    mv.ones.assign(std::max<int64_t>(g.S, 1), 1);
    mv.ptr = mv.ones.data();
    g.ms = 0;
  }
  // NCDHW tasks may take a subset of channels (for parallelism when B * pieces is small): they
  // share the lane masks of a chunk. NDHWC tasks take all channels of contiguous voxels.
  const int64_t C = std::max<int64_t>(1, g.C), B = std::max<int64_t>(1, g.B);
  g.chunk = g.channels_last ? std::max<int64_t>(1, kChunk / C) : kChunk;
  const int64_t run = ceil_div(g.S, ceil_div(kTargetTasks, B));  // voxels per task, before rounding
  g.step = std::max<int64_t>(1, ceil_div(run, g.chunk)) * g.chunk;
  g.pieces = std::max<int64_t>(1, ceil_div(g.S, g.step));
  g.group = g.channels_last ? C : ceil_div(C, std::min(C, ceil_div(kTargetTasks, B * g.pieces)));
  g.groups = ceil_div(g.C, g.group);
  return g;
}

// grad_out is indexed like x. Its layout is compared, not its strides: those of size-1 dims
// are arbitrary and may legitimately differ from x's.
void check_grad(const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g) {
  const auto fmt =
      g.channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad_out.device().is_cpu(), "masked_norm (cpu): grad_out must be a CPU tensor, got ",
              grad_out.device());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "masked_norm (cpu): grad_out must have the shape of x ",
              x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "masked_norm (cpu): grad_out must be ",
              x.scalar_type(), " like x, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous(fmt),
              "masked_norm (cpu): grad_out must have the memory format of x (", fmt, ")");
}

// A (C,) parameter or buffer as accumulation-dtype values (`fill` when absent).
template <typename A>
std::vector<A> per_channel(const std::optional<at::Tensor>& t, const Geometry& g, const char* name,
                           A fill) {
  if (!t.has_value()) return std::vector<A>(g.C, fill);
  TORCH_CHECK(t->device().is_cpu() && t->is_floating_point() && t->dim() == 1 &&
                  t->size(0) == g.C,
              "masked_norm (cpu): ", name, " must be a floating (C,) = (", g.C,
              ") CPU tensor, got ", t->scalar_type(), " ", t->sizes());
  const at::Tensor v = t->to(c10::CppTypeToScalarType<A>::value).contiguous();
  const A* p = v.const_data_ptr<A>();
  return std::vector<A>(p, p + g.C);
}

// Per-group statistics as given (shape (B, C) or (C,), accumulation dtype).
template <typename A>
const A* group_ptr(const at::Tensor& t, const Geometry& g, bool per_sample, const char* name) {
  constexpr auto kType = c10::CppTypeToScalarType<A>::value;
  const bool shape_ok = per_sample ? (t.dim() == 2 && t.size(0) == g.B && t.size(1) == g.C)
                                   : (t.dim() == 1 && t.size(0) == g.C);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == kType && shape_ok && t.is_contiguous(),
              "masked_norm (cpu): ", name, " must be a contiguous ", per_sample ? "(B, C)" : "(C,)",
              " ", kType, " tensor, got ", t.scalar_type(), " ", t.sizes());
  return t.const_data_ptr<A>();
}

// Kernel arguments; per-group pointers index as [b * C + c].
template <typename T, typename A = acc_t<T>>
struct Args {
  const raw_t<T>* x;
  const raw_t<T>* grad;
  const uint8_t* mask;
  int64_t ms;
  A slope;
  const A *scale = nullptr, *shift = nullptr, *mean = nullptr, *rstd = nullptr;
  const A *coef_a = nullptr, *coef_b = nullptr;
  const uint8_t* row(int64_t b) const { return mask + b * ms; }
};

template <typename T>
Args<T> make_args(const at::Tensor& x, const Mask& mv, const Geometry& g, const at::Tensor* grad,
                  std::optional<double> slope) {
  return {static_cast<const raw_t<T>*>(x.const_data_ptr()),
          grad ? static_cast<const raw_t<T>*>(grad->const_data_ptr()) : nullptr, mv.ptr, g.ms,
          static_cast<acc_t<T>>(slope.value_or(0.0))};
}

template <typename T>
raw_t<T>* out_ptr(at::Tensor& out) { return static_cast<raw_t<T>*>(out.mutable_data_ptr()); }

// Calls f(scalar_t{}) for the dtype of x.
template <typename F>
void dispatch(const at::Tensor& x, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_norm_cpu",
                                  [&] { f(scalar_t{}); });
}

// Calls f(bool_constant<has_slope>): the choice is compiled into the inner loops.
template <typename F>
void with_slope(const std::optional<double>& slope, F&& f) {
  slope.has_value() ? f(std::true_type{}) : f(std::false_type{});
}

// Calls f(i0, n, m, j) for the runs of flat elements [begin, end) along which only x changes:
// NCDHW runs lie in one (b, c) row (mask m advances with i, group index j is fixed); NDHWC runs
// lie in one voxel (m is fixed, j = b * C + c advances with i).
template <typename T, typename F>
void for_runs(const Geometry& g, const Args<T>& a, int64_t begin, int64_t end, F&& f) {
  const int64_t len = g.channels_last ? g.C : g.S;
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t r = i0 / len, off = i0 - r * len, n = std::min(len - off, end - i0);
    if (g.channels_last) {
      const int64_t b = r / g.S;
      f(i0, n, a.row(b) + (r - b * g.S), b * g.C + off);
    } else {
      f(i0, n, a.row(r / g.C) + off, r);
    }
    i0 += n;
  }
}

// ---- NCDHW: one pass per group --------------------------------------------------------------

// The tasks of the fused NCDHW passes: channel group grp of sample b (instance mode) or of every
// sample (batch mode).
struct Fused {
  int64_t per, group, groups, tasks;  // per: samples per task; group: channels per task
  int64_t b0(int64_t t) const { return per == 1 ? t / groups : 0; }
  int64_t c0(int64_t t) const { return (t % groups) * group; }
};
Fused fused_tasks(const Geometry& g, bool instance) {
  const int64_t per = instance ? 1 : g.B, rows = instance ? std::max<int64_t>(g.B, 1) : 1;
  const int64_t C = std::max<int64_t>(g.C, 1);
  const int64_t group = ceil_div(C, std::min(C, ceil_div(kTargetTasks, rows)));
  const int64_t groups = ceil_div(g.C, group);
  return {per, group, groups, (instance ? g.B : 1) * groups};
}

// Statistics of the task's groups into acc[c - c0] (Moments per channel, over its samples).
template <typename T, typename A = acc_t<T>>
void group_moments(const Geometry& g, const Args<T>& a, int64_t b0, int64_t b1, int64_t c0,
                   int64_t c1, std::vector<bits_t<A>>& keep, Moments* acc) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t s = 0; s < g.S; s += g.chunk) {
      const int64_t n = std::min(g.chunk, g.S - s);
      const int64_t cnt = lane_masks(a.row(b) + s, n, keep.data());
      if (cnt == 0) continue;
      const bits_t<A>* __restrict kp = keep.data();
      for (int64_t c = c0; c < c1; ++c) {
        const raw_t<T>* __restrict x = a.x + (b * g.C + c) * g.S + s;
        A sum, unused, r, q;
        sum2(n, sum, unused, [&](int64_t i, A& s1, A&) {
          s1 += keep_bits(kp[i], Io<T>::load(x[i]));
        });
        const A mean = sum / static_cast<A>(cnt);
        sum2(n, r, q, [&](int64_t i, A& s1, A& s2) {
          const A e = keep_bits(kp[i], Io<T>::load(x[i]) - mean);
          s1 += e;
          s2 += e * e;
        });
        acc[c - c0].add_chunk(cnt, mean, r, q);
      }
    }
  }
}

template <bool kSlope, typename T, typename A = acc_t<T>>
inline void normalize_row(const Args<T>& a, const uint8_t* __restrict m,
                          const raw_t<T>* __restrict x, raw_t<T>* __restrict o, int64_t n, A sc,
                          A sh) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    o[i] = Io<T>::store(keep_if(m[i], act<kSlope>(Io<T>::load(x[i]) * sc + sh, a.slope)));
  }
}

// Forward: per task, statistics of its groups, then their normalisation. Writes out and the
// per-group mean/var/count (index b * C + c in instance mode, c in batch mode).
template <bool kSlope, typename T, typename A = acc_t<T>>
void fused_fwd_nc(const Geometry& g, const Args<T>& a, bool instance, const std::vector<A>& w,
                  const std::vector<A>& bias, A eps, raw_t<T>* out, A* mean, A* var, A* count) {
  const Fused f = fused_tasks(g, instance);
  at::parallel_for(0, f.tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<bits_t<A>> keep(g.chunk);
    std::vector<Moments> acc(f.group);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = f.b0(t), b1 = b0 + f.per;
      const int64_t c0 = f.c0(t), c1 = std::min(g.C, c0 + f.group);
      std::fill(acc.begin(), acc.end(), Moments{});
      group_moments<T>(g, a, b0, b1, c0, c1, keep, acc.data());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j = instance ? b0 * g.C + c : c;
        const Moments& M = acc[c - c0];
        mean[j] = static_cast<A>(M.mean);
        var[j] = static_cast<A>(M.var());
        count[j] = static_cast<A>(M.n);
        const Coef<A> k = coef<A>(mean[j], var[j], eps, w[c], bias[c]);
        for (int64_t b = b0; b < b1; ++b) {
          normalize_row<kSlope, T>(a, a.row(b), a.x + (b * g.C + c) * g.S,
                                   out + (b * g.C + c) * g.S, g.S, k.scale, k.shift);
        }
      }
    }
  });
}

// Backward: per task, the sums of dy and dy * (x - mean) of its groups, then the input gradient.
// `sums` gets (sum dy, sum dy * xhat) per group (index as in fused_fwd_nc), for the weight and
// bias gradients. a.mean/rstd/scale/shift index per (b, c).
template <bool kSlope, typename T, typename A = acc_t<T>>
void fused_bwd_nc(const Geometry& g, const Args<T>& a, bool instance, bool input_stats,
                  bool need_sums, const A* count, raw_t<T>* out, double* sums) {
  const Fused f = fused_tasks(g, instance);
  at::parallel_for(0, f.tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<bits_t<A>> keep(g.chunk);
    std::vector<double> s(2 * f.group);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = f.b0(t), b1 = b0 + f.per;
      const int64_t c0 = f.c0(t), c1 = std::min(g.C, c0 + f.group);
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t b = b0; b < b1 && need_sums; ++b) {
        for (int64_t v = 0; v < g.S; v += g.chunk) {
          const int64_t n = std::min(g.chunk, g.S - v);
          if (lane_masks(a.row(b) + v, n, keep.data()) == 0) continue;
          const bits_t<A>* __restrict kp = keep.data();
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t j = b * g.C + c;
            const raw_t<T>* __restrict x = a.x + j * g.S + v;
            const raw_t<T>* __restrict gr = a.grad + j * g.S + v;
            const A sc = a.scale[j], sh = a.shift[j], mu = a.mean[j];
            A s1, s2;
            sum2(n, s1, s2, [&](int64_t i, A& u1, A& u2) {
              const A xv = Io<T>::load(x[i]);
              const A dy = act_grad<kSlope>(Io<T>::load(gr[i]), xv, sc, sh, a.slope);
              u1 += keep_bits(kp[i], dy);
              u2 += keep_bits(kp[i], dy * (xv - mu));
            });
            s[2 * (c - c0)] += s1;
            s[2 * (c - c0) + 1] += s2;
          }
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t gi = instance ? b0 * g.C + c : c;
        const A rs = a.rstd[b0 * g.C + c];
        const double s_dy = s[2 * (c - c0)], s_dyx = s[2 * (c - c0) + 1] * rs;
        sums[2 * gi] = s_dy;
        sums[2 * gi + 1] = s_dyx;
        const double inv_n = input_stats ? 1.0 / std::max<double>(count[gi], 1.0) : 0.0;
        const A ca = static_cast<A>(s_dy * inv_n), cb = static_cast<A>(s_dyx * inv_n);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j = b * g.C + c;
          const raw_t<T>* __restrict x = a.x + j * g.S;
          const raw_t<T>* __restrict gr = a.grad + j * g.S;
          raw_t<T>* __restrict o = out + j * g.S;
          const uint8_t* __restrict m = a.row(b);
          const A sc = a.scale[j], sh = a.shift[j], mu = a.mean[j], rcb = rs * cb;
#pragma omp simd
          for (int64_t i = 0; i < g.S; ++i) {
            const A xv = Io<T>::load(x[i]);
            const A dy = act_grad<kSlope>(Io<T>::load(gr[i]), xv, sc, sh, a.slope);
            o[i] = Io<T>::store(keep_if(m[i], sc * (dy - ca - (xv - mu) * rcb)));
          }
        }
      }
    }
  });
}

// ---- Partial reductions (NDHWC, and batch partials across ranks) --------------------------

// part[(b * C + c) * pieces + k] = the Moments of a task's voxels of channel c.
template <bool kCL, typename T, typename A = acc_t<T>>
void stats_kernel(const Geometry& g, const Args<T>& a, Moments* part) {
  at::parallel_for(0, g.num_tasks(), g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<bits_t<A>> keep(g.chunk);
    std::vector<A> buf(3 * g.C);
    A* __restrict mu = buf.data();
    A* __restrict res = mu + g.C;
    A* __restrict sq = res + g.C;
    for (int64_t t = begin; t < end; ++t) {
      const Task w = g.task(t);
      const uint8_t* m = a.row(w.b);
      Moments* acc = part + w.b * g.C * g.pieces + w.k;  // channel c at acc[c * pieces]
      for (int64_t c = w.c0; c < w.c1; ++c) acc[c * g.pieces] = Moments{};
      for (int64_t s = w.v0; s < w.v1; s += g.chunk) {
        const int64_t n = std::min(g.chunk, w.v1 - s);
        if constexpr (!kCL) {
          const int64_t cnt = lane_masks(m + s, n, keep.data());
          if (cnt == 0) continue;
          const bits_t<A>* __restrict kp = keep.data();
          for (int64_t c = w.c0; c < w.c1; ++c) {
            const raw_t<T>* __restrict x = a.x + (w.b * g.C + c) * g.S + s;
            A sum, unused, r, q;
            sum2(n, sum, unused, [&](int64_t i, A& s1, A&) {
              s1 += keep_bits(kp[i], Io<T>::load(x[i]));
            });
            const A mean = sum / static_cast<A>(cnt);
            sum2(n, r, q, [&](int64_t i, A& s1, A& s2) {
              const A e = keep_bits(kp[i], Io<T>::load(x[i]) - mean);
              s1 += e;
              s2 += e * e;
            });
            acc[c * g.pieces].add_chunk(cnt, mean, r, q);
          }
        } else {
          // A voxel is C contiguous values; masked voxels are skipped whole (saving their memory
          // traffic) and per-channel sums are kept in arrays.
          int64_t cnt = 0;
          std::fill(buf.begin(), buf.end(), A(0));
          for (int64_t v = s; v < s + n; ++v) {
            if (!m[v]) continue;
            ++cnt;
            const raw_t<T>* __restrict x = a.x + (w.b * g.S + v) * g.C;
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) mu[c] += Io<T>::load(x[c]);
          }
          if (cnt == 0) continue;
          for (int64_t c = 0; c < g.C; ++c) mu[c] /= static_cast<A>(cnt);
          for (int64_t v = s; v < s + n; ++v) {
            if (!m[v]) continue;
            const raw_t<T>* __restrict x = a.x + (w.b * g.S + v) * g.C;
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) {
              const A e = Io<T>::load(x[c]) - mu[c];
              res[c] += e;
              sq[c] += e * e;
            }
          }
          for (int64_t c = 0; c < g.C; ++c) acc[c * g.pieces].add_chunk(cnt, mu[c], res[c], sq[c]);
        }
      }
    }
  });
}

// part[(b * pieces + k) * 2C + {0, C} + c] = {sum dy, sum dy * (x - mean)} over a task's voxels.
template <bool kCL, bool kSlope, typename T, typename A = acc_t<T>>
void bwd_reduce_kernel(const Geometry& g, const Args<T>& a, double* part) {
  at::parallel_for(0, g.num_tasks(), g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<bits_t<A>> keep(g.chunk);
    std::vector<A> buf(2 * g.C);
    A* __restrict a1 = buf.data();
    A* __restrict a2 = a1 + g.C;
    for (int64_t t = begin; t < end; ++t) {
      const Task w = g.task(t);
      const uint8_t* m = a.row(w.b);
      const int64_t j0 = w.b * g.C;
      double* d1 = part + (w.b * g.pieces + w.k) * 2 * g.C;
      double* d2 = d1 + g.C;
      for (int64_t s = w.v0; s < w.v1; s += g.chunk) {
        const int64_t n = std::min(g.chunk, w.v1 - s);
        if constexpr (!kCL) {
          if (lane_masks(m + s, n, keep.data()) == 0) continue;
          const bits_t<A>* __restrict kp = keep.data();
          for (int64_t c = w.c0; c < w.c1; ++c) {
            const raw_t<T>* __restrict x = a.x + (j0 + c) * g.S + s;
            const raw_t<T>* __restrict gr = a.grad + (j0 + c) * g.S + s;
            const A sc = a.scale[j0 + c], sh = a.shift[j0 + c], mu = a.mean[j0 + c];
            A s1, s2;
            sum2(n, s1, s2, [&](int64_t i, A& u1, A& u2) {
              const A xv = Io<T>::load(x[i]);
              const A dy = act_grad<kSlope>(Io<T>::load(gr[i]), xv, sc, sh, a.slope);
              u1 += keep_bits(kp[i], dy);
              u2 += keep_bits(kp[i], dy * (xv - mu));
            });
            d1[c] += s1;
            d2[c] += s2;
          }
        } else {
          const A* __restrict sc = a.scale + j0;
          const A* __restrict sh = a.shift + j0;
          const A* __restrict mu = a.mean + j0;
          std::fill(buf.begin(), buf.end(), A(0));
          for (int64_t v = s; v < s + n; ++v) {
            if (!m[v]) continue;
            const raw_t<T>* __restrict x = a.x + (w.b * g.S + v) * g.C;
            const raw_t<T>* __restrict gr = a.grad + (w.b * g.S + v) * g.C;
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) {
              const A xv = Io<T>::load(x[c]);
              const A dy = act_grad<kSlope>(Io<T>::load(gr[c]), xv, sc[c], sh[c], a.slope);
              a1[c] += dy;
              a2[c] += dy * (xv - mu[c]);
            }
          }
          for (int64_t c = 0; c < g.C; ++c) {
            d1[c] += a1[c];
            d2[c] += a2[c];
          }
        }
      }
    }
  });
}

// ---- Elementwise passes, over the runs of for_runs. Along a run the mask advances (NCDHW,
// kM = 1) or the per-group parameters do (NDHWC, kP = 1); the other is fixed (stride 0). ----

template <bool kCL, bool kSlope, typename T, typename A = acc_t<T>>
void fwd_kernel(const Geometry& g, const Args<T>& a, raw_t<T>* out) {
  constexpr int64_t kM = kCL ? 0 : 1, kP = kCL ? 1 : 0;
  at::parallel_for(0, g.B * g.C * g.S, kGrain, [&](int64_t begin, int64_t end) {
    for_runs(g, a, begin, end, [&](int64_t i0, int64_t n, const uint8_t* m, int64_t j) {
      raw_t<T>* __restrict o = out + i0;
      if (kCL && !m[0]) {  // masked voxel: x is not even read
        std::fill(o, o + n, Io<T>::store(A(0)));
        return;
      }
      const raw_t<T>* __restrict x = a.x + i0;
      const A* __restrict sc = a.scale + j;
      const A* __restrict sh = a.shift + j;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const A y = act<kSlope>(Io<T>::load(x[i]) * sc[i * kP] + sh[i * kP], a.slope);
        o[i] = Io<T>::store(keep_if(m[i * kM], y));
      }
    });
  });
}

template <bool kCL, bool kSlope, typename T, typename A = acc_t<T>>
void bwd_kernel(const Geometry& g, const Args<T>& a, raw_t<T>* out) {
  constexpr int64_t kM = kCL ? 0 : 1, kP = kCL ? 1 : 0;
  at::parallel_for(0, g.B * g.C * g.S, kGrain, [&](int64_t begin, int64_t end) {
    for_runs(g, a, begin, end, [&](int64_t i0, int64_t n, const uint8_t* m, int64_t j) {
      raw_t<T>* __restrict o = out + i0;
      if (kCL && !m[0]) {
        std::fill(o, o + n, Io<T>::store(A(0)));
        return;
      }
      const raw_t<T>* __restrict x = a.x + i0;
      const raw_t<T>* __restrict gr = a.grad + i0;
      const A *__restrict sc = a.scale + j, *__restrict sh = a.shift + j;
      const A *__restrict mu = a.mean + j, *__restrict rs = a.rstd + j;
      const A *__restrict ca = a.coef_a + j, *__restrict cb = a.coef_b + j;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = i * kP;
        const A xv = Io<T>::load(x[i]);
        const A dy = act_grad<kSlope>(Io<T>::load(gr[i]), xv, sc[p], sh[p], a.slope);
        const A gx = sc[p] * (dy - ca[p] - (xv - mu[p]) * (rs[p] * cb[p]));
        o[i] = Io<T>::store(keep_if(m[i * kM], gx));
      }
    });
  });
}

// ---- Statistics between the stages, in fixed order ------------------------------------------

// Per-group Moments from the stats_kernel partials: (b, c) over k, or c over (b, k).
std::vector<Moments> merge_tasks(const Geometry& g, const std::vector<Moments>& part,
                                 bool per_sample) {
  std::vector<Moments> out(per_sample ? g.B * g.C : g.C);
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t c = 0; c < g.C; ++c) {
      Moments& M = out[per_sample ? b * g.C + c : c];
      for (int64_t k = 0; k < g.pieces; ++k) {
        const Moments& p = part[(b * g.C + c) * g.pieces + k];
        M.add(p.n, p.mean, p.m2);
      }
    }
  }
  return out;
}

// Per-channel Moments of every rank's (world, 3, C, P) partials.
template <typename A>
std::vector<Moments> merge_partials(const Geometry& g, const at::Tensor& parts) {
  TORCH_CHECK(parts.device().is_cpu() && parts.dim() == 4 && parts.size(1) == 3 &&
                  parts.size(2) == g.C && parts.scalar_type() == c10::CppTypeToScalarType<A>::value,
              "masked_norm (cpu): partials must be a (world, 3, C, P) accumulation-dtype tensor, "
              "got ", parts.scalar_type(), " ", parts.sizes());
  const at::Tensor p = parts.contiguous();
  const A* d = p.const_data_ptr<A>();
  const int64_t W = p.size(0), P = p.size(3), plane = g.C * P;
  std::vector<Moments> out(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t k = 0; k < P; ++k) {
        const int64_t o = w * 3 * plane + c * P + k;
        out[c].add(d[o], d[o + plane], d[o + 2 * plane]);
      }
    }
  }
  return out;
}

// nn.BatchNorm / nn.InstanceNorm's running update from per-group statistics (mean/var rounded
// as returned); groups without a visible voxel do not count, a channel without any keeps its
// values.
template <typename A>
void update_running(const at::Tensor& rm, const at::Tensor& rv, const A* mean, const A* var,
                    const A* count, int64_t groups_per_channel, int64_t C, double momentum) {
  at::Tensor m64 = rm.to(at::kDouble).contiguous(), v64 = rv.to(at::kDouble).contiguous();
  double* pm = m64.mutable_data_ptr<double>();
  double* pv = v64.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double k = 0, ms = 0, vs = 0;
    for (int64_t b = 0; b < groups_per_channel; ++b) {
      const int64_t j = b * C + c;
      const double n = count[j];
      if (n <= 0) continue;
      k += 1;
      ms += mean[j];
      vs += double(var[j]) * n / std::max(n - 1.0, 1.0);
    }
    if (k == 0) continue;
    pm[c] = (1.0 - momentum) * pm[c] + momentum * (ms / k);
    pv[c] = (1.0 - momentum) * pv[c] + momentum * (vs / k);
  }
  rm.copy_(m64);
  rv.copy_(v64);
}

// Per (b, c) mean, rstd, scale, shift from per-group statistics (per sample or per channel).
template <typename A>
struct PerGroup {
  std::vector<A> mean, rstd, scale, shift;
  PerGroup(const Geometry& g, const A* mu, const A* var, bool per_sample, const std::vector<A>& w,
           const std::vector<A>& b, A eps)
      : mean(g.B * g.C), rstd(g.B * g.C), scale(g.B * g.C), shift(g.B * g.C) {
    for (int64_t i = 0; i < g.B; ++i) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t j = i * g.C + c, s = per_sample ? j : c;
        const Coef<A> k = coef<A>(mu[s], var[s], eps, w[c], b[c]);
        mean[j] = mu[s];
        rstd[j] = k.rstd;
        scale[j] = k.scale;
        shift[j] = k.shift;
      }
    }
  }
};

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_norm_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool instance, bool use_input_stats, double eps, std::optional<double> negative_slope,
    double momentum, const std::optional<at::Tensor>& partials) {
  Mask mv;
  const Geometry g = check_inputs(x, mask, mv);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value() &&
                  (use_input_stats || running_mean.has_value()),
              "masked_norm (cpu): running_mean and running_var go together, and are needed "
              "without input statistics");
  TORCH_CHECK(!partials.has_value() || (!instance && use_input_stats),
              "masked_norm (cpu): partials are for batch-mode input statistics");
  const bool per_sample = instance && use_input_stats;
  const bool update = use_input_stats && running_mean.has_value() && momentum != 0.0;
  const auto opts = x.options().dtype(acc_type(x));
  const int64_t G = per_sample ? g.B * g.C : g.C;
  at::Tensor out = at::empty_like(x);  // x is dense, so `out` gets exactly its strides
  at::Tensor mean_t = per_sample ? at::empty({g.B, g.C}, opts) : at::empty({g.C}, opts);
  at::Tensor var_t = at::empty_like(mean_t), count_t = at::zeros_like(mean_t);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    A* mean = mean_t.mutable_data_ptr<A>();
    A* var = var_t.mutable_data_ptr<A>();
    A* count = count_t.mutable_data_ptr<A>();
    const std::vector<A> w = per_channel<A>(weight, g, "weight", A(1));
    const std::vector<A> b = per_channel<A>(bias, g, "bias", A(0));
    if (!use_input_stats) {
      const std::vector<A> rm = per_channel<A>(running_mean, g, "running_mean", A(0));
      const std::vector<A> rv = per_channel<A>(running_var, g, "running_var", A(1));
      std::copy(rm.begin(), rm.end(), mean);
      std::copy(rv.begin(), rv.end(), var);
    }
    if (x.numel() == 0) {
      if (use_input_stats) {
        std::fill(mean, mean + G, A(0));
        std::fill(var, var + G, A(0));
      }
      return;
    }
    auto a = make_args<T>(x, mv, g, nullptr, negative_slope);
    if (use_input_stats && !partials.has_value() && !g.channels_last) {
      with_slope(negative_slope, [&](auto sl) {
        fused_fwd_nc<decltype(sl)::value, T>(g, a, instance, w, b, static_cast<A>(eps),
                                             out_ptr<T>(out), mean, var, count);
      });
    } else {
      if (use_input_stats) {
        std::vector<Moments> M;
        if (partials.has_value()) {
          M = merge_partials<A>(g, *partials);
        } else {
          std::vector<Moments> part(g.B * g.C * g.pieces);
          g.channels_last ? stats_kernel<true, T>(g, a, part.data())
                          : stats_kernel<false, T>(g, a, part.data());
          M = merge_tasks(g, part, per_sample);
        }
        for (int64_t j = 0; j < G; ++j) {
          mean[j] = static_cast<A>(M[j].mean);
          var[j] = static_cast<A>(M[j].var());
          count[j] = static_cast<A>(M[j].n);
        }
      }
      const PerGroup<A> pg(g, mean, var, per_sample, w, b, static_cast<A>(eps));
      a.scale = pg.scale.data();
      a.shift = pg.shift.data();
      with_slope(negative_slope, [&](auto sl) {
        if (g.channels_last) {
          fwd_kernel<true, decltype(sl)::value, T>(g, a, out_ptr<T>(out));
        } else {
          fwd_kernel<false, decltype(sl)::value, T>(g, a, out_ptr<T>(out));
        }
      });
    }
    if (update) {
      update_running<A>(*running_mean, *running_var, mean, var, count, per_sample ? g.B : 1,
                        g.C, momentum);
    }
  });
  return {out, mean_t, var_t, count_t};
}

at::Tensor masked_norm_partials_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  Mask mv;
  const Geometry g = check_inputs(x, mask, mv);
  at::Tensor parts = at::zeros({1, 3, g.C, 1}, x.options().dtype(acc_type(x)));
  if (x.numel() == 0) return parts;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto a = make_args<T>(x, mv, g, nullptr, std::nullopt);
    std::vector<Moments> part(g.B * g.C * g.pieces);
    g.channels_last ? stats_kernel<true, T>(g, a, part.data())
                    : stats_kernel<false, T>(g, a, part.data());
    const std::vector<Moments> M = merge_tasks(g, part, false);
    A* d = parts.mutable_data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      d[c] = static_cast<A>(M[c].n);
      d[g.C + c] = static_cast<A>(M[c].mean);
      d[2 * g.C + c] = static_cast<A>(M[c].m2);
    }
  });
  return parts;
}

namespace {

// (sum dy, sum dy * xhat) per (b, c) from the bwd_reduce_kernel tasks, summed in task order.
template <bool kSlope, typename T, typename A = acc_t<T>>
std::vector<double> reduce_sums(const Geometry& g, const Args<T>& a) {
  std::vector<double> part(g.B * g.pieces * 2 * g.C, 0.0);
  if (g.channels_last) {
    bwd_reduce_kernel<true, kSlope, T>(g, a, part.data());
  } else {
    bwd_reduce_kernel<false, kSlope, T>(g, a, part.data());
  }
  std::vector<double> sums(2 * g.B * g.C, 0.0);
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t c = 0; c < g.C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t k = 0; k < g.pieces; ++k) {
        s1 += part[(b * g.pieces + k) * 2 * g.C + c];
        s2 += part[(b * g.pieces + k) * 2 * g.C + g.C + c];
      }
      // rstd is constant per group, so xhat's scaling is applied once, to the sum.
      sums[2 * (b * g.C + c)] = s1;
      sums[2 * (b * g.C + c) + 1] = s2 * a.rstd[b * g.C + c];
    }
  }
  return sums;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count, bool instance,
    bool use_input_stats, double eps, std::optional<double> negative_slope,
    const std::optional<at::Tensor>& partials, int64_t rank) {
  Mask mv;
  const Geometry g = check_inputs(x, mask, mv);
  check_grad(grad_out, x, g);
  TORCH_CHECK(!partials.has_value() || (!instance && use_input_stats),
              "masked_norm (cpu): partials are for batch-mode input statistics");
  const bool per_sample = instance && use_input_stats;
  const bool has_wb = weight.has_value() || bias.has_value();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gw = weight.has_value() ? at::empty_like(*weight) : x.new_empty({0});
  at::Tensor gb = bias.has_value() ? at::empty_like(*bias) : x.new_empty({0});
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A* mu = group_ptr<A>(mean, g, per_sample, "mean");
    const A* vr = group_ptr<A>(var, g, per_sample, "var");
    const A* cnt = group_ptr<A>(count, g, per_sample, "count");
    const std::vector<A> w = per_channel<A>(weight, g, "weight", A(1));
    const std::vector<A> b = per_channel<A>(bias, g, "bias", A(0));
    std::vector<double> local(2 * g.C, 0.0);  // this rank's (sum dy, sum dy * xhat) per channel
    if (x.numel() != 0) {
      const PerGroup<A> pg(g, mu, vr, per_sample, w, b, static_cast<A>(eps));
      auto a = make_args<T>(x, mv, g, &grad_out, negative_slope);
      a.mean = pg.mean.data();
      a.rstd = pg.rstd.data();
      a.scale = pg.scale.data();
      a.shift = pg.shift.data();
      const bool need_sums = use_input_stats || has_wb;
      const int64_t G = per_sample ? g.B * g.C : g.C;
      std::vector<double> sums(2 * G, 0.0);  // per group
      if (!partials.has_value() && !g.channels_last) {
        with_slope(negative_slope, [&](auto sl) {
          fused_bwd_nc<decltype(sl)::value, T>(g, a, instance, use_input_stats, need_sums, cnt,
                                               out_ptr<T>(grad_x), sums.data());
        });
      } else {
        std::vector<double> total(2 * G, 0.0);  // the sums the coefficients use
        if (partials.has_value()) {
          const at::Tensor& p = *partials;
          constexpr auto kAcc = c10::CppTypeToScalarType<A>::value;
          TORCH_CHECK(p.device().is_cpu() && p.dim() == 4 && p.size(1) == 2 &&
                          p.size(2) == g.C && p.scalar_type() == kAcc && rank >= 0 &&
                          rank < p.size(0),
                      "masked_norm (cpu): partials must be a (world, 2, C, P) accumulation-dtype "
                      "tensor with rank < world, got ", p.scalar_type(), " ", p.sizes(),
                      " and rank ", rank);
          const at::Tensor pc = p.contiguous();
          const A* d = pc.const_data_ptr<A>();
          const int64_t W = pc.size(0), P = pc.size(3), plane = g.C * P;
          for (int64_t c = 0; c < g.C; ++c) {
            for (int64_t r = 0; r < W; ++r) {
              for (int64_t k = 0; k < P; ++k) {
                const int64_t o = r * 2 * plane + c * P + k;
                total[2 * c] += d[o];
                total[2 * c + 1] += d[o + plane];
                if (r == rank) {
                  sums[2 * c] += d[o];
                  sums[2 * c + 1] += d[o + plane];
                }
              }
            }
          }
        } else if (need_sums) {
          std::vector<double> bc;
          with_slope(negative_slope,
                     [&](auto sl) { bc = reduce_sums<decltype(sl)::value, T>(g, a); });
          for (int64_t i = 0; i < g.B; ++i) {
            for (int64_t c = 0; c < g.C; ++c) {
              const int64_t gi = per_sample ? i * g.C + c : c;
              sums[2 * gi] += bc[2 * (i * g.C + c)];
              sums[2 * gi + 1] += bc[2 * (i * g.C + c) + 1];
            }
          }
          total = sums;
        }
        std::vector<A> ca(g.B * g.C, A(0)), cb(g.B * g.C, A(0));
        for (int64_t i = 0; i < g.B && use_input_stats; ++i) {
          for (int64_t c = 0; c < g.C; ++c) {
            const int64_t gi = per_sample ? i * g.C + c : c;
            const double inv_n = 1.0 / std::max<double>(cnt[gi], 1.0);
            ca[i * g.C + c] = static_cast<A>(total[2 * gi] * inv_n);
            cb[i * g.C + c] = static_cast<A>(total[2 * gi + 1] * inv_n);
          }
        }
        a.coef_a = ca.data();
        a.coef_b = cb.data();
        with_slope(negative_slope, [&](auto sl) {
          if (g.channels_last) {
            bwd_kernel<true, decltype(sl)::value, T>(g, a, out_ptr<T>(grad_x));
          } else {
            bwd_kernel<false, decltype(sl)::value, T>(g, a, out_ptr<T>(grad_x));
          }
        });
      }
      if (partials.has_value()) {
        for (int64_t c = 0; c < g.C; ++c) {
          local[2 * c] = sums[2 * c];
          local[2 * c + 1] = sums[2 * c + 1];
        }
      } else {
        for (int64_t gi = 0; gi < G; ++gi) {  // fixed order: b outer
          local[2 * (gi % g.C)] += sums[2 * gi];
          local[2 * (gi % g.C) + 1] += sums[2 * gi + 1];
        }
      }
    }
    at::Tensor l = at::from_blob(local.data(), {g.C, 2}, at::kDouble);
    if (weight.has_value()) gw.copy_(l.select(1, 1));
    if (bias.has_value()) gb.copy_(l.select(1, 0));
  });
  return {grad_x, gw, gb};
}

at::Tensor masked_norm_bwd_partials_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& var, double eps,
    std::optional<double> negative_slope) {
  Mask mv;
  const Geometry g = check_inputs(x, mask, mv);
  check_grad(grad_out, x, g);
  at::Tensor parts = at::zeros({1, 2, g.C, 1}, x.options().dtype(acc_type(x)));
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A* mu = group_ptr<A>(mean, g, false, "mean");
    const A* vr = group_ptr<A>(var, g, false, "var");
    if (x.numel() == 0) return;
    const std::vector<A> w = per_channel<A>(weight, g, "weight", A(1));
    const std::vector<A> b = per_channel<A>(bias, g, "bias", A(0));
    const PerGroup<A> pg(g, mu, vr, false, w, b, static_cast<A>(eps));
    auto a = make_args<T>(x, mv, g, &grad_out, negative_slope);
    a.mean = pg.mean.data();
    a.rstd = pg.rstd.data();
    a.scale = pg.scale.data();
    a.shift = pg.shift.data();
    std::vector<double> bc;
    with_slope(negative_slope, [&](auto sl) { bc = reduce_sums<decltype(sl)::value, T>(g, a); });
    A* d = parts.mutable_data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < g.B; ++i) {
        s1 += bc[2 * (i * g.C + c)];
        s2 += bc[2 * (i * g.C + c) + 1];
      }
      d[c] = static_cast<A>(s1);
      d[g.C + c] = static_cast<A>(s2);
    }
  });
  return parts;
}

}  // namespace mae3d
