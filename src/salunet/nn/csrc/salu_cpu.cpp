// Fused CPU kernels for SALU, SWALU, GALU and the SALU -> gate pairs (salunet, arXiv 2606.02927).
//
// One pass over memory in forward (read x, write y) and one in backward (read x and dL/dy, write dL/dx, reduce
// the parameter gradients in per-thread accumulators). The math is the same rescaled, overflow-free form as
// salunet/nn/kernels.py (see its docstring for the derivation):
//
//     t = clamp(x * sqrt(ab), -T, T),  r = rsqrt(1 + t^2),  q = t r,  SALU(x) = A q
//
// Layout. The caller views the tensor as (outer, C, inner) in memory order, the parameters being per channel c
// (C == 1 for scalar parameters). When inner > 1 (NCHW feature maps) a run of `inner` elements shares one
// parameter set and is vectorised along itself; when inner == 1 (token tensors, channels_last maps) rows of C
// channels are vectorised along C with the parameters loaded as vectors.
//
// Parameters arrive raw (a, b per stage, or their logs) with 1 or C values each; the kernel derives per channel
// sqrt(ab), A = sqrt(a/b), a, w = 1/sqrt(ab), A/(2b) (as kernels.py `_derive`) and, in backward, applies the
// chain rule to the logs, so that one call does everything: no small per-parameter tensor ops around it, which
// matters when batches are tiny. Compute dtype: double for double input, float otherwise.
// Half / BFloat16 storage is converted to float on load and back on store.
#include "salu_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>
#include <vector>

