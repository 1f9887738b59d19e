// attnlab: few-row matrix products for decoding on x86 CPUs with AVX2 and FMA.
//
// y (N, F) = x (N, C) @ W.T (+ bias), with W float32, bfloat16, or int8 with one scale per output row.
// Decoding multiplies one token (or the few a speculative verifier scores) by every weight, so the speed
// is how fast W streams from memory; the BLAS routines of the CPU builds we meet (a GEMV for one row, a
// packing GEMM for a few) read it well below the bandwidth, and keep no kernel for a bf16 or int8 weight
// with float accumulation on CPUs without bf16/VNNI units. Here the threads split the weight rows; each row
// is one sequential stream, converted to float32 in registers 8 elements at a time, and each converted
// vector is multiplied into up to 3 rows of x at once (12 accumulators + the vector fit AVX2's 16
// registers); the next 3 rows of x reuse the weight row from L1. On a 2-core AMD EPYC this reads fp32
// weights ~2x faster than MKL's GEMV, and scoring 3-8 rows costs 1.1-1.4x less than converting the weight
// once per row did (BENCHMARKS.md). Tuning notes: 4 W-row blocks (4 streams), widening a bf16 row once
// into a buffer, 4 rows per group (spills), and bf16 split into even/odd halves (one op per 8 elements,
// but slower for one row) were each slower here.
//
// Every output element is one fixed sequence of operations: four 8-lane FMA accumulators over C in order,
// the same combination and horizontal sum, the same scalar tail, then scale and bias. It does not depend
// on N, on the row's place in a group of 3, on the other rows of x, or on how the F range is split between
// threads: a token's logits are bit-identical whether it is decoded alone or verified with others (what
// exact greedy speculative decoding needs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// ---- widening the weight to float32, 8 elements at a time -------------------------------------------------
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const at::BFloat16* p) {  // bf16 is the top half of a float32: widen and shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline float scalar(float v) { return v; }
inline float scalar(at::BFloat16 v) { return static_cast<float>(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows of x dotted with one weight row, each 8 weights widened once for all R rows. Per row the
// operations are fixed: four accumulators over 32-element steps (a_k += w[c+8k..] * x[c+8k..]), 8-element
// steps into a_0, combined as (a0 + a1) + (a2 + a3), the horizontal sum, then the scalar tail in order.
// Nothing depends on R or on the neighbouring rows, so a row's result is the same alone or in a group.
template <int R, typename W>
inline void dot_rows(const float* x, int64_t C, const W* w, float* out) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) a[r][k] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = widen8(w + c + 8 * k);
      for (int r = 0; r < R; ++r) a[r][k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * C + c + 8 * k), a[r][k]);
    }
  }
  for (; c + 8 <= C; c += 8) {
    const __m256 v = widen8(w + c);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * C + c), a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
    for (int64_t t = c; t < C; ++t) s += scalar(w[t]) * x[r * C + t];
    out[r] = s;
  }
}

inline void store(float* p, float v) { *p = v; }
inline void store(at::BFloat16* p, float v) { *p = at::BFloat16(v); }  // round to nearest even, as .to()

#ifndef ATTNLAB_ROW_GROUP
#define ATTNLAB_ROW_GROUP 3  // 4 spills the 16 accumulators; measured slower on the AVX2 EPYC
#endif
constexpr int kGroup = ATTNLAB_ROW_GROUP;  // rows of x sharing each widened weight vector

// the R-row dot for r <= R rows (the last group of a call is narrower)
template <int R, typename W>
inline void rows_group(int r, const float* x, int64_t C, const W* w, float* out) {
  if (r == R) {
    dot_rows<R>(x, C, w, out);
  } else if constexpr (R > 1) {
    rows_group<R - 1>(r, x, C, w, out);
  }
}

