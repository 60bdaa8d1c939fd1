// CPU kernels of mae3d::window_attention3d: Swin (shifted) window attention, one window at a time.
//
// Work is split into tasks (head, sample, window) shared out by at::parallel_for. A task gathers
// its window's q (pre-scaled), k, v rows into contiguous fp32 (fp64 for fp64 input) tiles, runs
// the window's GEMMs through MKL (single-threaded inside the parallel region) and fused,
// AVX2-vectorised row passes for bias, softmax and its gradient (window_attention_simd.h), and
// scatters rows back. A thread holds one window's N x N scores at a time (N = window volume):
// the eager path instead materialises B * nW * heads of them plus the gathered bias and the mask.
//
// Shift regions: the tokens of a window that straddles the wrap-around are ordered by region
// label (a stable counting sort of the gather order), which makes the masked score matrix block
// diagonal: each region is then an independent attention problem of its own n_r tokens. This
// is torchvision's -100 mask with e^-100 rounded to exactly 0 (every row keeps its own token, so
// the difference is ~1e-44 relative), and it skips the masked blocks' GEMM work and exps instead
// of computing denormals (which slow every later CPU instruction that touches them).
//
// Backward recomputes the probabilities from the saved log-sum-exp (flash-attention style):
// S = Q K^T, P = exp(S + bias - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)),
// dQ = dS K scale, dK = dS^T (scale Q). The table gradient is deterministic without atomics:
// windows are grouped into units of a fixed size (independent of the thread count); a unit sums
// its windows' dS into a dense N x N tile in window order, scatters the tile once into its own
// partial table row, and the partial rows are summed over units in a fixed order.
//
// Build note: with torch's OpenMP backend at::parallel_for is header-only and runs serially unless
// this file is compiled with -fopenmp.
#include "window_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "window_attention_simd.h"

namespace mae3d {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Strides {  // element strides of a (B, D, H, W, heads, head_dim) tensor, head_dim unit
  int64_t b, d, h, w, n;
};

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

struct Geometry {
  int64_t B, D, H, W, nh, hd;
  int64_t win[3], sft[3], nwin[3];
  int64_t N, nW, T;
  std::vector<int64_t> tok;  // (N, 3) local coordinates of the window's tokens
  std::vector<int32_t> idx;  // (N, N) bias-table row of each (query, key) pair; empty: no table

  Geometry(const at::Tensor& q, const std::vector<int64_t>& window,
           const std::vector<int64_t>& shift, const std::vector<int64_t>& bias_window,
           bool has_table) {
    B = q.size(0), D = q.size(1), H = q.size(2), W = q.size(3), nh = q.size(4), hd = q.size(5);
    const int64_t grid[3] = {D, H, W};
    for (int a = 0; a < 3; ++a) {
      win[a] = window[a];
      sft[a] = shift[a];
      nwin[a] = grid[a] / win[a];
    }
    N = win[0] * win[1] * win[2];
    nW = nwin[0] * nwin[1] * nwin[2];
    tok.resize(N * 3);
    for (int64_t p = 0; p < N; ++p) {
      tok[p * 3 + 0] = p / (win[1] * win[2]);
      tok[p * 3 + 1] = (p / win[2]) % win[1];
      tok[p * 3 + 2] = p % win[2];
    }
    const int64_t bd = bias_window[0], bh = bias_window[1], bw = bias_window[2];
    T = (2 * bd - 1) * (2 * bh - 1) * (2 * bw - 1);
    if (has_table) {
      // Tokens are decoded with the bias window's dims: torchvision reads index[:N, :N] of the
      // index built for the configured window even where the window was clamped to the grid.
      idx.resize(N * N);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t ia = i / (bh * bw), ib = (i / bw) % bh, ic = i % bw;
        for (int64_t j = 0; j < N; ++j) {
          const int64_t ja = j / (bh * bw), jb = (j / bw) % bh, jc = j % bw;
          idx[i * N + j] = static_cast<int32_t>(
              ((ia - ja + bd - 1) * (2 * bh - 1) + (ib - jb + bh - 1)) * (2 * bw - 1) +
              (ic - jc + bw - 1));
        }
      }
    }
  }

