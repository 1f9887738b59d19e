// attnlab: matrix products with GGUF block-quantised weights (Q8_0, Q4_0, Q4_1, Q4_K) and integer dot products.
//
// y (N, F) = x (N, C) @ W.T (+ bias), W kept exactly as a GGUF file stores it: each of the F rows is C / QK
// blocks laid end to end (QK = 32, or 256 for Q4_K), one uint8 tensor (F, row_bytes). Nothing is widened to
// float. The activations are quantised per block of 32 to int8 (Q8: d_x = max|x| / 127, q_x = round(x / d_x)
// to nearest even), then each block's products are summed in int32 and scaled once per block:
//
//   Q8_0   w = d * q,              q int8              dot = d * d_x * sum(q * q_x)
//   Q4_0   w = d * (q - 8),        q 4-bit             dot = d * d_x * sum((q - 8) * q_x)
//   Q4_1   w = d * q + m,          q 4-bit             dot = d * d_x * sum(q * q_x) + m * d_x * sum(q_x)
//   Q4_K   w = d*sc_j * q - dmin*mn_j  (8 sub-blocks j of 32 in a block of 256, 6-bit sc_j, mn_j)
//                                                      dot = d*sc_j * d_x * sum(q * q_x) - dmin*mn_j * d_x * sum(q_x)
//
// The int8 x int8 (or uint4 x int8) products of 32 elements go through `vpmaddubsw` (u8 x s8 -> pairs summed
// to int16) and `vpmaddwd` (pairs of int16 -> int32) on AVX2, or one `vpdpbusd` (u8 x s8 -> groups of 4 summed
// into int32) with AVX-512 VNNI (256-bit form, AVX512VL) or AVX-VNNI. vpmaddubsw wants its first operand
// unsigned: for signed weights (Q8_0, Q4_0 after subtracting 8) the sign trick moves the weight's sign onto
// the activation, |w| * (sign(w) * x) = w * x. No int16 sum can saturate (|w| <= 128, |x| <= 127: a pair is at
// most 32512), so both instruction sets give the same int32 sums and the same outputs.
//
// Width invariance: every output element is one fixed sequence of operations — the row's own activation
// quantisation, the blocks in order, an 8-lane float accumulator (+ one scalar for the m terms), the same
// horizontal sum, then the bias. It does not depend on N, on which rows share a group, on the tiling or on the
// threads: decoding a token alone or verifying it among 16 gives bit-identical results.
//
// Loop order: threads split the weight rows; a tile of TILE_F weight rows (a few KB, in L1/L2) is multiplied
// by all N activation rows, R = 4 rows at a time sharing each loaded (and for 4-bit, unpacked) weight vector.
// For one row that streams the weight once; for a prompt each weight tile is read from memory once and reused
// from cache by every row — a blocked integer GEMM, not the one-row kernel called per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#ifndef ATTNLAB_NS
#define ATTNLAB_NS attnlab_kernels
#endif
#ifndef ATTNLAB_VNNI
#define ATTNLAB_VNNI 0  // 0: AVX2 (vpmaddubsw + vpmaddwd); 1: AVX-512 VL + VNNI; 2: AVX-VNNI (both vpdpbusd)
#endif

namespace {

constexpr int kQ8_0 = 8, kQ4_0 = 2, kQ4_1 = 3, kQ4_K = 12;  // ggml's type numbers
constexpr int kRows = 4;    // activation rows sharing each weight vector
constexpr int kTileF = 16;  // weight rows per tile

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// sum of u8 x s8 products in groups of 4 -> 8 int32 lanes
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if ATTNLAB_VNNI == 1
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif ATTNLAB_VNNI == 2
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// signed x signed through the sign trick: |w| * (x with w's sign)
inline __m256i dot_s8s8(__m256i w, __m256i x) { return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One row of activations quantised per block of 32: q (C int8), d (C/32 scales), s (C/32 sums of q).
// d = max|x| / 127, q = round-to-nearest-even(x * (1 / d)) (0 when the block is all zeros).
void quantize_row(const float* x, int64_t C, int8_t* q, float* d, int32_t* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < C / 32; ++b) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float db = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    __m256i i[4];
    for (int k = 0; k < 4; ++k)
      i[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    s[b] = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
    // int32 -> int8 (packs interleave the 128-bit lanes; the permute puts the 32 values back in order)
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm256_permutevar8x32_epi32(p, order));
    d[b] = db;
  }
}