template <typename W, typename Y>
void rows_matmul_impl(const float* x, const W* w, const float* scales, const float* bias, Y* y,
                      int64_t N, int64_t C, int64_t F) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (C * std::max<int64_t>(1, N / kGroup)));
  at::parallel_for(0, F, grain, [&](int64_t begin, int64_t end) {
    float out[kGroup];
    for (int64_t f = begin; f < end; ++f) {
      const W* wf = w + f * C;  // in L1 after the first group of rows
      for (int64_t n = 0; n < N;) {
        const int64_t r = std::min<int64_t>(kGroup, N - n);
        rows_group<kGroup>(static_cast<int>(r), x + n * C, C, wf, out);
        for (int64_t i = 0; i < r; ++i) {
          float v = out[i];
          if (scales) v *= scales[f];
          if (bias) v += bias[f];
          store(y + (n + i) * F + f, v);
        }
        n += r;
      }
    }
  });
}

// float32 or bfloat16 tensor (contiguous) -> float32 values; `keep` owns them when a copy was needed.
const float* as_floats(const at::Tensor& t, std::vector<float>& keep) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "rows_matmul: activations, scales and bias must be float32 or "
              "bfloat16, got ", t.scalar_type());
  const at::BFloat16* p = t.data_ptr<at::BFloat16>();
  const int64_t n = t.numel();
  keep.resize(n);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(keep.data() + i, widen8(p + i));
  for (; i < n; ++i) keep[i] = static_cast<float>(p[i]);
  return keep.data();
}

template <typename Y>
void dispatch(const float* x, const at::Tensor& w, const float* sp, const float* bp, Y* y, int64_t N, int64_t C,
              int64_t F) {
  if (w.scalar_type() == at::kFloat) {
    rows_matmul_impl(x, w.data_ptr<float>(), sp, bp, y, N, C, F);
  } else if (w.scalar_type() == at::kBFloat16) {
    rows_matmul_impl(x, w.data_ptr<at::BFloat16>(), sp, bp, y, N, C, F);
  } else {
    rows_matmul_impl(x, w.data_ptr<int8_t>(), sp, bp, y, N, C, F);
  }
}

// y = x @ weight.T (* scales) (+ bias), in x's dtype. Conversions happen here, not as ATen ops: a decode
// step calls this ~120 times and each ATen cast would cost a dispatch and an allocation.
at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rows_matmul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "rows_matmul: x (N, C) and weight (F, C) expected, got ", x.sizes(), " and ", weight.sizes());
  const auto wtype = weight.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kChar,
              "rows_matmul: weight must be float32, bfloat16 or int8, got ", wtype);
  const bool has_scales = scales.has_value() && scales->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK((wtype == at::kChar) == has_scales,
              "rows_matmul: an int8 weight needs its per-row scales (and only an int8 weight takes them)");
  const int64_t N = x.size(0), C = x.size(1), F = weight.size(0);
  TORCH_CHECK(!has_scales || scales->numel() == F, "rows_matmul: scales must have one entry per output row");
  TORCH_CHECK(!has_bias || bias->numel() == F, "rows_matmul: bias must have one entry per output row");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor sc = has_scales ? scales->contiguous() : at::Tensor();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  std::vector<float> xkeep, skeep, bkeep;
  const float* xp = as_floats(xc, xkeep);
  const float* sp = has_scales ? as_floats(sc, skeep) : nullptr;
  const float* bp = has_bias ? as_floats(bc, bkeep) : nullptr;
  at::Tensor y = at::empty({N, F}, x.options());
  if (x.scalar_type() == at::kFloat) {
    dispatch(xp, wc, sp, bp, y.data_ptr<float>(), N, C, F);
  } else {
    dispatch(xp, wc, sp, bp, y.data_ptr<at::BFloat16>(), N, C, F);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(attnlab_kernels, m) {
  m.def("rows_matmul(Tensor x, Tensor weight, Tensor? scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnlab_kernels, CPU, m) { m.impl("rows_matmul", &rows_matmul); }