  // Window w's tokens in gather order: perm (N) lists local token indices grouped by shift region
  // (stable), start (<= 9 entries) the region boundaries; returns the number of regions. Only the
  // last window of a shifted axis straddles the wrap-around: its tokens from local coordinate
  // win - shift on come from the other end of the grid.
  int64_t regions(int64_t w, int32_t* perm, int64_t* start) const {
    const int64_t wc[3] = {w / (nwin[1] * nwin[2]), (w / nwin[2]) % nwin[1], w % nwin[2]};
    bool split = false;
    for (int a = 0; a < 3; ++a) split |= sft[a] > 0 && wc[a] == nwin[a] - 1;
    start[0] = 0;
    if (!split) {
      for (int64_t p = 0; p < N; ++p) perm[p] = static_cast<int32_t>(p);
      start[1] = N;
      return 1;
    }
    int64_t count[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    auto label = [&](int64_t p) {
      int l = 0;
      for (int a = 0; a < 3; ++a) {
        const bool hi = sft[a] > 0 && wc[a] == nwin[a] - 1 && tok[p * 3 + a] >= win[a] - sft[a];
        l = l * 2 + (hi ? 1 : 0);
      }
      return l;
    };
    for (int64_t p = 0; p < N; ++p) ++count[label(p)];
    int64_t pos[8], r = 0;
    for (int l = 0, acc = 0; l < 8; acc += count[l], ++l) {
      pos[l] = acc;
      if (count[l] > 0) start[++r] = acc + count[l];
    }
    for (int64_t p = 0; p < N; ++p) perm[pos[label(p)]++] = static_cast<int32_t>(p);
    return r;
  }

  // Offsets (without the head term) of window w's tokens, in perm order, in a tensor with
  // strides s.
  void offsets(int64_t b, int64_t w, const int32_t* perm, const Strides& s, int64_t* off) const {
    const int64_t wc[3] = {w / (nwin[1] * nwin[2]), (w / nwin[2]) % nwin[1], w % nwin[2]};
    const int64_t grid[3] = {D, H, W};
    const int64_t st[3] = {s.d, s.h, s.w};
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = perm[i];
      int64_t o = b * s.b;
      for (int a = 0; a < 3; ++a) {
        // Rolled position wc*win + local maps back to the unrolled grid position + shift.
        o += ((wc[a] * win[a] + tok[p * 3 + a] + sft[a]) % grid[a]) * st[a];
      }
      off[i] = o;
    }
  }
};

template <typename S, typename A>
void gather(const S* src, const int64_t* off, int64_t head_off, int64_t N, int64_t hd, A mul,
            A* dst) {
  constexpr int64_t kAhead = 4;  // rows: window rows are scattered, the prefetcher can't guess
  for (int64_t p = 0; p < N; ++p) {
    if (p + kAhead < N) {
      const char* next = reinterpret_cast<const char*>(src + off[p + kAhead] + head_off);
      for (int64_t bytes = 0; bytes < hd * int64_t(sizeof(S)); bytes += 64) {
        __builtin_prefetch(next + bytes);
      }
    }
    const S* row = src + off[p] + head_off;
    A* out = dst + p * hd;
    for (int64_t c = 0; c < hd; ++c) out[c] = static_cast<A>(row[c]) * mul;
  }
}

// dst rows = src rows * mul (* rowmul[p] when rowmul is not null).
template <typename S, typename A>
void scatter(const A* src, const int64_t* off, int64_t head_off, int64_t N, int64_t hd, A mul,
             const A* rowmul, S* dst) {
  for (int64_t p = 0; p < N; ++p) {
    const A* row = src + p * hd;
    S* out = dst + off[p] + head_off;
    const A m = rowmul != nullptr ? mul * rowmul[p] : mul;
    for (int64_t c = 0; c < hd; ++c) out[c] = static_cast<S>(row[c] * m);
  }
}

// Per-thread state: the current window's gather order and the dense bias of the current head.
template <typename A>
struct Window {
  const Geometry& g;
  std::vector<int32_t> perm;
  int64_t start[9];
  int64_t nreg = 0;
  std::vector<A> dense, rbias;  // (N, N) bias of head `head`; a region's (n, n) bias
  int64_t head = -1;