struct QRows {  // N rows of quantised activations
  const int8_t* q;
  const float* d;
  const int32_t* s;
  int64_t C, nb;  // nb = C / 32 blocks per row
};

// R activation rows (starting at n) dotted with one weight row `w` of format T; writes R floats to out.
template <int T, int R>
inline void dot_rows(const uint8_t* w, const QRows& a, int64_t n, float* out) {
  __m256 acc[R];
  float mins[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    mins[r] = 0.0f;
  }
  const int8_t* xq = a.q + n * a.C;
  const float* xd = a.d + n * a.nb;
  const int32_t* xs = a.s + n * a.nb;
  if constexpr (T == kQ8_0) {
    for (int64_t b = 0; b < a.nb; ++b, w += 34) {
      const float dw = half(w);
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
      const __m256i aw = _mm256_sign_epi8(wq, wq);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * a.C + 32 * b));
        const __m256i dot = dot_u8s8(aw, _mm256_sign_epi8(xv, wq));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[r * a.nb + b]), _mm256_cvtepi32_ps(dot), acc[r]);
      }
    }
  } else if constexpr (T == kQ4_0 || T == kQ4_1) {
    constexpr int bytes = T == kQ4_0 ? 18 : 20;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < a.nb; ++b, w += bytes) {
      const float dw = half(w);
      // 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + bytes - 16));
      __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
      if constexpr (T == kQ4_0) {
        wq = _mm256_sub_epi8(wq, _mm256_set1_epi8(8));
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * a.C + 32 * b));
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[r * a.nb + b]), _mm256_cvtepi32_ps(dot_s8s8(wq, xv)),
                                   acc[r]);
        }
      } else {
        const float mw = half(w + 2);
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * a.C + 32 * b));
          const float dx = xd[r * a.nb + b];
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(dot_u8s8(wq, xv)), acc[r]);
          mins[r] += mw * dx * static_cast<float>(xs[r * a.nb + b]);
        }
      }
    }
  } else {  // Q4_K: 144 bytes = d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t sb = 0; sb < a.nb / 8; ++sb, w += 144) {
      const float d = half(w), dmin = half(w + 2);
      const uint8_t* sc = w + 4;
      float dj[8], mj[8];
      for (int j = 0; j < 4; ++j) {
        dj[j] = d * static_cast<float>(sc[j] & 63);
        mj[j] = dmin * static_cast<float>(sc[j + 4] & 63);
        dj[j + 4] = d * static_cast<float>((sc[j + 8] & 0x0F) | ((sc[j] >> 6) << 4));
        mj[j + 4] = dmin * static_cast<float>((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
      }
      for (int c = 0; c < 4; ++c) {  // 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 + 32 * c));
        const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        for (int h = 0; h < 2; ++h) {
          const int j = 2 * c + h;
          const int64_t b = 8 * sb + j;
          for (int r = 0; r < R; ++r) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * a.C + 32 * b));
            const float dx = xd[r * a.nb + b];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dj[j] * dx), _mm256_cvtepi32_ps(dot_u8s8(h ? hi : lo, xv)),
                                     acc[r]);
            mins[r] += mj[j] * dx * static_cast<float>(xs[r * a.nb + b]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float s = hsum(acc[r]);
    out[r] = T == kQ4_K ? s - mins[r] : s + mins[r];  // Q8_0 and Q4_0 add 0
  }
}

template <int T, int R>
inline void rows_group(int r, const uint8_t* w, const QRows& a, int64_t n, float* out) {
  if (r == R) {
    dot_rows<T, R>(w, a, n, out);
  } else if constexpr (R > 1) {
    rows_group<T, R - 1>(r, w, a, n, out);
  }
}

inline void store(float* p, float v) { *p = v; }
inline void store(at::BFloat16* p, float v) { *p = at::BFloat16(v); }

