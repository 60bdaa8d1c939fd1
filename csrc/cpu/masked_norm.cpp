// CPU kernels of mae3d::masked_norm: visible-voxel statistics, the fused normalise + affine +
// (leaky) ReLU forward, and the two backward stages.
//
// Reductions are split into tasks (sample, channel group, run of voxels) chosen from the shapes
// alone, each with its own output slot, merged in a fixed order: results are bitwise identical
// for any thread count. Inner loops are branch-free so that `#pragma omp simd` vectorises them;
// masked voxels are removed with bit-mask selects, never by multiplying with the mask, so NaN/inf
// stored under them cannot leak. Kernels are reached through dispatch(), so that no loop pragma
// sits inside an AT_DISPATCH macro argument (pragmas are not allowed there).
//
// Build note: with torch's OpenMP backend at::parallel_for is header-only and runs serially unless
// this file is compiled with -fopenmp.
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

// A reduction task: sample b, channels [c0, c1), voxels [v0, v1) = the k-th of `pieces` runs.
struct Task {
  int64_t b, k, c0, c1, v0, v1;
};
struct Geometry {
  int64_t B, C, S;
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

Geometry check_inputs(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.device().is_cpu(), "masked_norm (cpu): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(mask.device().is_cpu(), "masked_norm (cpu): mask must be a CPU tensor, got ",
              mask.device());
  TORCH_CHECK(x.dim() == 5, "masked_norm (cpu): x must be (B, C, D, H, W), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "masked_norm (cpu): x must be float32/float64/float16/bfloat16, got ", dt);
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4), false, 0, 0, 0, 0, 0};
  // C == 1 or S == 1 makes both predicates true; NCDHW indexing is then the right one.
  if (!x.is_contiguous()) {
    g.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
    TORCH_CHECK(g.channels_last, "masked_norm (cpu): x must be contiguous or channels_last_3d");
  }
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool,
              "masked_norm (cpu): mask must be uint8 or bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == g.B && mask.size(1) == g.S && mask.is_contiguous(),
              "masked_norm (cpu): mask must be a contiguous (B, D*H*W) = (", g.B, ", ", g.S,
              ") tensor, got ", mask.sizes());
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

template <typename A>
const A* group_ptr(const at::Tensor& t, const Geometry& g, const char* name) {
  constexpr auto kType = c10::CppTypeToScalarType<A>::value;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == kType && t.dim() == 2 &&
                  t.size(0) == g.B && t.size(1) == g.C && t.is_contiguous(),
              "masked_norm (cpu): ", name, " must be a contiguous (B, C) ", kType, " tensor, got ",
              t.scalar_type(), " ", t.sizes());
  return t.const_data_ptr<A>();
}