  Window(const Geometry& geo) : g(geo), perm(geo.N) {
    if (!g.idx.empty()) dense.resize(g.N * g.N), rbias.resize(g.N * g.N);
  }

  void set(int64_t w) { nreg = g.regions(w, perm.data(), start); }

  // Row-major bias of region r (ld = its size), or null without a table.
  const A* bias(const A* table, int64_t h, int64_t r) {
    if (table == nullptr) return nullptr;
    const int64_t N = g.N;
    if (head != h) {
      for (int64_t e = 0; e < N * N; ++e) dense[e] = table[int64_t(g.idx[e]) * g.nh + h];
      head = h;
    }
    if (nreg == 1) return dense.data();
    const int64_t r0 = start[r], n = start[r + 1] - r0;
    for (int64_t i = 0; i < n; ++i) {
      const A* src = dense.data() + int64_t(perm[r0 + i]) * N;
      for (int64_t j = 0; j < n; ++j) rbias[i * n + j] = src[perm[r0 + j]];
    }
    return rbias.data();
  }
};

template <typename S>
void fwd_kernel(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& table, at::Tensor& out, at::Tensor& lse, double scale) {
  using A = acc_t<S>;
  const auto opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  const S *qp = q.data_ptr<S>(), *kp = k.data_ptr<S>(), *vp = v.data_ptr<S>();
  S* op = out.data_ptr<S>();
  A* lp = lse.data_ptr<A>();
  const A* tp = table.defined() ? table.data_ptr<A>() : nullptr;
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), so = strides_of(out);
  const Strides sl = strides_of(lse);
  const int64_t N = g.N, hd = g.hd, tasks = g.nh * g.B * g.nW;
  // Tasks are head-major: a thread's consecutive tasks share a head and its dense bias.
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Window<A> win(g);
    std::vector<A> qb(N * hd), kb(N * hd), vb(N * hd), ob(N * hd), sb(N * N), inv(N);
    std::vector<int64_t> oq(N), ok(N), ov(N), oo(N), ol(N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / (g.B * g.nW), b = (t / g.nW) % g.B, w = t % g.nW;
      win.set(w);
      const int32_t* perm = win.perm.data();
      g.offsets(b, w, perm, sq, oq.data());
      g.offsets(b, w, perm, sk, ok.data());
      g.offsets(b, w, perm, sv, ov.data());
      g.offsets(b, w, perm, so, oo.data());
      g.offsets(b, w, perm, sl, ol.data());
      gather(qp, oq.data(), h * sq.n, N, hd, A(scale), qb.data());
      gather(kp, ok.data(), h * sk.n, N, hd, A(1), kb.data());
      gather(vp, ov.data(), h * sv.n, N, hd, A(1), vb.data());
      for (int64_t r = 0; r < win.nreg; ++r) {
        const int64_t r0 = win.start[r], n = win.start[r + 1] - r0;
        A* s = sb.data();
        wa::mm<A>(opts, n, n, hd, qb.data() + r0 * hd, hd, false, kb.data() + r0 * hd, hd, true,
                  s, n);
        const A* bias = win.bias(tp, h, r);
        for (int64_t i = 0; i < n; ++i) {
          A m;
          const A sum = wa::softmax_row<A>(s + i * n, bias ? bias + i * n : nullptr, n, m);
          inv[r0 + i] = A(1) / sum;
          lp[ol[r0 + i] + h] = m + std::log(sum);
        }
        // Unnormalised P @ V; rows are divided by their sums on the way out.
        wa::mm<A>(opts, n, hd, n, s, n, false, vb.data() + r0 * hd, hd, false,
                  ob.data() + r0 * hd, hd);
      }
      scatter(ob.data(), oo.data(), h * so.n, N, hd, A(1), inv.data(), op);
    }
  });
}

// Windows per backward unit (the table-gradient granule): fixed by the problem, never by the
// thread count, so the partial sums and their order are the same for every thread count.
int64_t unit_windows(const Geometry& g) {
  return std::clamp<int64_t>(g.B * g.nW * g.nh / 64, 1, std::min<int64_t>(8, g.nW));
}

