// CPU kernels of mae3d::window_attention3d: Swin (shifted) window attention, one window at a time.
//
// Work is split into tasks (head, sample, window), grouped into small chunks run by
// at::parallel_for. A task gathers its window's q, k, v rows into fp32 (fp64 for fp64 input)
// buffers; the chunk's N x N logits come from one batched GEMM (at::bmm_out: MKL does the heavy
// lifting, single-threaded inside the parallel region); then the relative-position bias and the
// shift mask are added, softmax, @ v, and the rows are scattered back. A thread holds one chunk's
// scores (<= ~4 MiB) at a time: the eager path instead materialises B * nW * heads of them plus
// the gathered bias and the mask.
//
// Tasks are ordered head-major so that a thread's consecutive tasks share a head: the dense bias
// of the window (table rows gathered through the index) is rebuilt only when the head changes.
//
// Backward recomputes the probabilities from the saved log-sum-exp (flash-attention style). The
// table gradient is accumulated per task into its own partial row of length T (table rows) and
// the partials are summed over samples and windows in a fixed order: deterministic, no atomics.
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

namespace mae3d {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// torchvision adds -100 between tokens of different shift regions. Its probabilities, ~e^-100,
// are below float's normal range: the denormals they produce slow every later CPU instruction
// that touches them (softmax, both GEMMs) by up to 100x. -inf gives exact zeros instead; the
// results differ by ~1e-44 relative (every row keeps its own token, so none is all -inf).
constexpr double kMaskValue = -std::numeric_limits<double>::infinity();

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

  // Offsets (without the head term) of window w's tokens in a tensor with strides s.
  void offsets(int64_t b, int64_t w, const Strides& s, int64_t* off) const {
    const int64_t wc[3] = {w / (nwin[1] * nwin[2]), (w / nwin[2]) % nwin[1], w % nwin[2]};
    const int64_t grid[3] = {D, H, W};
    for (int64_t p = 0; p < N; ++p) {
      int64_t o = b * s.b;
      const int64_t st[3] = {s.d, s.h, s.w};
      for (int a = 0; a < 3; ++a) {
        // Rolled position wc*win + local maps back to the unrolled grid position + shift.
        o += ((wc[a] * win[a] + tok[p * 3 + a] + sft[a]) % grid[a]) * st[a];
      }
      off[p] = o;
    }
  }

  // Region label of each token of window w; returns false when all tokens share one region.
  bool labels(int64_t w, int32_t* lab) const {
    const int64_t wc[3] = {w / (nwin[1] * nwin[2]), (w / nwin[2]) % nwin[1], w % nwin[2]};
    bool split = false;
    for (int a = 0; a < 3; ++a) split |= sft[a] > 0 && wc[a] == nwin[a] - 1;
    for (int64_t p = 0; p < N; ++p) {
      int32_t l = 0;
      for (int a = 0; a < 3; ++a) {
        // Only the last window of a shifted axis straddles the wrap-around: tokens from its
        // local coordinate win - shift on come from the other end of the grid.
        const bool hi = sft[a] > 0 && wc[a] == nwin[a] - 1 && tok[p * 3 + a] >= win[a] - sft[a];
        l = l * 2 + (hi ? 1 : 0);
      }
      lab[p] = l;
    }
    return split;
  }
};

// Tasks are processed in chunks of consecutive tasks: one batched GEMM / exp call per chunk
// rather than per window. Small per-window calls make torch fork and join its intra-op threads
// hundreds of times per op when this file runs outside a parallel region (a build without
// -fopenmp), which costs milliseconds each on a busy machine. A chunk's scores stay <= ~4 MiB
// of floats, far below all windows' scores, and chunks stay numerous enough to share out.
int64_t chunk_size(const Geometry& g, int64_t tasks) {
  const int64_t by_mem = std::max<int64_t>(1, (int64_t(1) << 20) / (g.N * g.N));
  const int64_t by_par = std::max<int64_t>(1, tasks / (4 * int64_t(at::get_num_threads())));
  return std::min<int64_t>({by_mem, by_par, 16});
}