namespace salunet {
namespace {

using at::vec::Vectorized;

// the per-vector math must inline into the loops: as calls, the 512-bit temporaries go through the stack
#define SALU_INLINE inline __attribute__((always_inline))

// Elements per parallel task: the gates cost ~60 vector instructions per 16 elements, so a 32K-element tensor is
// worth two threads (ATen's 32768 suits memory-bound ops; a parallel region costs a few microseconds).
constexpr int64_t kGrain = 4096;
// Rows per tile in the channel-vectorised loops (token tensors, channels_last maps); see forward_loop.
constexpr int64_t kRows = 16;


template <typename T>
constexpr T clamp_limit() { return std::is_same<T, double>::value ? T(1e150) : T(1e18); }

// ---- loads and stores with conversion between storage (S) and compute (T) types ---------------------------

template <typename S, typename T>
SALU_INLINE Vectorized<T> load(const S* p, int64_t n) {
  if constexpr (std::is_same<S, T>::value) {
    return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
  } else {
    T buf[Vectorized<T>::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(p[i]);
    return Vectorized<T>::loadu(buf);
  }
}

template <typename S, typename T>
SALU_INLINE void store(S* p, const Vectorized<T>& v, int64_t n) {
  if constexpr (std::is_same<S, T>::value) {
    if (n == Vectorized<T>::size()) v.store(p); else v.store(p, n);
  } else {
    T buf[Vectorized<T>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(buf[i]);
  }
}

// ---- the math on vectors ------------------------------------------------------------------------------------

template <typename T>
struct Stage {  // derived parameters of one SALU stage, broadcast or loaded per lane
  Vectorized<T> sab, amp, a, w, hb;
};

template <typename T>
SALU_INLINE Stage<T> stage_at(const T* d, int64_t C, int64_t stage, int64_t c, int64_t n, bool per_lane) {
  const T* base = d + stage * 5 * C;
  Stage<T> s;
  Vectorized<T>* f[5] = {&s.sab, &s.amp, &s.a, &s.w, &s.hb};
  for (int k = 0; k < 5; ++k)
    *f[k] = per_lane ? load<T, T>(base + k * C + c, n) : Vectorized<T>(base[k * C + c]);
  return s;
}

// Reciprocal and reciprocal square root in float: the hardware estimate (14 bits on AVX512, 12 on AVX2) refined
// by one Newton step (~23 bits, within a few ulp), several times cheaper than the exact div / sqrt + div that
// Vectorized::reciprocal / rsqrt issue. fast_rsqrt's argument 1 + t^2 is >= 1 and finite (t is clamped);
// fast_rcp clamps its own argument (see there). double keeps the exact operations.
SALU_INLINE Vectorized<float> fast_rsqrt(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  Vectorized<float> y(_mm512_rsqrt14_ps(v));
#elif defined(CPU_CAPABILITY_AVX2)
  Vectorized<float> y(_mm256_rsqrt_ps(v));
#else
  return v.rsqrt();
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // y (1.5 - 0.5 v y^2)
  auto hy = Vectorized<float>(0.5f) * y;
  return hy * (Vectorized<float>(3.f) - (v * y) * y);
#endif
}
SALU_INLINE Vectorized<double> fast_rsqrt(const Vectorized<double>& v) { return v.rsqrt(); }

SALU_INLINE Vectorized<float> fast_rcp(const Vectorized<float>& v_in) {
  // clamp to FLT_MAX first (NaN kept: min returns its second operand when one is NaN), so that +inf (1 + exp of
  // a large argument) gives 0 and not the inf * 0 = NaN of the Newton step
#if defined(CPU_CAPABILITY_AVX512)
  Vectorized<float> v(_mm512_min_ps(_mm512_set1_ps(FLT_MAX), v_in));
  Vectorized<float> y(_mm512_rcp14_ps(v));
#elif defined(CPU_CAPABILITY_AVX2)
  Vectorized<float> v(_mm256_min_ps(_mm256_set1_ps(FLT_MAX), v_in));
  Vectorized<float> y(_mm256_rcp_ps(v));
#else
  return v_in.reciprocal();
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return y * (Vectorized<float>(2.f) - v * y);  // one Newton step
#endif
}
SALU_INLINE Vectorized<double> fast_rcp(const Vectorized<double>& v) { return v.reciprocal(); }

// r = rsqrt(1 + t^2), q = t r with t = clamp(x sqrt(ab)); clamp via maximum/minimum, which propagate NaN.
// For |t| >= 4096, t / sqrt(1 + t^2) rounds to +-1 in float (the relative gap 1/(2t^2) <= 2^-25 is at most half an
// ulp), so q is set to exactly +-1 there: the refined hardware rsqrt estimate can land an ulp low (AMD's AVX2
// rsqrt did at the clamp limit, so SALU(+-inf) gave 1 ulp below +-A); double's exact rsqrt needs no help.
template <typename T>
SALU_INLINE void salu_terms(const Vectorized<T>& x, const Stage<T>& s, Vectorized<T>& r, Vectorized<T>& q) {
  const Vectorized<T> lim(clamp_limit<T>()), one(T(1)), zero(T(0)), big(T(4096));
  auto t = at::vec::minimum(at::vec::maximum(x * s.sab, -lim), lim);
  r = fast_rsqrt(one + t * t);
  q = Vectorized<T>::blendv(t * r, Vectorized<T>::blendv(-one, one, t > zero), t.abs() >= big);
}

// exp of a non-positive argument, the only kind the gates need (exp(-|s|), exp(-s^2/2)): the result lies in
// [0, 1], so no overflow handling is needed. On AVX512: round-to-nearest range reduction x = n ln2 + r, Cephes'
// degree-7 expf polynomial on |r| <= ln2/2 (relative error ~1e-7) and scalef for 2^n, which underflows to 0
// correctly; ~14 instructions against ~20 for ATen's exp_u20. NaN stays NaN. Elsewhere: ATen's exp_u20.
SALU_INLINE Vectorized<float> fast_exp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.f), v);  // below: 0 anyway; max keeps a NaN in v
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return Vectorized<float>(_mm512_scalef_ps(y, n));
#else
  return v.exp_u20();  // ATen's polynomial exp; for v <= 0 it is in range, NaN reaches the output through x
#endif
}
SALU_INLINE Vectorized<double> fast_exp(const Vectorized<double>& v) { return v.exp(); }

// Standard normal CDF and density in float: Abramowitz & Stegun 7.1.26 for erf (|error| < 1.5e-7, the form
// ATen's own vectorised erf uses), whose exp(-u^2) with u = s/sqrt(2) *is* exp(-s^2/2): one exp gives both.
SALU_INLINE void normal_cdf_pdf(const Vectorized<float>& s, Vectorized<float>& cdf, Vectorized<float>& pdf) {
  const Vectorized<float> one(1.f), half(0.5f), p(0.3275911f);
  const Vectorized<float> p1(0.254829592f), p2(-0.284496736f), p3(1.421413741f), p4(-1.453152027f),
      p5(1.061405429f);
  auto u = s.abs() * Vectorized<float>(static_cast<float>(M_SQRT1_2));
  auto t = fast_rcp(one + p * u);
  auto poly = ((((p5 * t + p4) * t + p3) * t + p2) * t + p1) * t;
  auto e = fast_exp((u * u).neg());           // exp(-s^2 / 2)
  auto tail = half * poly * e;                // 1 - Phi(|s|)
  cdf = Vectorized<float>::blendv(one - tail, tail, s < Vectorized<float>(0.f));
  pdf = e * Vectorized<float>(0.3989422804014327f);  // 1/sqrt(2 pi)
}

SALU_INLINE void normal_cdf_pdf(const Vectorized<double>& s, Vectorized<double>& cdf, Vectorized<double>& pdf) {
  // 0.5 erfc(-s / sqrt 2), not 0.5 + 0.5 erf(s / sqrt 2): the latter cancels to 0 in the left tail (s < -8.3)
  cdf = Vectorized<double>(0.5) * (s * Vectorized<double>(-M_SQRT1_2)).erfc();
  pdf = (Vectorized<double>(-0.5) * s * s).exp() * Vectorized<double>(0.3989422804014327);
}

// gate p(s) and its derivative p'(s): logistic (SWALU) or standard normal CDF (GALU)
template <typename T>
SALU_INLINE void gate(const Vectorized<T>& s, bool normal, Vectorized<T>& p, Vectorized<T>& dp) {
  if (normal) {
    normal_cdf_pdf(s, p, dp);
  } else {
    // with e = exp(-|s|) <= 1: sigmoid(s) = 1/(1+e) for s >= 0 and e/(1+e) for s < 0, exact in both tails (no
    // overflowing exp(-s), and sigmoid(-1000) is 0, not 1/FLT_MAX)
    const Vectorized<T> one(T(1));
    auto e = fast_exp(s.abs().neg());
    auto inv = fast_rcp(one + e);
    p = Vectorized<T>::blendv(inv, e * inv, s < Vectorized<T>(T(0)));
    dp = e * inv * inv;  // p (1 - p) without cancellation
  }
}

template <int64_t OP, typename T>
SALU_INLINE Vectorized<T> fwd(const Vectorized<T>& x, const Vectorized<T>& res, const Stage<T>& s1,
                              const Stage<T>& s2) {
  Vectorized<T> r, q, p, dp;
  salu_terms(x, s1, r, q);
  Vectorized<T> z = s1.amp * q;  // SALU(x)
  if constexpr (has_residual(OP)) z = z + res;
  if constexpr (OP == SALU) {
    return z;
  } else if constexpr (!is_pair(OP)) {  // x * gate(SALU(x))
    gate(z, is_normal_gate(OP), p, dp);
    return x * p;
  } else {
    salu_terms(z, s2, r, q);
    gate(s2.amp * q, is_normal_gate(OP), p, dp);
    return z * p;
  }
}

// backward of one SALU: dL/dx and the unreduced dL/da, dL/db
template <typename T>
SALU_INLINE void salu_bwd(const Vectorized<T>& g, const Vectorized<T>& r, const Vectorized<T>& q, const Stage<T>& s,
                     Vectorized<T>& gx, Vectorized<T>& ga, Vectorized<T>& gb) {
  auto r2 = r * r;
  gx = g * s.a * r2 * r;
  ga = g * s.w * q * (r2 + Vectorized<T>(T(0.5)) * q * q);
  gb = g * s.hb.neg() * q * q * q;
}

// backward of a gate x * p(SALU(x)) given the SALU terms (r, q) of x
template <typename T>
SALU_INLINE void gate_bwd(const Vectorized<T>& g, const Vectorized<T>& x, const Vectorized<T>& r, const Vectorized<T>& q,
                     const Stage<T>& s, bool normal, Vectorized<T>& gx, Vectorized<T>& ga, Vectorized<T>& gb) {
  Vectorized<T> p, dp;
  auto sq = s.amp * q;
  gate(sq, normal, p, dp);
  auto r2 = r * r;
  gx = g * (p + dp * sq * r2);  // x * dSALU/dx = A q r^2: bounded, never x * r^3 of a huge x
  auto gxd = g * x * dp;
  ga = gxd * s.w * q * (r2 + Vectorized<T>(T(0.5)) * q * q);
  gb = gxd * s.hb.neg() * q * q * q;
}

// full backward: gx and up to four unreduced parameter gradients (a1, b1[, a2, b2])
template <int64_t OP, typename T>
SALU_INLINE void bwd(const Vectorized<T>& g, const Vectorized<T>& x, const Vectorized<T>& res, const Stage<T>& s1,
                     const Stage<T>& s2, Vectorized<T>& gx, Vectorized<T>* gp, Vectorized<T>& gres) {
  Vectorized<T> r1, q1;
  salu_terms(x, s1, r1, q1);
  if constexpr (OP == SALU) {
    salu_bwd(g, r1, q1, s1, gx, gp[0], gp[1]);
  } else if constexpr (!is_pair(OP)) {
    gate_bwd(g, x, r1, q1, s1, is_normal_gate(OP), gx, gp[0], gp[1]);
  } else {
    Vectorized<T> z = s1.amp * q1, r2, q2, gz;
    if constexpr (has_residual(OP)) z = z + res;
    salu_terms(z, s2, r2, q2);
    gate_bwd(g, z, r2, q2, s2, is_normal_gate(OP), gz, gp[2], gp[3]);
    if constexpr (has_residual(OP)) gres = gz;  // d(SALU(x) + res)/dres = 1
    salu_bwd(gz, r1, q1, s1, gx, gp[0], gp[1]);
  }
}

// ---- loops ---------------------------------------------------------------------------------------------------

// `res` (residual ops only; nullptr otherwise) has x's layout
template <int64_t OP, typename S, typename T>
SALU_INLINE Vectorized<T> load_res(const S* res, int64_t off, int64_t n) {
  if constexpr (has_residual(OP)) return load<S, T>(res + off, n);
  return Vectorized<T>(T(0));
}

template <int64_t OP, typename S, typename T>
void forward_loop(const S* x, const S* res, S* y, const T* d, int64_t outer, int64_t C, int64_t inner) {
  constexpr int64_t V = Vectorized<T>::size();
  if (inner > 1) {  // blocks of `inner` elements share channel c
    at::parallel_for(0, outer * C, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c = blk % C;
        Stage<T> s1 = stage_at(d, C, 0, c, V, false), s2 = s1;
        if constexpr (is_pair(OP)) s2 = stage_at(d, C, 1, c, V, false);
        const int64_t off = blk * inner;
        for (int64_t i = 0; i < inner; i += V) {
          const int64_t n = std::min(V, inner - i);
          store<S, T>(y + off + i, fwd<OP>(load<S, T>(x + off + i, n), load_res<OP, S, T>(res, off + i, n), s1, s2), n);
        }
      }
    });
  } else {  // rows of C channels, vectorised along C, in tiles of kRows rows: each channel chunk's parameters
            // are loaded once per tile, and the tile (kRows x C elements) stays in L1 across the chunks
    at::parallel_for(0, outer, std::max<int64_t>(1, kGrain / C), [&](int64_t begin, int64_t end) {
      for (int64_t r0 = begin; r0 < end; r0 += kRows) {
        const int64_t r1 = std::min(end, r0 + kRows);
        for (int64_t c = 0; c < C; c += V) {
          const int64_t n = std::min(V, C - c);
          Stage<T> s1 = stage_at(d, C, 0, c, n, true), s2 = s1;
          if constexpr (is_pair(OP)) s2 = stage_at(d, C, 1, c, n, true);
          for (int64_t row = r0; row < r1; ++row) {
            const int64_t off = row * C + c;
            store<S, T>(y + off, fwd<OP>(load<S, T>(x + off, n), load_res<OP, S, T>(res, off, n), s1, s2), n);
          }
        }
      }
    });
  }
}