template <typename S>
void bwd_kernel(const Geometry& g, const at::Tensor& dout, const at::Tensor& q,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                const at::Tensor& lse, const at::Tensor& table, at::Tensor& dq, at::Tensor& dk,
                at::Tensor& dv, at::Tensor& partial, double scale) {
  using A = acc_t<S>;
  const auto opts = q.options().dtype(c10::CppTypeToScalarType<A>::value);
  const S *qp = q.data_ptr<S>(), *kp = k.data_ptr<S>(), *vp = v.data_ptr<S>();
  const S *gp = dout.data_ptr<S>(), *op = out.data_ptr<S>();
  S *dqp = dq.data_ptr<S>(), *dkp = dk.data_ptr<S>(), *dvp = dv.data_ptr<S>();
  const A* lp = lse.data_ptr<A>();
  const A* tp = table.defined() ? table.data_ptr<A>() : nullptr;
  A* pp = tp != nullptr ? partial.data_ptr<A>() : nullptr;
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  const Strides sg = strides_of(dout), so = strides_of(out), sd = strides_of(dq);
  const Strides sl = strides_of(lse);
  const int64_t N = g.N, hd = g.hd, NN = N * N;
  const int64_t per = unit_windows(g), groups = (g.nW + per - 1) / per;
  const int64_t units = g.nh * g.B * groups;  // head-major, like the forward's tasks
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    Window<A> win(g);
    std::vector<A> qb(N * hd), kb(N * hd), vb(N * hd), gb(N * hd), ob(N * hd);
    std::vector<A> dqb(N * hd), dkb(N * hd), dvb(N * hd), pb(NN), dpb(NN);
    std::vector<A> acc(tp != nullptr ? NN : 0), delta(N), row_lse(N);
    std::vector<int64_t> oq(N), ok(N), ov(N), og(N), oo(N), ol(N), od(N);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t h = u / (g.B * groups), b = (u / groups) % g.B, grp = u % groups;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t w = grp * per; w < std::min(g.nW, (grp + 1) * per); ++w) {
        win.set(w);
        const int32_t* perm = win.perm.data();
        g.offsets(b, w, perm, sq, oq.data());
        g.offsets(b, w, perm, sk, ok.data());
        g.offsets(b, w, perm, sv, ov.data());
        g.offsets(b, w, perm, sg, og.data());
        g.offsets(b, w, perm, so, oo.data());
        g.offsets(b, w, perm, sl, ol.data());
        g.offsets(b, w, perm, sd, od.data());
        gather(qp, oq.data(), h * sq.n, N, hd, A(scale), qb.data());
        gather(kp, ok.data(), h * sk.n, N, hd, A(1), kb.data());
        gather(vp, ov.data(), h * sv.n, N, hd, A(1), vb.data());
        gather(gp, og.data(), h * sg.n, N, hd, A(1), gb.data());
        gather(op, oo.data(), h * so.n, N, hd, A(1), ob.data());
        for (int64_t i = 0; i < N; ++i) {
          A d = 0;
          const A *gi = gb.data() + i * hd, *oi = ob.data() + i * hd;
          for (int64_t e = 0; e < hd; ++e) d += gi[e] * oi[e];
          delta[i] = d;  // rowsum(dO * O) = rowsum(dP * P): the softmax correction
          row_lse[i] = lp[ol[i] + h];
        }
        for (int64_t r = 0; r < win.nreg; ++r) {
          const int64_t r0 = win.start[r], n = win.start[r + 1] - r0;
          const A *qr = qb.data() + r0 * hd, *kr = kb.data() + r0 * hd;
          const A *vr = vb.data() + r0 * hd, *gr = gb.data() + r0 * hd;
          A *p = pb.data(), *ds = dpb.data();
          wa::mm<A>(opts, n, n, hd, qr, hd, false, kr, hd, true, p, n);  // S = (scale Q) K^T
          const A* bias = win.bias(tp, h, r);
          for (int64_t i = 0; i < n; ++i) {  // P = exp(S + bias - lse), recomputed
            wa::exp_row<A>(p + i * n, bias ? bias + i * n : nullptr, row_lse[r0 + i], n);
          }
          wa::mm<A>(opts, n, hd, n, p, n, true, gr, hd, false, dvb.data() + r0 * hd, hd);
          wa::mm<A>(opts, n, n, hd, gr, hd, false, vr, hd, true, ds, n);  // dP = dO V^T
          const bool dense_acc = tp != nullptr && win.nreg == 1;
          for (int64_t i = 0; i < n; ++i) {  // dS = P (dP - delta), summed into acc
            wa::ds_row<A>(ds + i * n, p + i * n, delta[r0 + i],
                          dense_acc ? acc.data() + i * N : nullptr, n);
          }
          if (tp != nullptr && !dense_acc) {
            for (int64_t i = 0; i < n; ++i) {
              A* arow = acc.data() + int64_t(perm[r0 + i]) * N;
              const A* drow = ds + i * n;
              for (int64_t j = 0; j < n; ++j) arow[perm[r0 + j]] += drow[j];
            }
          }
          wa::mm<A>(opts, n, hd, n, ds, n, false, kr, hd, false, dqb.data() + r0 * hd, hd);
          wa::mm<A>(opts, n, hd, n, ds, n, true, qr, hd, false, dkb.data() + r0 * hd, hd);
        }
        scatter(dqb.data(), od.data(), h * sd.n, N, hd, A(scale), (const A*)nullptr, dqp);
        scatter(dkb.data(), od.data(), h * sd.n, N, hd, A(1), (const A*)nullptr, dkp);
        scatter(dvb.data(), od.data(), h * sd.n, N, hd, A(1), (const A*)nullptr, dvp);
      }
      if (pp != nullptr) {  // the unit's own partial row (h, b * groups + grp, T)
        A* part = pp + u * g.T;
        std::fill(part, part + g.T, A(0));
        for (int64_t e = 0; e < NN; ++e) part[g.idx[e]] += acc[e];
      }
    }
  });
}

bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// Checks q and the window arguments; returns the bias table's row count T. Everything the
// kernels index is bounded by what is checked here and in check_rows / check_table / check_lse.
int64_t check_args(const at::Tensor& q, const std::vector<int64_t>& window,
                   const std::vector<int64_t>& shift, const std::vector<int64_t>& bias_window) {
  TORCH_CHECK(q.device().is_cpu(), "window_attention3d (cpu): q must be a CPU tensor, got ",
              q.device());
  TORCH_CHECK(q.dim() == 6, "window_attention3d (cpu): q must be (B, D, H, W, heads, head_dim), "
              "got ", q.sizes());
  TORCH_CHECK(is_float_type(q.scalar_type()),
              "window_attention3d (cpu): q must be float32/float64/float16/bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(window.size() == 3, "window_attention3d (cpu): window needs 3 entries, got ",
              window.size());
  TORCH_CHECK(shift.size() == 3, "window_attention3d (cpu): shift needs 3 entries, got ",
              shift.size());
  TORCH_CHECK(bias_window.size() == 3,
              "window_attention3d (cpu): bias_window needs 3 entries, got ", bias_window.size());
  int64_t rows = 1;
  for (int a = 0; a < 3; ++a) {
    const int64_t n = q.size(1 + a);
    TORCH_CHECK(window[a] >= 1 && n % std::max<int64_t>(1, window[a]) == 0,
                "window_attention3d (cpu): the grid ", q.sizes().slice(1, 3),
                " must be a multiple of window ", at::IntArrayRef(window));
    TORCH_CHECK(shift[a] >= 0 && shift[a] < window[a], "window_attention3d (cpu): shift ",
                at::IntArrayRef(shift), " must be in [0, window ", at::IntArrayRef(window), ")");
    TORCH_CHECK(bias_window[a] >= window[a] && bias_window[a] <= (1 << 20),
                "window_attention3d (cpu): bias_window ", at::IntArrayRef(bias_window),
                " must be >= window ", at::IntArrayRef(window), " (and <= 2^20)");
    rows *= 2 * bias_window[a] - 1;
  }
  // Table rows are addressed with int32 (the (N, N) index of a window).
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(),
              "window_attention3d (cpu): bias_window ", at::IntArrayRef(bias_window),
              " gives more table rows than int32 can address");
  return rows;
}

void check_rows(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "window_attention3d (cpu): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == q.sizes(), "window_attention3d (cpu): ", name,
              " must have the shape of q ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "window_attention3d (cpu): ", name,
              " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  // An empty tensor is contiguous whatever its strides (e.g. the expanded gradient of a sum).
  TORCH_CHECK(t.stride(5) == 1 || t.size(5) == 1 || t.numel() == 0,
              "window_attention3d (cpu): ", name, " needs a unit stride on head_dim");
}