// Per-thread scratch: dense bias of the current head, token offsets and labels of the chunk.
template <typename A>
struct Scratch {
  at::Tensor bias;  // (N, N)
  int64_t bias_head = -1;
  std::vector<int64_t> off_q, off_k, off_v, off_o, off_l;  // (chunk, N) each
  std::vector<int32_t> lab;                                // (chunk, N)
  std::vector<char> split;                                 // (chunk,)

  Scratch(const Geometry& g, int64_t chunk, const at::TensorOptions& opts)
      : off_q(chunk * g.N), off_k(chunk * g.N), off_v(chunk * g.N), off_o(chunk * g.N),
        off_l(chunk * g.N), lab(chunk * g.N), split(chunk) {
    if (!g.idx.empty()) bias = at::empty({g.N, g.N}, opts);
  }

  void ensure_bias(const Geometry& g, const A* table, int64_t h) {
    if (table == nullptr || bias_head == h) return;
    A* bp = bias.data_ptr<A>();
    const int64_t NN = g.N * g.N;
    for (int64_t e = 0; e < NN; ++e) bp[e] = table[int64_t(g.idx[e]) * g.nh + h];
    bias_head = h;
  }
};

struct Task {
  int64_t h, b, w;
  Task(const Geometry& g, int64_t t)
      : h(t / (g.B * g.nW)), b((t / g.nW) % g.B), w(t % g.nW) {}
};

template <typename S, typename A>
void gather(const S* src, const int64_t* off, int64_t head_off, int64_t N, int64_t hd, A mul,
            A* dst) {
  for (int64_t p = 0; p < N; ++p) {
    const S* row = src + off[p] + head_off;
    A* out = dst + p * hd;
    for (int64_t c = 0; c < hd; ++c) out[c] = static_cast<A>(row[c]) * mul;
  }
}

template <typename S, typename A>
void scatter(const A* src, const int64_t* off, int64_t head_off, int64_t N, int64_t hd, A mul,
             S* dst) {
  for (int64_t p = 0; p < N; ++p) {
    const A* row = src + p * hd;
    S* out = dst + off[p] + head_off;
    for (int64_t c = 0; c < hd; ++c) out[c] = static_cast<S>(row[c] * mul);
  }
}