template <typename T>
SALU_INLINE T hsum(const Vectorized<T>& v, int64_t n) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += buf[i];
  return s;
}

// Parameter gradients are accumulated per thread in double (acc[thread][k][c]) and summed at the end, so the
// result does not depend on how blocks were split between threads beyond floating-point order.
// Parallel loop over [0, n) in `chunks` contiguous pieces, f(chunk, begin, end): per-chunk accumulators are then
// indexed by chunk number, which (unlike a thread id) cannot exceed their count whatever OpenMP runtime runs it.
template <typename F>
void for_chunks(int64_t n, int64_t chunks, F&& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) f(k, k * n / chunks, (k + 1) * n / chunks);
  });
}

inline int64_t n_chunks(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
}

template <int64_t OP, typename S, typename T>
void backward_loop(const S* g, const S* x, const S* res, S* gx, S* gres, const T* d, int64_t outer, int64_t C,
                   int64_t inner, std::vector<double>& acc) {
  constexpr int64_t V = Vectorized<T>::size();
  constexpr int64_t np = 2 * n_stages(OP);
  if (inner > 1) {
    const int64_t chunks = n_chunks(outer * C, std::max<int64_t>(1, kGrain / inner));
    acc.assign(chunks * np * C, 0.0);
    for_chunks(outer * C, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      double* a = acc.data() + chunk * np * C;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c = blk % C;
        Stage<T> s1 = stage_at(d, C, 0, c, V, false), s2 = s1;
        if constexpr (is_pair(OP)) s2 = stage_at(d, C, 1, c, V, false);
        const int64_t off = blk * inner;
        Vectorized<T> sum[4] = {Vectorized<T>(T(0)), Vectorized<T>(T(0)), Vectorized<T>(T(0)), Vectorized<T>(T(0))};
        for (int64_t i = 0; i < inner; i += V) {
          const int64_t n = std::min(V, inner - i);
          Vectorized<T> vgx, gp[4], vgr;
          // tail lanes load g = 0, so they add exactly 0 to the sums
          bwd<OP>(load<S, T>(g + off + i, n), load<S, T>(x + off + i, n), load_res<OP, S, T>(res, off + i, n), s1,
                  s2, vgx, gp, vgr);
          store<S, T>(gx + off + i, vgx, n);
          if constexpr (has_residual(OP)) store<S, T>(gres + off + i, vgr, n);
          for (int64_t k = 0; k < np; ++k) sum[k] = sum[k] + gp[k];
        }
        for (int64_t k = 0; k < np; ++k) a[k * C + c] += static_cast<double>(hsum(sum[k], V));
      }
    });
  } else {
    const int64_t chunks = n_chunks(outer, std::max<int64_t>(1, kGrain / C));
    acc.assign(chunks * np * C, 0.0);
    for_chunks(outer, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      double* a = acc.data() + chunk * np * C;
      // tiles of kRows rows: per channel chunk, the parameters are loaded once and the parameter gradients
      // summed in registers (in T) over the tile's rows, then folded into the double accumulator
      T sums[Vectorized<T>::size()];
      for (int64_t r0 = begin; r0 < end; r0 += kRows) {
        const int64_t r1 = std::min(end, r0 + kRows);
        for (int64_t c = 0; c < C; c += V) {
          const int64_t n = std::min(V, C - c);
          Stage<T> s1 = stage_at(d, C, 0, c, n, true), s2 = s1;
          if constexpr (is_pair(OP)) s2 = stage_at(d, C, 1, c, n, true);
          Vectorized<T> tot[4] = {Vectorized<T>(T(0)), Vectorized<T>(T(0)), Vectorized<T>(T(0)), Vectorized<T>(T(0))};
          for (int64_t row = r0; row < r1; ++row) {
            const int64_t off = row * C + c;
            Vectorized<T> vgx, gp[4], vgr;
            bwd<OP>(load<S, T>(g + off, n), load<S, T>(x + off, n), load_res<OP, S, T>(res, off, n), s1, s2, vgx,
                    gp, vgr);
            store<S, T>(gx + off, vgx, n);
            if constexpr (has_residual(OP)) store<S, T>(gres + off, vgr, n);
            for (int64_t k = 0; k < np; ++k) tot[k] = tot[k] + gp[k];
          }
          for (int64_t k = 0; k < np; ++k) {
            tot[k].store(sums);
            for (int64_t i = 0; i < n; ++i) a[k * C + c + i] += static_cast<double>(sums[i]);
          }
        }
      }
    });
  }
}