template <int T, typename Y>
void matmul_impl(const QRows& a, const uint8_t* w, int64_t row_bytes, const float* bias, Y* y, int64_t N, int64_t F) {
  // at least ~32K weight-bytes x row-groups of work per thread (one token of a 576-wide layer: ~50 rows),
  // so that a decode step's small products still use every thread
  const int64_t groups = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_bytes * groups));
  at::parallel_for(0, F, grain, [&](int64_t begin, int64_t end) {
    float out[kRows];
    for (int64_t f0 = begin; f0 < end; f0 += kTileF) {
      const int64_t f1 = std::min<int64_t>(f0 + kTileF, end);
      for (int64_t n = 0; n < N; n += kRows) {
        const int r = static_cast<int>(std::min<int64_t>(kRows, N - n));
        for (int64_t f = f0; f < f1; ++f) {
          rows_group<T, kRows>(r, w + f * row_bytes, a, n, out);
          for (int i = 0; i < r; ++i) store(y + (n + i) * F + f, bias ? out[i] + bias[f] : out[i]);
        }
      }
    }
  });
}

int64_t block_elems(int64_t t) { return t == kQ4_K ? 256 : 32; }
int64_t block_bytes(int64_t t) { return t == kQ8_0 ? 34 : t == kQ4_0 ? 18 : t == kQ4_1 ? 20 : 144; }

// quantize_row over N rows (threads split the rows).
void quantize_rows(const float* x, int64_t N, int64_t C, int8_t* q, float* d, int32_t* s) {
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) quantize_row(x + n * C, C, q + n * C, d + n * (C / 32), s + n * (C / 32));
  });
}

// Quantise the rows of x (N, C) to int8 per block of 32 (as the product does): returns (q, d, s).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.size(1) % 32 == 0,
              "quantize_q8: a CPU tensor (N, C) with C a multiple of 32 expected, got ", x_in.sizes());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor q = at::empty({N, C}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({N, C / 32}, x.options());
  at::Tensor s = at::empty({N, C / 32}, x.options().dtype(at::kInt));
  quantize_rows(x.data_ptr<float>(), N, C, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<int32_t>());
  return {q, d, s};
}

// y = x @ W.T (+ bias) for W of ggml type `qtype` stored as blocks (F, row_bytes) uint8; y in x's dtype.
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ4_K,
              "qmatmul: ggml type ", qtype, " is not one of Q8_0 (8), Q4_0 (2), Q4_1 (3), Q4_K (12)");
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "qmatmul: CPU tensors only");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2, "qmatmul: blocks must be uint8 (F, row_bytes)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "qmatmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "qmatmul: x must be (N, C), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), F = blocks.size(0);
  TORCH_CHECK(C % block_elems(qtype) == 0 && blocks.size(1) == C / block_elems(qtype) * block_bytes(qtype),
              "qmatmul: x has ", C, " features; blocks (", blocks.sizes(), ") of type ", qtype, " hold ",
              blocks.size(1) / block_bytes(qtype) * block_elems(qtype), " per row");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || bias->numel() == F, "qmatmul: bias must have one entry per output row");
  const at::Tensor bc = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor wc = blocks.contiguous();
  // the quantised activations live in this thread's scratch buffers (grown, never shrunk): a decode step
  // makes ~120 of these calls, and three tensor allocations each were a measurable part of a small call
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d;
  thread_local std::vector<int32_t> s;
  q.resize(static_cast<size_t>(N * C));
  d.resize(static_cast<size_t>(N * (C / 32)));
  s.resize(static_cast<size_t>(N * (C / 32)));
  quantize_rows(x.to(at::kFloat).contiguous().data_ptr<float>(), N, C, q.data(), d.data(), s.data());
  const QRows a{q.data(), d.data(), s.data(), C, C / 32};
  at::Tensor y = at::empty({N, F}, x.options());
  const uint8_t* w = wc.data_ptr<uint8_t>();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  const int64_t rb = wc.size(1);
  auto run = [&](auto* yp) {
    switch (qtype) {
      case kQ8_0: matmul_impl<kQ8_0>(a, w, rb, bp, yp, N, F); break;
      case kQ4_0: matmul_impl<kQ4_0>(a, w, rb, bp, yp, N, F); break;
      case kQ4_1: matmul_impl<kQ4_1>(a, w, rb, bp, yp, N, F); break;
      default: matmul_impl<kQ4_K>(a, w, rb, bp, yp, N, F); break;
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(y.data_ptr<float>());
  } else {
    run(y.data_ptr<at::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ATTNLAB_NS, m) {
  m.def("qmatmul(Tensor x, Tensor blocks, int qtype, Tensor? bias) -> Tensor");
  m.def("quantize_q8(Tensor x) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ATTNLAB_NS, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("quantize_q8", &quantize_q8);
}
