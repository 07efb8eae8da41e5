// lmforge's weight-only quantised linear kernels (CPU): x [M, K] float32/bfloat16 @ W^T with W stored in 8 or 4 bits.
//
// Each call first quantises every activation row per 32-element block to int8 (scale = block absmax / 127, round to
// nearest even), once, and reuses it for every output channel; each weight block then meets it in an integer dot
// product (AVX2: u8 x s8 -> s16 pairs with maddubs, -> s32 with madd), scaled by the two blocks' float scales.
// The weight layouts (lmforge/layers/quant_linear.py makes them; K % 32 == 0):
//   q8: int8 w [N, K] and scale [N, K/32] (a scale per block: Q8_0, int8) or [N] (one per output channel);
//       value = scale * q.
//   q4: uint8 w [N, K/2], per 32-block 16 bytes: byte i holds element i (low nibble) and element i + 16 (high);
//       scale and min [N, K/32]; value = scale * q + min (Q4_1; Q4_0 has min = -8 scale; Q4_K's sub-blocks).
// Block scales and mins are float16 (GGUF's own, and the int8/int4 quantisers') or float32 (Q4_K's products).
// Either layout with block scales may come in groups of 8 rows ("x8", below), which 3-d scales [N/8, K/32, 8] say.
// A q4 dot product is sum_b scale_b dx_b isum_b + sum_b min_b dx_b sum(qx_b): the second sum uses the activation
// blocks' sums, computed with the quantisation. Built per instruction-set level (lmforge/kernels/__init__.py): the
// AVX2 path where the CPU has it, a plain C++ path elsewhere (same results up to float summation order). Every output
// is computed by the same operations whatever the number of rows (batch invariance: a sequence decodes alone as in a
// batch). Where the build has AVX512-VNNI (the native level on such CPUs) one vpdpbusd replaces AVX2's three
// instructions per integer dot product, with equal sums. AMX-INT8 tiles are not written.
// Not <torch/extension.h>: parsing it is most of a build's time; these are what the kernels use.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // elements per block
constexpr int64_t ROW_TILE = 4;  // activation rows sharing each unpacked weight block

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

// Activations of one call, quantised: q [M, K] int8, d (block scale) and s (d * sum of the block's q) [M, K/32].
// q4 weights (AVX2) read the activations in pair order instead: per two blocks b, b + 1, 64 bytes holding b's
// elements 0-15, b + 1's 0-15, b's 16-31, b + 1's 16-31 (zeros for a missing b + 1), so that one 32-byte load of
// two weight blocks' nibbles meets its activations without shuffling the weights: `qp`, rows of pair_bytes(K).
struct QuantRows {
  std::vector<int8_t> q, qp;
  std::vector<float> d, s;
};

inline int64_t pair_bytes(int64_t K) { return (K / QK + 1) / 2 * 2 * QK; }

void to_pair_order(const int8_t* q, int64_t nb, int8_t* qp) {
  for (int64_t b = 0; b < nb; b += 2) {
    int8_t* dst = qp + b * QK;
    const int8_t* b0 = q + b * QK;
    std::memcpy(dst, b0, 16);
    std::memcpy(dst + 32, b0 + 16, 16);
    if (b + 1 < nb) {
      std::memcpy(dst + 16, b0 + QK, 16);
      std::memcpy(dst + 48, b0 + QK + 16, 16);
    } else {
      std::memset(dst + 16, 0, 16);
      std::memset(dst + 48, 0, 16);
    }
  }
}

template <typename scalar_t>
void quantize_block(const scalar_t* x, int8_t* q, float* d, float* s) {
  float amax = 0.f;
  for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(to_f(x[i])));
  const float scale = amax / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
  int sum = 0;
  for (int i = 0; i < QK; ++i) {
    const int v = static_cast<int>(std::nearbyint(to_f(x[i]) * inv));  // nearest even, as torch.round
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *d = scale;
  *s = scale * static_cast<float>(sum);
}