// call f(std::integral_constant<int64_t, OP>) for the runtime op code: one specialised loop per op
template <typename F>
void dispatch_op(int64_t op, F&& f) {
  switch (op) {
    case SALU: f(std::integral_constant<int64_t, SALU>()); break;
    case SWALU: f(std::integral_constant<int64_t, SWALU>()); break;
    case GALU: f(std::integral_constant<int64_t, GALU>()); break;
    case SALU_SWALU: f(std::integral_constant<int64_t, SALU_SWALU>()); break;
    case SALU_GALU: f(std::integral_constant<int64_t, SALU_GALU>()); break;
    case SALU_ADD_SWALU: f(std::integral_constant<int64_t, SALU_ADD_SWALU>()); break;
    default: f(std::integral_constant<int64_t, SALU_ADD_GALU>()); break;
  }
}

// Per-channel derived quantities, from the raw parameters (a, b per stage, each of C or 1 values; their logs when
// log_limit >= 0, then clamped to [-log_limit, log_limit] before exp exactly as kernels.py `_prepare` does):
// d[(stage * 5 + k) * C + c] for k = sqrt(ab), A = sqrt(a/b), a, w = 1/sqrt(ab), A/(2b). `ab` keeps a and b.
template <typename T>
void derive(const std::vector<at::Tensor>& params, double log_limit, int64_t C, std::vector<T>& d,
            std::vector<double>& ab) {
  const int64_t ns = static_cast<int64_t>(params.size()) / 2;
  d.assign(ns * 5 * C, T(0));
  ab.assign(ns * 2 * C, 0.0);
  // read float / double parameters in place (no tensor op for the common case); anything else converted once
  auto value = [&](const at::Tensor& p0, int64_t c) -> double {
    const int64_t i = p0.numel() > 1 ? c : 0;
    if (p0.scalar_type() == at::kFloat) return p0.const_data_ptr<float>()[i];
    return p0.const_data_ptr<double>()[i];
  };
  std::vector<at::Tensor> ps;
  for (const auto& p : params) {
    auto q = p.is_contiguous() ? p : p.contiguous();
    if (q.scalar_type() != at::kFloat && q.scalar_type() != at::kDouble) q = q.to(at::kDouble);
    ps.push_back(q);
  }
  for (int64_t st = 0; st < ns; ++st) {
    for (int64_t c = 0; c < C; ++c) {
      double a = value(ps[2 * st], c), b = value(ps[2 * st + 1], c);
      if (log_limit >= 0) {  // NaN stays NaN (std::clamp would not promise it)
        a = std::isnan(a) ? a : std::exp(std::min(std::max(a, -log_limit), log_limit));
        b = std::isnan(b) ? b : std::exp(std::min(std::max(b, -log_limit), log_limit));
      }
      const double sab = std::sqrt(a * b), amp = std::sqrt(a / b);
      const double vals[5] = {sab, amp, a, 1.0 / sab, 0.5 * amp / b};
      for (int k = 0; k < 5; ++k) d[(st * 5 + k) * C + c] = static_cast<T>(vals[k]);
      ab[(st * 2) * C + c] = a;
      ab[(st * 2 + 1) * C + c] = b;
    }
  }
}