// The table as the kernels read it: (T, heads) contiguous in the accumulation dtype.
at::Tensor check_table(const std::optional<at::Tensor>& table, const at::Tensor& q, int64_t T,
                       at::ScalarType acc) {
  if (!table.has_value() || !table->defined()) return at::Tensor();
  const at::Tensor& t = *table;
  TORCH_CHECK(t.device().is_cpu(), "window_attention3d (cpu): table must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(is_float_type(t.scalar_type()),
              "window_attention3d (cpu): table must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == T && t.size(1) == q.size(4),
              "window_attention3d (cpu): table must be (T, heads) = (", T, ", ", q.size(4),
              ") for bias_window, got ", t.sizes());
  return t.to(acc).contiguous();
}

void check_lse(const at::Tensor& lse, const at::Tensor& q, at::ScalarType acc) {
  TORCH_CHECK(lse.device().is_cpu(), "window_attention3d (cpu): lse must be a CPU tensor, got ",
              lse.device());
  TORCH_CHECK(lse.dim() == 5 && lse.sizes() == q.sizes().slice(0, 5),
              "window_attention3d (cpu): lse must be (B, D, H, W, heads) = ",
              q.sizes().slice(0, 5), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, "window_attention3d (cpu): lse must be ", acc, ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous(), "window_attention3d (cpu): lse must be contiguous");
}

at::ScalarType acc_type(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention3d_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, std::vector<int64_t> window,
    std::vector<int64_t> shift, std::vector<int64_t> bias_window, double scale) {
  const int64_t rows = check_args(q, window, shift, bias_window);
  check_rows(q, q, "q");
  check_rows(k, q, "k");
  check_rows(v, q, "v");
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor tab = check_table(table, q, rows, acc);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  const Geometry g(q, window, shift, bias_window, tab.defined());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "wa3d_fwd", [&] {
    fwd_kernel<scalar_t>(g, q, k, v, tab, out, lse, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention3d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& table,
    std::vector<int64_t> window, std::vector<int64_t> shift, std::vector<int64_t> bias_window,
    double scale) {
  const int64_t rows = check_args(q, window, shift, bias_window);
  check_rows(q, q, "q");
  check_rows(k, q, "k");
  check_rows(v, q, "v");
  check_rows(grad_out, q, "grad_out");
  check_rows(out, q, "out");
  const auto acc = acc_type(q.scalar_type());
  check_lse(lse, q, acc);
  const at::Tensor tab = check_table(table, q, rows, acc);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) {
    // Nothing to attend to: zero gradients (the table's too), without building the geometry.
    at::Tensor dt = tab.defined() ? at::zeros_like(*table) : at::empty({0}, q.options());
    return {dq.zero_(), dk.zero_(), dv.zero_(), dt};
  }
  const Geometry g(q, window, shift, bias_window, tab.defined());
  at::Tensor partial, dtable;
  const int64_t parts = g.B * ((g.nW + unit_windows(g) - 1) / unit_windows(g));
  if (tab.defined()) partial = at::empty({g.nh, parts, g.T}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "wa3d_bwd", [&] {
    bwd_kernel<scalar_t>(g, grad_out, q, k, v, out, lse, tab, dq, dk, dv, partial, scale);
  });
  if (!tab.defined()) return {dq, dk, dv, at::empty({0}, q.options())};
  // Fixed-order sum of the per-unit partials: (heads, parts, T) -> (T, heads).
  at::Tensor red = at::zeros({g.T, g.nh}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "wa3d_table", [&] {
    const scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* rp = red.data_ptr<scalar_t>();
    const int64_t T = g.T, nh = g.nh;
    at::parallel_for(0, nh * T, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t h = e / T, r = e % T;
        scalar_t acc_v = 0;
        for (int64_t m = 0; m < parts; ++m) acc_v += pp[(h * parts + m) * T + r];
        rp[r * nh + h] = acc_v;
      }
    });
  });
  dtable = red.to(table->scalar_type());
  return {dq, dk, dv, dtable};
}

}  // namespace mae3d
