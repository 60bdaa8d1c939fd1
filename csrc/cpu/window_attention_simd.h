// Row kernels and the GEMM helper of the CPU window attention (csrc/cpu/window_attention.cpp).
//
// The extension is compiled without -march flags (SSE2 only), so the float row kernels have an
// AVX2/FMA variant selected at run time (__builtin_cpu_supports); everything else, and float64,
// uses the portable loops. The AVX2 exp is Cephes' expf scheme (round to n = x / ln 2, two-part
// ln 2 reduction, degree-6 polynomial, scale by 2^n): ~1 ulp on the range used here, and exact
// zeros below -87 so no denormal ever enters the GEMMs.
//
// Rows are short (one window's keys, <= a few hundred) and live in L1: each kernel makes one or
// two passes over a row that the preceding GEMM just wrote.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MAE3D_WA_X86 1
#else
#define MAE3D_WA_X86 0
#endif

namespace mae3d {
namespace wa {

// C (m x n, row stride ldc) = op(A) op(B), op(A) m x k, op(B) k x n, all row-major with unit
// column stride; ta / tb: A / B are stored transposed. MKL/OpenBLAS through at::mm_out (single
// threaded inside at::parallel_for).
template <typename A>
void mm(const at::TensorOptions& opts, int64_t m, int64_t n, int64_t k, const A* a, int64_t lda,
        bool ta, const A* b, int64_t ldb, bool tb, A* c, int64_t ldc) {
  auto view = [&](const A* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<A*>(p), t ? at::IntArrayRef{cols, rows}
                                                      : at::IntArrayRef{rows, cols},
                                 {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
}

// ---- portable row kernels --------------------------------------------------------------------
// s += bias (bias may be null); m = max(s); s = exp(s - m); returns sum(s) and m.
template <typename A>
A softmax_row_ref(A* s, const A* bias, int64_t n, A& m) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (bias != nullptr) s[j] += bias[j];
    mx = std::max(mx, s[j]);
  }
  A sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  m = mx;
  return sum;
}

// p = exp(p + bias - sub) (bias may be null).
template <typename A>
void exp_row_ref(A* p, const A* bias, A sub, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] + (bias ? bias[j] : A(0)) - sub);
}

// dp = p * (dp - d); acc += dp when acc is not null.
template <typename A>
void ds_row_ref(A* dp, const A* p, A d, A* acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dp[j] = p[j] * (dp[j] - d);
    if (acc != nullptr) acc[j] += dp[j];
  }
}

#if MAE3D_WA_X86
inline bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}

__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // also true for -inf
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_mask, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lanes j < rem of a vector (the tail of a row).
__attribute__((target("avx2,fma"))) inline __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The exp loops are unrolled twice: exp8 is one long dependency chain, two in flight hide it.
__attribute__((target("avx2,fma"))) inline float softmax_row_avx2(float* s, const float* bias,
                                                                  int64_t n, float& m) {
  const int64_t nv = n & ~int64_t(7), n2 = n & ~int64_t(15);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i tm = tail_mask(n - nv);
  __m256 vmax = ninf;
  for (int64_t j = 0; j < nv; j += 8) {
    __m256 x = _mm256_loadu_ps(s + j);
    if (bias != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(s + j, x);
    vmax = _mm256_max_ps(vmax, x);
  }
  if (nv < n) {
    __m256 x = _mm256_maskload_ps(s + nv, tm);
    if (bias != nullptr) x = _mm256_add_ps(x, _mm256_maskload_ps(bias + nv, tm));
    _mm256_maskstore_ps(s + nv, tm, x);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(tm)));
  }
  const float mx = hmax8(vmax);
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j < n2; j += 16) {
    const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vm));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  for (; j < nv; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    sum0 = _mm256_add_ps(sum0, e);
  }
  if (nv < n) {
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + nv, tm), vm)),
                                   _mm256_castsi256_ps(tm));
    _mm256_maskstore_ps(s + nv, tm, e);
    sum1 = _mm256_add_ps(sum1, e);
  }
  m = mx;
  return hsum8(_mm256_add_ps(sum0, sum1));
}

__attribute__((target("avx2,fma"))) inline __m256 exp_arg(const float* p, const float* bias,
                                                           __m256 sub) {
  const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p), sub);
  return bias != nullptr ? _mm256_add_ps(x, _mm256_loadu_ps(bias)) : x;
}

__attribute__((target("avx2,fma"))) inline void exp_row_avx2(float* p, const float* bias,
                                                             float sub, int64_t n) {
  const int64_t nv = n & ~int64_t(7), n2 = n & ~int64_t(15);
  const __m256 vs = _mm256_set1_ps(sub);
  int64_t j = 0;
  for (; j < n2; j += 16) {
    const __m256 e0 = exp8(exp_arg(p + j, bias ? bias + j : nullptr, vs));
    const __m256 e1 = exp8(exp_arg(p + j + 8, bias ? bias + j + 8 : nullptr, vs));
    _mm256_storeu_ps(p + j, e0);
    _mm256_storeu_ps(p + j + 8, e1);
  }
  for (; j < nv; j += 8) {
    _mm256_storeu_ps(p + j, exp8(exp_arg(p + j, bias ? bias + j : nullptr, vs)));
  }
  if (nv < n) {
    const __m256i tm = tail_mask(n - nv);
    __m256 x = _mm256_sub_ps(_mm256_maskload_ps(p + nv, tm), vs);
    if (bias != nullptr) x = _mm256_add_ps(x, _mm256_maskload_ps(bias + nv, tm));
    _mm256_maskstore_ps(p + nv, tm, exp8(x));
  }
}

__attribute__((target("avx2,fma"))) inline void ds_row_avx2(float* dp, const float* p, float d,
                                                            float* acc, int64_t n) {
  const int64_t nv = n & ~int64_t(7);
  const __m256 vd = _mm256_set1_ps(d);
  for (int64_t j = 0; j < nv; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + j),
                                   _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd));
    _mm256_storeu_ps(dp + j, x);
    if (acc != nullptr) _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), x));
  }
  ds_row_ref(dp + nv, p + nv, d, acc ? acc + nv : nullptr, n - nv);
}
#endif

// ---- dispatch ----------------------------------------------------------------------------------
template <typename A>
A softmax_row(A* s, const A* bias, int64_t n, A& m) {
#if MAE3D_WA_X86
  if constexpr (std::is_same_v<A, float>) {
    if (has_avx2()) return softmax_row_avx2(s, bias, n, m);
  }
#endif
  return softmax_row_ref(s, bias, n, m);
}

template <typename A>
void exp_row(A* p, const A* bias, A sub, int64_t n) {
#if MAE3D_WA_X86
  if constexpr (std::is_same_v<A, float>) {
    if (has_avx2()) return exp_row_avx2(p, bias, sub, n);
  }
#endif
  exp_row_ref(p, bias, sub, n);
}

template <typename A>
void ds_row(A* dp, const A* p, A d, A* acc, int64_t n) {
#if MAE3D_WA_X86
  if constexpr (std::is_same_v<A, float>) {
    if (has_avx2()) return ds_row_avx2(dp, p, d, acc, n);
  }
#endif
  ds_row_ref(dp, p, d, acc, n);
}

}  // namespace wa
}  // namespace mae3d