void check(const at::Tensor& x, const std::vector<at::Tensor>& params, int64_t op, int64_t outer, int64_t C,
           int64_t inner) {
  TORCH_CHECK(x.device().is_cpu(), "salunet cpu kernel: tensors must be on the CPU");
  TORCH_CHECK(op >= SALU && op <= SALU_ADD_GALU, "salunet cpu kernel: bad op ", op);
  TORCH_CHECK(x.numel() == outer * C * inner, "salunet cpu kernel: layout ", outer, "x", C, "x", inner,
              " does not cover ", x.numel(), " elements");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 2 * n_stages(op), "salunet cpu kernel: op ", op, " takes ",
              2 * n_stages(op), " parameter tensors");
  for (const auto& p : params)
    TORCH_CHECK(p.device().is_cpu() && (p.numel() == 1 || p.numel() == C),
                "salunet cpu kernel: each parameter must hold 1 or ", C, " values on the CPU");
}

// Optional residual of the SALU_ADD_* ops: same dtype, size and memory layout as x.
const void* res_ptr(const c10::optional<at::Tensor>& res, const at::Tensor& x, int64_t op) {
  if (!has_residual(op)) return nullptr;
  TORCH_CHECK(res.has_value() && res->defined(), "salunet cpu kernel: op ", op, " needs a residual tensor");
  TORCH_CHECK(res->scalar_type() == x.scalar_type() && res->sizes() == x.sizes() && res->strides() == x.strides(),
              "salunet cpu kernel: the residual must have the input's dtype, shape and strides");
  return res->const_data_ptr();
}