#if defined(__AVX2__)
// The same quantisation for float32 rows, eight lanes at a time (bit-identical to quantize_block).
inline void quantize_block(const float* x, int8_t* q, float* d, float* s) {
  __m256 v[4];
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float scale = _mm_cvtss_f32(h) / 127.f, inv = scale != 0.f ? 1.f / scale : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  __m256i i32[4];
  for (int j = 0; j < 4; ++j)
    i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  const __m256i packed16a = _mm256_packs_epi32(i32[0], i32[1]), packed16b = _mm256_packs_epi32(i32[2], i32[3]);
  __m256i packed8 = _mm256_packs_epi16(packed16a, packed16b);
  // packs work within 128-bit lanes: restore element order
  packed8 = _mm256_permutevar8x32_epi32(packed8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed8);
  *d = scale;
  *s = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
}
#endif

template <typename scalar_t>
QuantRows quantize_rows(const at::Tensor& x, bool pairs = false) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK, ld = x.stride(0);
  QuantRows r;
  r.q.resize(M * K);
  r.d.resize(M * nb);
  r.s.resize(M * nb);
  const scalar_t* px = x.data_ptr<scalar_t>();
  at::parallel_for(0, M * nb, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t m = i / nb, b = i % nb;
      quantize_block(px + m * ld + b * QK, r.q.data() + m * K + b * QK, r.d.data() + i, r.s.data() + i);
    }
  });
  if (pairs) {
    r.qp.resize(M * pair_bytes(K));
    for (int64_t m = 0; m < M; ++m) to_pair_order(r.q.data() + m * K, nb, r.qp.data() + m * pair_bytes(K));
  }
  return r;
}

// ---- block dot products: R activation rows against one weight row, accumulated per block scale --------------------
#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// acc + eight s32 sums of four u8 w x s8 x products each. AVX512-VNNI does it in one instruction; AVX2 in three
// (maddubs to s16 pairs, madd to s32, add). The same integers either way: maddubs saturates at 2^15, and no pair here
// reaches it (|w| <= 128 after the sign trick, |x| <= 127: 32512; 4-bit w <= 15), so every level gives equal sums.
inline __m256i dot_acc(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}
#endif

// Weight scales and mins are float32 or float16 (uint16_t: its bits; GGUF's own, 2 bytes fewer per block).
inline float to_f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// One weight row's share of a tile: its packed blocks, block scales (or its one scale: ROW) and mins (q4).
template <typename S>
struct WRow {
  const uint8_t* w;
  const S* scale;
  const S* min;
};

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// sum_b a[b] * b[b] over n blocks: the q4 min term (min_b * scale_b * sum(qx_b)), eight blocks at a time.
template <typename S>
inline float dot_min(const S* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), acc);
  sum = hsum(acc);
#endif
  for (; i < n; ++i) sum += to_f(a[i]) * b[i];
  return sum;
}

// out[c][r] = sum over blocks of wscale_b * dx[r]_b * <w_b, qx[r]_b> (+ sum_b min_b * sx[r]_b for q4), for C weight
// rows and R activation rows: each unpacked weight block serves R rows, each activation block C weight rows, and
// the C x R accumulators are independent chains. ROW: one scale per weight row, applied at the end.
template <int R, int C, bool Q4, bool ROW, typename S>
inline void dot_tile(const WRow<S>* w, const int8_t* const* qx, const float* const* dx, const float* const* sx,
                     int64_t nb, float (*out)[ROW_TILE]) {
#if defined(__AVX2__)
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  if constexpr (Q4) {
    // Two blocks at a time, qx in pair order: the low nibbles of both blocks' 32 bytes are elements 0-15 of each,
    // the high ones 16-31; lanes 0-3 hold block b's sums, 4-7 block b + 1's, scaled by a vector of the two blocks'
    // scales.
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b += 2) {
      const bool two = b + 1 < nb;
      __m256i lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const uint8_t* p = w[c].w + b * QK / 2;
        const __m256i raw = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        lo[c] = _mm256_and_si256(raw, m4);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx[r] + b * QK));
        const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx[r] + b * QK + 32));
        const float d0 = dx[r][b], d1 = two ? dx[r][b + 1] : 0.f;
        for (int c = 0; c < C; ++c) {
          const __m256 isum = _mm256_cvtepi32_ps(dot_acc(dot_acc(_mm256_setzero_si256(), lo[c], xlo), hi[c], xhi));
          const __m256 cs = _mm256_set_m128(_mm_set1_ps(two ? to_f(w[c].scale[b + 1]) * d1 : 0.f),
                                            _mm_set1_ps(to_f(w[c].scale[b]) * d0));
          acc[c][r] = _mm256_fmadd_ps(cs, isum, acc[c][r]);
        }
      }
    }
  } else
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wv[C], wabs[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[c].w + b * QK));
      wabs[c] = _mm256_sign_epi8(wv[c], wv[c]);  // |w| as u8; the sign moves onto x below
    }
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx[r] + b * QK));
      const float d = dx[r][b];
      for (int c = 0; c < C; ++c) {
        const __m256i xs = _mm256_sign_epi8(x, wv[c]);
        const __m256 isum = _mm256_cvtepi32_ps(dot_acc(_mm256_setzero_si256(), wabs[c], xs));
        acc[c][r] = _mm256_fmadd_ps(_mm256_set1_ps(ROW ? d : to_f(w[c].scale[b]) * d), isum, acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c][r] = hsum(acc[c][r]);
#else
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int isum = 0;
        const int8_t* xb = qx[r] + b * QK;
        if constexpr (Q4) {
          const uint8_t* p = w[c].w + b * QK / 2;
          for (int i = 0; i < QK / 2; ++i) isum += (p[i] & 0x0F) * xb[i] + (p[i] >> 4) * xb[i + QK / 2];
        } else {
          const int8_t* p = reinterpret_cast<const int8_t*>(w[c].w) + b * QK;
          for (int i = 0; i < QK; ++i) isum += p[i] * xb[i];
        }
        sum += (ROW ? 1.f : to_f(w[c].scale[b])) * dx[r][b] * static_cast<float>(isum);
      }
      out[c][r] = sum;
    }