// Kernel arguments; per-group pointers index as [b * C + c].
template <typename T, typename A = acc_t<T>>
struct Args {
  const raw_t<T>* x;
  const raw_t<T>* grad;
  const uint8_t* mask;
  A slope;
  const A *scale = nullptr, *shift = nullptr, *mean = nullptr, *rstd = nullptr;
  const A *coef_a = nullptr, *coef_b = nullptr;
};

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& mask, const at::Tensor* grad,
                  std::optional<double> slope) {
  return {static_cast<const raw_t<T>*>(x.const_data_ptr()),
          grad ? static_cast<const raw_t<T>*>(grad->const_data_ptr()) : nullptr,
          static_cast<const uint8_t*>(mask.const_data_ptr()),
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

// Calls f(bool_constant<channels_last>, bool_constant<has_slope>): both choices are compiled
// into the inner loops rather than tested per element.
template <typename F>
void with_layout_slope(const Geometry& g, const std::optional<double>& slope, F&& f) {
  auto with_slope = [&](auto cl) {
    slope.has_value() ? f(cl, std::true_type{}) : f(cl, std::false_type{});
  };
  g.channels_last ? with_slope(std::true_type{}) : with_slope(std::false_type{});
}

// Calls f(i0, n, m, j) for the runs of flat elements [begin, end) along which only x changes:
// NCDHW runs lie in one (b, c) row (mask m advances with i, group index j is fixed); NDHWC runs
// lie in one voxel (m is fixed, j = b * C + c advances with i).
template <typename F>
void for_runs(const Geometry& g, const uint8_t* mask, int64_t begin, int64_t end, F&& f) {
  const int64_t len = g.channels_last ? g.C : g.S;
  for (int64_t i0 = begin; i0 < end;) {
    const int64_t r = i0 / len, off = i0 - r * len, n = std::min(len - off, end - i0);
    if (g.channels_last) {
      f(i0, n, mask + r, (r / g.S) * g.C + off);
    } else {
      f(i0, n, mask + (r / g.C) * g.S + off, r);
    }
    i0 += n;
  }
}

// Running (count, mean, M2) in double, combined with Chan et al.'s pairwise update.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  // Adds a chunk given its count, first-pass mean mu, and the sums of e = x - mu and e^2 over
  // its visible voxels. Adding sum(e) back ("corrected two-pass") cancels the rounding of mu,
  // and no cancellation involves |mean|: x = 1000 + N(0, 1) keeps a float-accurate variance.
  void add_chunk(double nb, double mu, double res, double sq) {
    const double mb = mu + res / nb, m2b = std::max(0.0, sq - res * res / nb);
    const double n_ab = n + nb, d = mb - mean;
    mean += d * (nb / n_ab);
    m2 += m2b + d * d * (n * nb / n_ab);
    n = n_ab;
  }
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

// ---- Reductions. NCDHW: a chunk of each (b, c) row is contiguous. NDHWC: a voxel is C
// contiguous values; masked voxels are skipped whole (saving their memory traffic) and
// per-channel sums are kept in arrays. ----

template <bool kCL, typename T, typename A = acc_t<T>>
void stats_kernel(const Geometry& g, const Args<T>& a, A* cnt_out, A* mean_out, A* m2_out) {
  at::parallel_for(0, g.num_tasks(), g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<bits_t<A>> keep(g.chunk);
    std::vector<A> buf(3 * g.C);
    std::vector<Moments> acc(g.group);
    A* __restrict mu = buf.data();
    A* __restrict res = mu + g.C;
    A* __restrict sq = res + g.C;
    for (int64_t t = begin; t < end; ++t) {
      const Task w = g.task(t);
      const uint8_t* m = a.mask + w.b * g.S;
      std::fill(acc.begin(), acc.end(), Moments{});
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
            acc[c - w.c0].add_chunk(cnt, mean, r, q);
          }
        } else {
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
          for (int64_t c = 0; c < g.C; ++c) acc[c].add_chunk(cnt, mu[c], res[c], sq[c]);
        }
      }
      for (int64_t c = w.c0; c < w.c1; ++c) {
        const int64_t o = (w.b * g.C + c) * g.pieces + w.k;
        cnt_out[o] = static_cast<A>(acc[c - w.c0].n);
        mean_out[o] = static_cast<A>(acc[c - w.c0].mean);
        m2_out[o] = static_cast<A>(acc[c - w.c0].m2);
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
      const uint8_t* m = a.mask + w.b * g.S;
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

// ---- Elementwise stages, over the runs of for_runs. Along a run the mask advances (NCDHW,
// kM = 1) or the per-group parameters do (NDHWC, kP = 1); the other is fixed (stride 0). ----

template <bool kCL, bool kSlope, typename T, typename A = acc_t<T>>
void fwd_kernel(const Geometry& g, const Args<T>& a, raw_t<T>* out) {
  constexpr int64_t kM = kCL ? 0 : 1, kP = kCL ? 1 : 0;
  at::parallel_for(0, g.B * g.C * g.S, kGrain, [&](int64_t begin, int64_t end) {
    for_runs(g, a.mask, begin, end, [&](int64_t i0, int64_t n, const uint8_t* m, int64_t j) {
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
    for_runs(g, a.mask, begin, end, [&](int64_t i0, int64_t n, const uint8_t* m, int64_t j) {
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_stats_cpu(const at::Tensor& x,
                                                                     const at::Tensor& mask) {
  const Geometry g = check_inputs(x, mask);
  at::Tensor count, mean, m2;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
    count = at::empty({g.B, g.C, g.pieces}, opts);
    mean = at::empty({g.B, g.C, g.pieces}, opts);
    m2 = at::empty({g.B, g.C, g.pieces}, opts);
    auto kernel = g.channels_last ? stats_kernel<true, T> : stats_kernel<false, T>;
    kernel(g, make_args<T>(x, mask, nullptr, std::nullopt), count.mutable_data_ptr<A>(),
           mean.mutable_data_ptr<A>(), m2.mutable_data_ptr<A>());
  });
  return {count, mean, m2};
}

at::Tensor masked_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& scale,
                               const at::Tensor& shift, std::optional<double> negative_slope) {
  const Geometry g = check_inputs(x, mask);
  at::Tensor out = at::empty_like(x);  // x is dense, so `out` gets exactly its strides
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto a = make_args<T>(x, mask, nullptr, negative_slope);
    a.scale = group_ptr<A>(scale, g, "scale");
    a.shift = group_ptr<A>(shift, g, "shift");
    with_layout_slope(g, negative_slope, [&](auto cl, auto sl) {
      fwd_kernel<decltype(cl)::value, decltype(sl)::value, T>(g, a, out_ptr<T>(out));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_norm_bwd_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& scale, const at::Tensor& shift,
    std::optional<double> negative_slope) {
  const Geometry g = check_inputs(x, mask);
  check_grad(grad_out, x, g);
  at::Tensor sum_dy, sum_dy_xhat;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto a = make_args<T>(x, mask, &grad_out, negative_slope);
    a.scale = group_ptr<A>(scale, g, "scale");
    a.shift = group_ptr<A>(shift, g, "shift");
    a.mean = group_ptr<A>(mean, g, "mean");
    const A* rs = group_ptr<A>(rstd, g, "rstd");
    // Per-task partial sums in double, summed below in a fixed order (no atomics).
    const int64_t B = g.B, C = g.C, K = g.pieces;
    std::vector<double> part(B * K * 2 * C, 0.0);
    with_layout_slope(g, negative_slope, [&](auto cl, auto sl) {
      bwd_reduce_kernel<decltype(cl)::value, decltype(sl)::value, T>(g, a, part.data());
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
          s1 += part[(b * K + k) * 2 * C + c];
          s2 += part[(b * K + k) * 2 * C + C + c];
        }
        // rstd is constant per group, so xhat's scaling is applied once, to the sum.
        o1[b * C + c] = static_cast<A>(s1);
        o2[b * C + c] = static_cast<A>(s2 * rs[b * C + c]);
      }
    }
  });
  return {sum_dy, sum_dy_xhat};
}

at::Tensor masked_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& mask, const at::Tensor& mean,
                               const at::Tensor& rstd, const at::Tensor& scale,
                               const at::Tensor& shift, std::optional<double> negative_slope,
                               const at::Tensor& coef_a, const at::Tensor& coef_b) {
  const Geometry g = check_inputs(x, mask);
  check_grad(grad_out, x, g);
  at::Tensor grad_x = at::empty_like(x);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    auto a = make_args<T>(x, mask, &grad_out, negative_slope);
    a.scale = group_ptr<A>(scale, g, "scale");
    a.shift = group_ptr<A>(shift, g, "shift");
    a.mean = group_ptr<A>(mean, g, "mean");
    a.rstd = group_ptr<A>(rstd, g, "rstd");
    a.coef_a = group_ptr<A>(coef_a, g, "coef_a");
    a.coef_b = group_ptr<A>(coef_b, g, "coef_b");
    with_layout_slope(g, negative_slope, [&](auto cl, auto sl) {
      bwd_kernel<decltype(cl)::value, decltype(sl)::value, T>(g, a, out_ptr<T>(grad_x));
    });
  });
  return grad_x;
}

}  // namespace mae3d