// logits += bias (+ mask), then logits -= sub[i] per row: one window's (N, N) logits.
template <typename A>
void add_bias_mask(int64_t N, const A* bias, const int32_t* lab, bool split, const A* sub,
                   A* s) {
  for (int64_t i = 0; i < N; ++i) {
    A* row = s + i * N;
    if (bias != nullptr) {
      const A* brow = bias + i * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] += brow[j];
    }
    if (split) {
      const int32_t li = lab[i];
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] += lab[j] != li ? A(kMaskValue) : A(0);
    }
    if (sub != nullptr) {
      const A m = sub[i];
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] -= m;
    }
  }
}

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
  const int64_t N = g.N, hd = g.hd, NN = N * N, tasks = g.nh * g.B * g.nW;
  const int64_t chunk = chunk_size(g, tasks), chunks = (tasks + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(g, chunk, opts);
    at::Tensor qb = at::empty({chunk, N, hd}, opts), kb = at::empty({chunk, N, hd}, opts);
    at::Tensor vb = at::empty({chunk, N, hd}, opts), ob = at::empty({chunk, N, hd}, opts);
    at::Tensor sb = at::empty({chunk, N, N}, opts);
    std::vector<A> rmax(N);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * chunk, C = std::min(chunk, tasks - t0);
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        int64_t* oq = sc.off_q.data() + x * N;
        int64_t* ok = sc.off_k.data() + x * N;
        int64_t* ov = sc.off_v.data() + x * N;
        g.offsets(T.b, T.w, sq, oq);
        g.offsets(T.b, T.w, sk, ok);
        g.offsets(T.b, T.w, sv, ov);
        g.offsets(T.b, T.w, so, sc.off_o.data() + x * N);
        g.offsets(T.b, T.w, sl, sc.off_l.data() + x * N);
        sc.split[x] = g.labels(T.w, sc.lab.data() + x * N);
        gather(qp, oq, T.h * sq.n, N, hd, A(scale), qb.data_ptr<A>() + x * N * hd);
        gather(kp, ok, T.h * sk.n, N, hd, A(1), kb.data_ptr<A>() + x * N * hd);
        gather(vp, ov, T.h * sv.n, N, hd, A(1), vb.data_ptr<A>() + x * N * hd);
      }
      at::Tensor sC = sb.narrow(0, 0, C), qC = qb.narrow(0, 0, C), kC = kb.narrow(0, 0, C);
      at::Tensor vC = vb.narrow(0, 0, C), oC = ob.narrow(0, 0, C);
      at::bmm_out(sC, qC, kC.transpose(1, 2));
      A* s_all = sb.data_ptr<A>();
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        sc.ensure_bias(g, tp, T.h);
        A* s = s_all + x * NN;
        add_bias_mask<A>(N, tp ? sc.bias.template data_ptr<A>() : nullptr,
                         sc.lab.data() + x * N, sc.split[x], nullptr, s);
        for (int64_t i = 0; i < N; ++i) {
          A m = -std::numeric_limits<A>::infinity();
          const A* row = s + i * N;
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < N; ++j) m = std::max(m, row[j]);
          rmax[i] = m;
        }
        add_bias_mask<A>(N, nullptr, nullptr, false, rmax.data(), s);
        // lse = max + log(sum): the max now, the log of the row sum after the exp below.
        for (int64_t i = 0; i < N; ++i) lp[sc.off_l[x * N + i] + T.h] = rmax[i];
      }
      sC.exp_();  // torch's vectorised exp; a scalar std::exp loop would dominate the runtime
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        A* s = s_all + x * NN;
        for (int64_t i = 0; i < N; ++i) {
          A* row = s + i * N;
          A sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < N; ++j) sum += row[j];
          const A inv = A(1) / sum;
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) row[j] *= inv;
          lp[sc.off_l[x * N + i] + T.h] += std::log(sum);
        }
      }
      at::bmm_out(oC, sC, vC);
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        scatter(ob.data_ptr<A>() + x * N * hd, sc.off_o.data() + x * N, T.h * so.n, N, hd, A(1),
                op);
      }
    }
  });
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
  const int64_t N = g.N, hd = g.hd, NN = N * N, tasks = g.nh * g.B * g.nW;
  const int64_t chunk = chunk_size(g, tasks), chunks = (tasks + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> sc(g, chunk, opts);
    std::vector<int64_t> off_g(chunk * N), off_d(chunk * N);
    at::Tensor qb = at::empty({chunk, N, hd}, opts), kb = at::empty({chunk, N, hd}, opts);
    at::Tensor vb = at::empty({chunk, N, hd}, opts), gb = at::empty({chunk, N, hd}, opts);
    at::Tensor xb = at::empty({chunk, N, hd}, opts), ob = at::empty({N, hd}, opts);
    at::Tensor pb = at::empty({chunk, N, N}, opts), dpb = at::empty({chunk, N, N}, opts);
    std::vector<A> delta(chunk * N), row_lse(N);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * chunk, C = std::min(chunk, tasks - t0);
      A* p_all = pb.data_ptr<A>();
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        int64_t* oq = sc.off_q.data() + x * N;
        int64_t* ok = sc.off_k.data() + x * N;
        int64_t* ov = sc.off_v.data() + x * N;
        int64_t* oo = sc.off_o.data() + x * N;
        int64_t* ol = sc.off_l.data() + x * N;
        g.offsets(T.b, T.w, sq, oq);
        g.offsets(T.b, T.w, sk, ok);
        g.offsets(T.b, T.w, sv, ov);
        g.offsets(T.b, T.w, so, oo);
        g.offsets(T.b, T.w, sl, ol);
        g.offsets(T.b, T.w, sg, off_g.data() + x * N);
        g.offsets(T.b, T.w, sd, off_d.data() + x * N);
        sc.split[x] = g.labels(T.w, sc.lab.data() + x * N);
        gather(qp, oq, T.h * sq.n, N, hd, A(scale), qb.data_ptr<A>() + x * N * hd);
        gather(kp, ok, T.h * sk.n, N, hd, A(1), kb.data_ptr<A>() + x * N * hd);
        gather(vp, ov, T.h * sv.n, N, hd, A(1), vb.data_ptr<A>() + x * N * hd);
        A* gq = gb.data_ptr<A>() + x * N * hd;
        gather(gp, off_g.data() + x * N, T.h * sg.n, N, hd, A(1), gq);
        gather(op, oo, T.h * so.n, N, hd, A(1), ob.data_ptr<A>());
        const A* oq_rows = ob.data_ptr<A>();
        for (int64_t i = 0; i < N; ++i) {
          A acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t e = 0; e < hd; ++e) acc += gq[i * hd + e] * oq_rows[i * hd + e];
          delta[x * N + i] = acc;  // rowsum(dO * O) = rowsum(dP * P): the softmax correction
        }
      }
      at::Tensor pC = pb.narrow(0, 0, C), dpC = dpb.narrow(0, 0, C), xC = xb.narrow(0, 0, C);
      at::Tensor qC = qb.narrow(0, 0, C), kC = kb.narrow(0, 0, C), vC = vb.narrow(0, 0, C);
      at::Tensor gC = gb.narrow(0, 0, C);
      at::bmm_out(pC, qC, kC.transpose(1, 2));
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        sc.ensure_bias(g, tp, T.h);
        for (int64_t i = 0; i < N; ++i) row_lse[i] = lp[sc.off_l[x * N + i] + T.h];
        add_bias_mask<A>(N, tp ? sc.bias.template data_ptr<A>() : nullptr,
                         sc.lab.data() + x * N, sc.split[x], row_lse.data(), p_all + x * NN);
      }
      pC.exp_();  // P = exp(S - lse), recomputed
      at::bmm_out(xC, pC.transpose(1, 2), gC);  // dV = P^T dO
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        scatter(xb.data_ptr<A>() + x * N * hd, off_d.data() + x * N, T.h * sd.n, N, hd, A(1),
                dvp);
      }
      at::bmm_out(dpC, gC, vC.transpose(1, 2));  // dP = dO V^T
      A* ds_all = dpb.data_ptr<A>();
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        A* ds = ds_all + x * NN;
        const A* p = p_all + x * NN;
        for (int64_t i = 0; i < N; ++i) {
          A* drow = ds + i * N;
          const A* prow = p + i * N;
          const A di = delta[x * N + i];
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) drow[j] = prow[j] * (drow[j] - di);
        }
        if (pp != nullptr) {
          // The task's own partial row (h, b * nW + w, T); summed in a fixed order afterwards.
          A* part = pp + (T.h * g.B * g.nW + T.b * g.nW + T.w) * g.T;
          std::fill(part, part + g.T, A(0));
          for (int64_t e = 0; e < NN; ++e) part[g.idx[e]] += ds[e];
        }
      }
      at::bmm_out(xC, dpC, kC);  // dQ = dS K * scale
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        scatter(xb.data_ptr<A>() + x * N * hd, off_d.data() + x * N, T.h * sd.n, N, hd,
                A(scale), dqp);
      }
      at::bmm_out(xC, dpC.transpose(1, 2), qC);  // dK = dS^T (scale Q)
      for (int64_t x = 0; x < C; ++x) {
        const Task T(g, t0 + x);
        scatter(xb.data_ptr<A>() + x * N * hd, off_d.data() + x * N, T.h * sd.n, N, hd, A(1),
                dkp);
      }
    }
  });
}