#endif
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      if constexpr (ROW) out[c][r] *= to_f(w[c].scale[0]);
      if constexpr (Q4) out[c][r] += dot_min(w[c].min, sx[r], nb);
    }
}

template <int C, bool Q4, bool ROW, typename S>
inline void dot_rows(int64_t rows, const WRow<S>* w, const int8_t* const* qx, const float* const* dx,
                     const float* const* sx, int64_t nb, float (*out)[ROW_TILE]) {
  switch (rows) {
    case 4: dot_tile<4, C, Q4, ROW, S>(w, qx, dx, sx, nb, out); break;
    case 3: dot_tile<3, C, Q4, ROW, S>(w, qx, dx, sx, nb, out); break;
    case 2: dot_tile<2, C, Q4, ROW, S>(w, qx, dx, sx, nb, out); break;
    default: dot_tile<1, C, Q4, ROW, S>(w, qx, dx, sx, nb, out); break;
  }
}

constexpr int64_t OUT_TILE = 2;    // weight rows per register tile (several activation rows)
constexpr int64_t OUT_CHUNK = 16;  // output channels per cache-resident chunk of the weight (a multiple of 4)

template <bool Q4, bool ROW, typename S, typename scalar_t>
void linear_impl(const QuantRows& a, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scale,
                 const at::Tensor& wmin, const float* bias, at::Tensor& y) {
  const int64_t N = w.size(0), nb = K / QK, wld = Q4 ? K / 2 : K;
  const uint8_t* pw = static_cast<const uint8_t*>(w.data_ptr());
  const S* ps = static_cast<const S*>(scale.data_ptr());
  const S* pm = Q4 ? static_cast<const S*>(wmin.data_ptr()) : nullptr;
  scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t yld = y.stride(0);
  const int64_t chunks = (N + OUT_CHUNK - 1) / OUT_CHUNK;
#if defined(__AVX2__)
  constexpr bool pairs = Q4;  // the AVX2 q4 tiles read pair-ordered activations
#else
  constexpr bool pairs = false;
#endif
  const int8_t* qbase = pairs ? a.qp.data() : a.q.data();
  const int64_t qld = pairs ? pair_bytes(K) : K;
  // One row (decoding): four weight rows per tile, and the weight, read once, prefetched two tiles ahead (a row is
  // a few cache lines: the hardware prefetcher alone leaves the loads waiting). More rows: 2 x 4 tiles, each
  // weight chunk reused from cache by every group of four rows.
  auto tiles = [&]<int64_t C>() {
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      const int8_t* qx[ROW_TILE];
      const float *dx[ROW_TILE], *sx[ROW_TILE];
      float out[C][ROW_TILE];
      WRow<S> wr[C];
      const int64_t end = std::min(N, hi * OUT_CHUNK);
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, M - m0);
        for (int64_t r = 0; r < rows; ++r) {
          qx[r] = qbase + (m0 + r) * qld;
          dx[r] = a.d.data() + (m0 + r) * nb;
          sx[r] = a.s.data() + (m0 + r) * nb;
        }
        for (int64_t n = lo * OUT_CHUNK; n < end; n += C) {
          const int64_t cols = std::min(C, end - n);
          if (M == 1 && n + 3 * C <= N)
            for (int64_t off = 0; off < C * wld; off += 64) __builtin_prefetch(pw + (n + 2 * C) * wld + off);
          for (int64_t c = 0; c < cols; ++c)
            wr[c] = {pw + (n + c) * wld, ROW ? ps + n + c : ps + (n + c) * nb, Q4 ? pm + (n + c) * nb : nullptr};
          if (cols == C) dot_rows<C, Q4, ROW, S>(rows, wr, qx, dx, sx, nb, out);
          else
            for (int64_t c = 0; c < cols; ++c) dot_rows<1, Q4, ROW, S>(rows, wr + c, qx, dx, sx, nb, out + c);
          for (int64_t c = 0; c < cols; ++c) {
            const float b = bias ? bias[n + c] : 0.f;
            for (int64_t r = 0; r < rows; ++r) py[(m0 + r) * yld + n + c] = static_cast<scalar_t>(out[c][r] + b);
          }
        }
      }
    });
  };
  if (M == 1) tiles.template operator()<4>();
  else tiles.template operator()<OUT_TILE>();
}