// ---- the projected gradient (salunet.train.recalibrate, --salu-project-grad) ---------------------------------
// Per channel c: num = sum(g x), den = sum(x^2) over everything but the channel, then out = g - x coef[c]. Two
// passes over memory (read g and x; read g and x, write out) where the op-by-op form makes five, with four
// full-size temporaries. Sums as in backward_loop: in T within a block or tile, in double across them.

template <typename S, typename T>
void radial_sums_loop(const S* g, const S* x, int64_t outer, int64_t C, int64_t inner, std::vector<double>& acc) {
  constexpr int64_t V = Vectorized<T>::size();
  if (inner > 1) {
    const int64_t chunks = n_chunks(outer * C, std::max<int64_t>(1, kGrain / inner));
    acc.assign(chunks * 2 * C, 0.0);
    for_chunks(outer * C, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      double* a = acc.data() + chunk * 2 * C;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t off = blk * inner;
        Vectorized<T> gx(T(0)), xx(T(0));
        for (int64_t i = 0; i < inner; i += V) {
          const int64_t n = std::min(V, inner - i);
          const auto vx = load<S, T>(x + off + i, n);  // tail lanes load 0
          gx = at::vec::fmadd(load<S, T>(g + off + i, n), vx, gx);
          xx = at::vec::fmadd(vx, vx, xx);
        }
        a[blk % C] += static_cast<double>(hsum(gx, V));
        a[C + blk % C] += static_cast<double>(hsum(xx, V));
      }
    });
  } else {
    const int64_t chunks = n_chunks(outer, std::max<int64_t>(1, kGrain / C));
    acc.assign(chunks * 2 * C, 0.0);
    for_chunks(outer, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
      double* a = acc.data() + chunk * 2 * C;
      T sums[Vectorized<T>::size()];
      for (int64_t r0 = begin; r0 < end; r0 += kRows) {
        const int64_t r1 = std::min(end, r0 + kRows);
        for (int64_t c = 0; c < C; c += V) {
          const int64_t n = std::min(V, C - c);
          Vectorized<T> gx(T(0)), xx(T(0));
          for (int64_t row = r0; row < r1; ++row) {
            const auto vx = load<S, T>(x + row * C + c, n);
            gx = at::vec::fmadd(load<S, T>(g + row * C + c, n), vx, gx);
            xx = at::vec::fmadd(vx, vx, xx);
          }
          gx.store(sums);
          for (int64_t i = 0; i < n; ++i) a[c + i] += static_cast<double>(sums[i]);
          xx.store(sums);
          for (int64_t i = 0; i < n; ++i) a[C + c + i] += static_cast<double>(sums[i]);
        }
      }
    });
  }
}