void check_args(const at::Tensor& q, const std::vector<int64_t>& window,
                const std::vector<int64_t>& shift, const std::vector<int64_t>& bias_window) {
  TORCH_CHECK(q.dim() == 6, "window_attention3d: q must be (B, D, H, W, heads, head_dim)");
  TORCH_CHECK(window.size() == 3 && shift.size() == 3 && bias_window.size() == 3,
              "window_attention3d: window, shift and bias_window need 3 entries");
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(window[a] >= 1 && q.size(1 + a) % window[a] == 0,
                "window_attention3d: the grid must be a multiple of the window");
    TORCH_CHECK(shift[a] >= 0 && shift[a] < window[a], "window_attention3d: bad shift");
    TORCH_CHECK(bias_window[a] >= window[a], "window_attention3d: bias_window < window");
  }
}

void check_rows(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(),
              "window_attention3d: ", name, " must match q in shape and dtype");
  TORCH_CHECK(t.stride(5) == 1 || t.size(5) == 1,
              "window_attention3d: ", name, " needs a unit stride on head_dim");
}

at::ScalarType acc_type(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention3d_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, std::vector<int64_t> window,
    std::vector<int64_t> shift, std::vector<int64_t> bias_window, double scale) {
  check_args(q, window, shift, bias_window);
  check_rows(q, q, "q");
  check_rows(k, q, "k");
  check_rows(v, q, "v");
  const auto acc = acc_type(q.scalar_type());
  at::Tensor tab;
  if (table.has_value() && table->defined()) tab = table->to(acc).contiguous();
  const Geometry g(q, window, shift, bias_window, tab.defined());
  if (tab.defined()) {
    TORCH_CHECK(tab.dim() == 2 && tab.size(0) == g.T && tab.size(1) == g.nh,
                "window_attention3d: table must be (T, heads)");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.B, g.D, g.H, g.W, g.nh}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
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
  check_args(q, window, shift, bias_window);
  check_rows(k, q, "k");
  check_rows(v, q, "v");
  check_rows(grad_out, q, "grad_out");
  check_rows(out, q, "out");
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == acc && lse.dim() == 5,
              "window_attention3d: lse must be (B, D, H, W, heads) contiguous");
  at::Tensor tab;
  if (table.has_value() && table->defined()) tab = table->to(acc).contiguous();
  const Geometry g(q, window, shift, bias_window, tab.defined());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  at::Tensor partial, dtable;
  if (tab.defined()) partial = at::empty({g.nh, g.B * g.nW, g.T}, q.options().dtype(acc));
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "wa3d_bwd", [&] {
      bwd_kernel<scalar_t>(g, grad_out, q, k, v, out, lse, tab, dq, dk, dv, partial, scale);
    });
  }
  if (!tab.defined()) return {dq, dk, dv, at::empty({0}, q.options())};
  // Fixed-order sum of the per-task partials: (heads, B * nW, T) -> (T, heads).
  at::Tensor red = at::zeros({g.T, g.nh}, q.options().dtype(acc));
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "wa3d_table", [&] {
      const scalar_t* pp = partial.data_ptr<scalar_t>();
      scalar_t* rp = red.data_ptr<scalar_t>();
      const int64_t parts = g.B * g.nW, T = g.T, nh = g.nh;
      at::parallel_for(0, nh * T, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t h = e / T, r = e % T;
          scalar_t acc_v = 0;
          for (int64_t m = 0; m < parts; ++m) acc_v += pp[(h * parts + m) * T + r];
          rp[r * nh + h] = acc_v;
        }
      });
    });
  }
  dtable = red.to(table->scalar_type());
  return {dq, dk, dv, dtable};
}

}  // namespace mae3d
