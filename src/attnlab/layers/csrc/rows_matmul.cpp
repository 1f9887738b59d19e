// attnlab: few-row matrix products for decoding on x86 CPUs with AVX2 and FMA.
//
// y (N, F) = x (N, C) @ W.T (+ bias), with W float32, bfloat16, or int8 with one scale per output row.
// Decoding multiplies one token (or the few a speculative verifier scores) by every weight, so the speed
// is how fast W streams from memory; the BLAS routines of the CPU builds we meet (a GEMV for one row, a
// packing GEMM for a few) read it well below the bandwidth, and keep no kernel for a bf16 or int8 weight
// with float accumulation on CPUs without bf16/VNNI units. Here the threads split the weight rows; each row
// is one sequential stream, converted to float32 in registers, and every row of x is dotted with it while
// it sits in L1 (x itself stays in L1/L2). On a 2-core AMD EPYC this reads fp32 weights 2.2x faster than
// MKL's GEMV (BENCHMARKS.md); tuning notes: 4 W-row blocks (4 streams), widening a bf16 row once into a
// buffer, and sharing W loads between 3 x rows were each slower here.
//
// Every output element is one fixed sequence of operations: four 8-lane FMA accumulators over C in order,
// the same combination and horizontal sum, the same scalar tail, then scale and bias. It does not depend on N, on the other
// rows of x, or on how the F range is split between threads: a token's logits are bit-identical whether
// it is decoded alone or verified with others (what exact greedy speculative decoding needs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 is the top half of a float32: widen and shift
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
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

// dot(x, w) over C: 4 accumulators over 32-float steps, then 8-float steps into the first, combined as
// (a0 + a1) + (a2 + a3), the horizontal sum, then the scalar tail. One weight row is one sequential stream.
template <typename W>
inline float dot_row(const float* x, const W* w, int64_t C) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    a0 = _mm256_fmadd_ps(load8(w + c), _mm256_loadu_ps(x + c), a0);
    a1 = _mm256_fmadd_ps(load8(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + c + 16), _mm256_loadu_ps(x + c + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + c + 24), _mm256_loadu_ps(x + c + 24), a3);
  }
  for (; c + 8 <= C; c += 8) a0 = _mm256_fmadd_ps(load8(w + c), _mm256_loadu_ps(x + c), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; c < C; ++c) s += scalar(w[c]) * x[c];
  return s;
}

template <typename W>
void rows_matmul_impl(const float* x, const W* w, const float* scales, const float* bias, float* y,
                      int64_t N, int64_t C, int64_t F) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / C);  // ~32K MACs per task
  at::parallel_for(0, F, grain, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      const W* wf = w + f * C;
      for (int64_t n = 0; n < N; ++n) {  // the weight row is in L1 after the first
        float v = dot_row(x + n * C, wf, C);  // (widening the row once into a buffer was slower)
        if (scales) v *= scales[f];
        if (bias) v += bias[f];
        y[n * F + f] = v;
      }
    }
  });
}

at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rows_matmul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "rows_matmul: x (N, C) and weight (F, C) expected, got ", x.sizes(), " and ", weight.sizes());
  const auto wtype = weight.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kChar,
              "rows_matmul: weight must be float32, bfloat16 or int8, got ", wtype);
  TORCH_CHECK((wtype == at::kChar) == (scales.has_value() && scales->defined()),
              "rows_matmul: an int8 weight needs its per-row scales (and only an int8 weight takes them)");
  const int64_t N = x.size(0), C = x.size(1), F = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor sf, bf;
  if (scales.has_value() && scales->defined()) {
    TORCH_CHECK(scales->numel() == F, "rows_matmul: scales must have one entry per output row");
    sf = scales->to(at::kFloat).contiguous();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == F, "rows_matmul: bias must have one entry per output row");
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({N, F}, xf.options());
  const float* sp = sf.defined() ? sf.data_ptr<float>() : nullptr;
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (wtype == at::kFloat) {
    rows_matmul_impl(xf.data_ptr<float>(), wc.data_ptr<float>(), sp, bp, y.data_ptr<float>(), N, C, F);
  } else if (wtype == at::kBFloat16) {
    rows_matmul_impl(xf.data_ptr<float>(), wc.data_ptr<at::BFloat16>(), sp, bp, y.data_ptr<float>(), N, C, F);
  } else {
    rows_matmul_impl(xf.data_ptr<float>(), wc.data_ptr<int8_t>(), sp, bp, y.data_ptr<float>(), N, C, F);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(attnlab_kernels, m) {
  m.def("rows_matmul(Tensor x, Tensor weight, Tensor? scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnlab_kernels, CPU, m) { m.impl("rows_matmul", &rows_matmul); }