template <typename S, typename T>
void radial_subtract_loop(const S* g, const S* x, const T* coef, S* out, int64_t outer, int64_t C, int64_t inner) {
  constexpr int64_t V = Vectorized<T>::size();
  if (inner > 1) {
    at::parallel_for(0, outer * C, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const Vectorized<T> k(coef[blk % C]);
        const int64_t off = blk * inner;
        for (int64_t i = 0; i < inner; i += V) {
          const int64_t n = std::min(V, inner - i);
          const auto v = load<S, T>(g + off + i, n) - load<S, T>(x + off + i, n) * k;
          store<S, T>(out + off + i, v, n);
        }
      }
    });
  } else {
    at::parallel_for(0, outer, std::max<int64_t>(1, kGrain / C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t c = 0; c < C; c += V) {
          const int64_t n = std::min(V, C - c);
          const auto v = load<S, T>(g + row * C + c, n) - load<S, T>(x + row * C + c, n) * load<T, T>(coef + c, n);
          store<S, T>(out + row * C + c, v, n);
        }
      }
    });
  }
}

}  // namespace

// y = op(x[, res]) written into `out` (same storage layout as x: dense, in the memory order of the layout)
void salu_forward(int64_t op, at::Tensor x, std::vector<at::Tensor> params, double log_limit,
                  at::Tensor out, int64_t outer, int64_t C, int64_t inner, c10::optional<at::Tensor> res) {
  check(x, params, op, outer, C, inner);
  const void* rp = res_ptr(res, x, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "salu_forward", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    std::vector<T> d;
    std::vector<double> ab;
    derive<T>(params, log_limit, C, d, ab);
    auto run = [&](auto op_const) {
      forward_loop<decltype(op_const)::value, scalar_t, T>(x.const_data_ptr<scalar_t>(),
          static_cast<const scalar_t*>(rp), out.mutable_data_ptr<scalar_t>(), d.data(), outer, C, inner);
    };
    dispatch_op(op, run);
  });
}