// ---- weights in groups of 8 output rows ("x8": lmforge/layers/quant_linear.py's group_rows) ---------------------------
// Per group of 8 rows and per 32-block, the rows' block bytes are laid out as runs of 32: run j holds bytes 4j..4j+3
// of each of the 8 rows (row r in bytes 4r..4r+3). q8: 8 runs (a row's 32 bytes), elements 4j..4j+3; q4: 4 runs (a
// row's 16 nibble bytes), low nibbles elements 4j..4j+3 and high nibbles 16+4j..16+4j+3. Scales (and mins) are
// [N/8, K/32, 8]. One 32-byte load meets 4 activation bytes broadcast to every lane, so each lane is one output row:
// a block's 8 integer sums come out as one vector and take one FMA with the 8 rows' scales (and one with their mins),
// with no scalar scale work per row and no horizontal sum (docs/benchmarks.md). Every output is
// acc = fma(scale_w * scale_x, isum, acc) (+ fma(min, scale_x * sum(q_x), acc) for q4) over the blocks in order,
// whatever the number of rows: batch-invariant like the per-row kernels.
template <int R, bool Q4, typename S>
inline void x8_tile(const uint8_t* wg, const S* sg, const S* mg, const int8_t* const* qx, const float* const* dx,
                    const float* const* sx, int64_t nb, float (*out)[8]) {
  constexpr int64_t block_bytes = Q4 ? 8 * QK / 2 : 8 * QK;  // the group's bytes per 32-block
#if defined(__AVX2__)
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    const uint8_t* wb = wg + b * block_bytes;
    for (int j = 0; j < (Q4 ? 4 : 8); ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * j));
      if constexpr (Q4) {
        const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
        for (int r = 0; r < R; ++r) {
          int32_t xlo, xhi;
          std::memcpy(&xlo, qx[r] + b * QK + 4 * j, 4);
          std::memcpy(&xhi, qx[r] + b * QK + QK / 2 + 4 * j, 4);
          isum[r] = dot_acc(dot_acc(isum[r], lo, _mm256_set1_epi32(xlo)), hi, _mm256_set1_epi32(xhi));
        }
      } else {
        const __m256i wabs = _mm256_sign_epi8(wv, wv);  // |w| as u8; the sign moves onto x
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, qx[r] + b * QK + 4 * j, 4);
          const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(four), wv);
          isum[r] = dot_acc(isum[r], wabs, xs);
        }
      }
    }
    const __m256 ws = load8(sg + b * 8);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(ws, _mm256_set1_ps(dx[r][b])), _mm256_cvtepi32_ps(isum[r]), acc[r]);
    if constexpr (Q4) {
      const __m256 wm = load8(mg + b * 8);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wm, _mm256_set1_ps(sx[r][b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 8; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * block_bytes;
        int isum = 0;
        for (int j = 0; j < (Q4 ? 4 : 8); ++j)
          for (int e = 0; e < 4; ++e) {
            const uint8_t byte = wb[32 * j + 4 * c + e];
            if constexpr (Q4)
              isum += (byte & 0x0F) * qx[r][b * QK + 4 * j + e] + (byte >> 4) * qx[r][b * QK + QK / 2 + 4 * j + e];
            else
              isum += static_cast<int8_t>(byte) * qx[r][b * QK + 4 * j + e];
          }
        acc += to_f(sg[b * 8 + c]) * dx[r][b] * static_cast<float>(isum);
        if constexpr (Q4) acc += to_f(mg[b * 8 + c]) * sx[r][b];
      }
      out[r][c] = acc;
    }
#endif
}