// dL/dx written into `gx` (and dL/dres into `gres` for the residual ops); returns the gradients of the parameters
// as given (d/dlog when log_limit >= 0), each with the parameter's number of values (1 or C) and dtype.
std::vector<at::Tensor> salu_backward(int64_t op, at::Tensor g, at::Tensor x,
                                      std::vector<at::Tensor> params, double log_limit, at::Tensor gx,
                                      int64_t outer, int64_t C, int64_t inner, c10::optional<at::Tensor> res,
                                      c10::optional<at::Tensor> gres) {
  check(x, params, op, outer, C, inner);
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.numel() == x.numel(),
              "salunet cpu kernel: grad_output must match the input's dtype and size");
  const void* rp = res_ptr(res, x, op);
  void* grp = has_residual(op) ? const_cast<void*>(res_ptr(gres, x, op)) : nullptr;
  const int64_t np = 2 * n_stages(op);
  std::vector<double> acc, ab;  // acc: (chunks, np, C), sized by the loop
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "salu_backward", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    std::vector<T> d;
    derive<T>(params, log_limit, C, d, ab);
    auto run = [&](auto op_const) {
      backward_loop<decltype(op_const)::value, scalar_t, T>(g.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(rp), gx.mutable_data_ptr<scalar_t>(),
          static_cast<scalar_t*>(grp), d.data(), outer, C, inner, acc);
    };
    dispatch_op(op, run);
  });
  std::vector<at::Tensor> grads;
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = params[k].numel();
    std::vector<double> o(n, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      double v = 0;
      for (int64_t t = 0; t < static_cast<int64_t>(acc.size()) / (np * C); ++t) v += acc[(t * np + k) * C + c];
      if (log_limit >= 0) v *= ab[k * C + c];  // d/dlog a = a d/da (straight through the clamp, like kernels.py)
      o[n > 1 ? c : 0] += v;
    }
    const auto dt = params[k].scalar_type();
    auto gk = at::empty({n}, at::TensorOptions().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
    if (gk.scalar_type() == at::kDouble) {
      std::copy(o.begin(), o.end(), gk.mutable_data_ptr<double>());
    } else {
      std::transform(o.begin(), o.end(), gk.mutable_data_ptr<float>(), [](double v) { return static_cast<float>(v); });
    }
    grads.push_back(gk.scalar_type() == dt ? gk : gk.to(dt));
  }
  return grads;
}

// The projected gradient: out = g - x coef per channel, coef = num / den of this batch's sums (0 where den is 0),
// or with `running` ((2, C) double: the running num and den) of (1 - rate) running + rate batch. Returns this
// batch's sums (2, C) as double: num, den. g, x and out share dtype, size and memory layout.
at::Tensor radial_project(at::Tensor g, at::Tensor x, at::Tensor out, int64_t outer, int64_t C, int64_t inner,
                          c10::optional<at::Tensor> running, double rate) {
  TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu() && out.device().is_cpu(),
              "salunet cpu kernel: tensors must be on the CPU");
  TORCH_CHECK(x.numel() == outer * C * inner, "salunet cpu kernel: layout ", outer, "x", C, "x", inner,
              " does not cover ", x.numel(), " elements");
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() &&
                  g.sizes() == x.sizes() && g.strides() == x.strides() && out.strides() == x.strides(),
              "salunet cpu kernel: the gradient and the output must have the input's dtype, shape and strides");
  const bool run_sums = running.has_value() && running->defined();
  if (run_sums)
    TORCH_CHECK(running->scalar_type() == at::kDouble && running->numel() == 2 * C && running->is_contiguous(),
                "salunet cpu kernel: the running sums must be a contiguous (2, C) double tensor");
  std::vector<double> acc;
  auto sums = at::empty({2, C}, at::TensorOptions().dtype(at::kDouble));
  double* tot = sums.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "radial_project", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    radial_sums_loop<scalar_t, T>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), outer, C, inner,
                                  acc);
    const int64_t chunks = static_cast<int64_t>(acc.size()) / (2 * C);
    std::vector<T> coef(C);
    const double* old = run_sums ? running->const_data_ptr<double>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double num = 0, den = 0;
      for (int64_t t = 0; t < chunks; ++t) {
        num += acc[t * 2 * C + c];
        den += acc[t * 2 * C + C + c];
      }
      tot[c] = num;
      tot[C + c] = den;
      if (run_sums) {
        num = old[c] * (1 - rate) + num * rate;
        den = old[C + c] * (1 - rate) + den * rate;
      }
      coef[c] = den > 0 ? static_cast<T>(num / den) : T(0);
    }
    radial_subtract_loop<scalar_t, T>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), coef.data(),
                                      out.mutable_data_ptr<scalar_t>(), outer, C, inner);
  });
  return sums;
}

}  // namespace salunet