template <bool Q4, typename S, typename scalar_t>
void linear_x8(const QuantRows& a, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scale,
               const at::Tensor& wmin, const float* bias, at::Tensor& y) {
  const int64_t groups = w.size(0) / 8, nb = K / QK, group_bytes = 8 * (Q4 ? K / 2 : K);
  const uint8_t* pw = static_cast<const uint8_t*>(w.data_ptr());
  const S* ps = static_cast<const S*>(scale.data_ptr());
  const S* pm = Q4 ? static_cast<const S*>(wmin.data_ptr()) : nullptr;
  scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t yld = y.stride(0);
  // a group's weight stays in L1 while every tile of activation rows meets it; one row (decoding): the weight, read
  // once, prefetched two groups ahead
  at::parallel_for(0, groups, 2, [&](int64_t lo, int64_t hi) {
    const int8_t* qx[ROW_TILE];
    const float *dx[ROW_TILE], *sx[ROW_TILE];
    float out[ROW_TILE][8];
    for (int64_t g = lo; g < hi; ++g) {
      const uint8_t* wg = pw + g * group_bytes;
      if (M == 1 && g + 2 < groups)
        for (int64_t off = 0; off < group_bytes; off += 64) __builtin_prefetch(wg + 2 * group_bytes + off);
      const S* sg = ps + g * nb * 8;
      const S* mg = Q4 ? pm + g * nb * 8 : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, M - m0);
        for (int64_t r = 0; r < rows; ++r) {
          qx[r] = a.q.data() + (m0 + r) * K;
          dx[r] = a.d.data() + (m0 + r) * nb;
          sx[r] = a.s.data() + (m0 + r) * nb;
        }
        switch (rows) {
          case 4: x8_tile<4, Q4, S>(wg, sg, mg, qx, dx, sx, nb, out); break;
          case 3: x8_tile<3, Q4, S>(wg, sg, mg, qx, dx, sx, nb, out); break;
          case 2: x8_tile<2, Q4, S>(wg, sg, mg, qx, dx, sx, nb, out); break;
          default: x8_tile<1, Q4, S>(wg, sg, mg, qx, dx, sx, nb, out); break;
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int c = 0; c < 8; ++c)
            py[(m0 + r) * yld + g * 8 + c] = static_cast<scalar_t>(out[r][c] + (bias ? bias[g * 8 + c] : 0.f));
      }
    }
  });
}

void check_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                const at::Tensor& wmin, const at::Tensor& bias, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "quant_linear: x must be a CPU [M, K] matrix "
              "with dense rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quant_linear: x must be float32 or "
              "bfloat16");
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % QK == 0, "quant_linear: in_features must be a multiple of 32, got ", K);
  const bool q4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(q4 || w.scalar_type() == at::kChar, "quant_linear: weight must be int8 (q8) or uint8 (q4 nibbles)");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(1) == (q4 ? K / 2 : K), "quant_linear: weight shape ",
              w.sizes(), " does not fit in_features ", K);
  if (scale.dim() == 3) {
    TORCH_CHECK((scale.scalar_type() == at::kHalf || (q4 && scale.scalar_type() == at::kFloat)) &&
                scale.is_contiguous() && N % 8 == 0 && scale.size(0) * 8 == N && scale.size(1) == K / QK &&
                scale.size(2) == 8, "quant_linear: a weight in 8-row groups needs scales [N/8, K/32, 8] (float16; "
                "float32 for 4-bit), N a multiple of 8");
  } else {
    TORCH_CHECK((scale.scalar_type() == at::kFloat || (scale.scalar_type() == at::kHalf && scale.dim() == 2)) &&
                scale.is_contiguous() && scale.size(0) == N &&
                (scale.dim() == 1 ? !q4 : scale.dim() == 2 && scale.size(1) == K / QK), "quant_linear: scale must "
                "be float32 or float16 [N, K/32] (or float32 [N] for per-channel int8, float16 [N/8, K/32, 8] for "
                "8-row groups)");
  }
  if (q4)
    TORCH_CHECK(wmin.scalar_type() == scale.scalar_type() && wmin.is_contiguous() && wmin.sizes() == scale.sizes(),
                "quant_linear: a 4-bit weight needs a min of scale's dtype and shape");
  if (bias.numel())
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N,
                "quant_linear: bias must be float32 [N]");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == N && y.stride(1) == 1 &&
              y.scalar_type() == x.scalar_type(), "quant_linear: out must be [M, N] in x's dtype");
}

// bias and min may be empty tensors (none): one signature that a recorded step graph can replay from a tensor list.
void quant_linear_into(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor wmin, at::Tensor bias,
                       at::Tensor y) {
  check_args(x, w, scale, wmin, bias, y);
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return;
  const bool q4 = w.scalar_type() == at::kByte, row = scale.dim() == 1;
  const float* pb = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const bool half = scale.scalar_type() == at::kHalf;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
#if defined(__AVX2__)
    const QuantRows a = quantize_rows<scalar_t>(x, q4 && scale.dim() != 3);  // pair order: the per-row q4 tiles'
#else
    const QuantRows a = quantize_rows<scalar_t>(x);
#endif
    if (scale.dim() == 3 && q4 && half) linear_x8<true, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (scale.dim() == 3 && q4) linear_x8<true, float, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (scale.dim() == 3) linear_x8<false, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (q4 && half) linear_impl<true, false, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (q4) linear_impl<true, false, float, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (row) linear_impl<false, true, float, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (half) linear_impl<false, false, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else linear_impl<false, false, float, scalar_t>(a, M, K, w, scale, wmin, pb, y);
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
}

at::Tensor quant_linear(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor wmin,
                           at::Tensor bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  quant_linear_into(x, w, scale, wmin, bias, y);
  return y;
}

// The activation quantisation alone, for tests: (q int8 [M, K], d [M, K/32], s [M, K/32]).
std::vector<at::Tensor> quantize_activations(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % QK == 0 && x.scalar_type() == at::kFloat,
              "quantize_activations: x must be contiguous float32 [M, K], K a multiple of 32");
  const QuantRows a = quantize_rows<float>(x);
  const int64_t M = x.size(0), nb = x.size(1) / QK;
  auto q = at::from_blob(const_cast<int8_t*>(a.q.data()), {M, x.size(1)}, at::kChar).clone();
  auto d = at::from_blob(const_cast<float*>(a.d.data()), {M, nb}, at::kFloat).clone();
  auto s = at::from_blob(const_cast<float*>(a.s.data()), {M, nb}, at::kFloat).clone();
  return {q, d, s};
}

// For StepGraph.external (cpu_ops.cpp): a replayable step taking [x, w, scale, min, bias, out].
void quant_linear_step(const std::vector<at::Tensor>& t) { quant_linear_into(t[0], t[1], t[2], t[3], t[4], t[5]); }

int64_t quant_linear_step_address() { return reinterpret_cast<int64_t>(&quant_linear_step); }

bool avx2() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

bool vnni() {
#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();  // engine threads compute at the same time
  m.def("quant_linear", &quant_linear, nogil, "x [M, K] @ W^T, W in q8 or q4 blocks (bias, min: empty when none)");
  m.def("quant_linear_into", &quant_linear_into, nogil, "quant_linear into a preallocated out [M, N]");
  m.def("quantize_activations", &quantize_activations, "per-32-block int8 activations (q, scale, scale * sum q)");
  m.def("quant_linear_step_address", &quant_linear_step_address, "address of the StepGraph step for quant_linear_into");
  m.def("avx2", &avx2, "whether the AVX2 path was built");
  m.def("vnni", &vnni, "whether its integer dot products use AVX512-VNNI");
}
