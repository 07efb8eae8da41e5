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
// Either layout with block scales may come in groups of 16 rows ("x16", below), which 3-d scales [N/16, K/32, 16] say.
// A q4 dot product is sum_b scale_b dx_b isum_b + sum_b min_b dx_b sum(qx_b): the second sum uses the activation
// blocks' sums, computed with the quantisation. Built per instruction-set level (lmforge/kernels/__init__.py): the
// AVX2 path where the CPU has it, a plain C++ path elsewhere (same results up to float summation order). Every output
// is computed by the same operations whatever the number of rows (batch invariance: a sequence decodes alone as in a
// batch). Where the build has VNNI (the native level on CPUs with AVX512-VNNI, or with AVX-VNNI: AVX2 machines such as
// Intel's Alder Lake and later client parts) one vpdpbusd replaces AVX2's three instructions per integer dot product,
// with equal sums. AMX-INT8 tiles are not written.
// Not <torch/extension.h>: parsing it is most of a build's time; these are what the kernels use.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
// LMFORGE_512: the build's 512-bit loops. LMFORGE_NO_512 keeps them out of a build whose flags allow them: the test
// build `vnni256` (lmforge/kernels/__init__.py) runs the AVX2 loops with 256-bit VNNI on an AVX512 CPU.
#if defined(__AVX512F__) && !defined(LMFORGE_NO_512)
#define LMFORGE_512 1
#endif
// LMFORGE_VNNI256: vpdpbusd on 256-bit vectors, as AVX512-VNNI's EVEX form (with VL) or AVX-VNNI's VEX form.
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define LMFORGE_VNNI256 1
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // elements per block
constexpr int64_t ROW_TILE = 4;  // activation rows sharing each unpacked weight block

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

// Activations of one call, quantised: q [M, K] int8, d (block scale) and s (d * sum of the block's q) [M, K/32];
// c = -128 * sum of the block's q (the offset correction of 16-row-group int8 weights, below).
// q4 weights (AVX2) read the activations in pair order instead: per two blocks b, b + 1, 64 bytes holding b's
// elements 0-15, b + 1's 0-15, b's 16-31, b + 1's 16-31 (zeros for a missing b + 1), so that one 32-byte load of
// two weight blocks' nibbles meets its activations without shuffling the weights: `qp`, rows of pair_bytes(K).
// Every element is written before it is read: no zero fill (std::vector's costs 1-2 % of an int8 engine step).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  void resize(int64_t n) { p.reset(new T[n]); }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
};

struct QuantRows {
  Scratch<int8_t> q, qp;
  Scratch<float> d, s;
  Scratch<int32_t> c;
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

#if defined(__AVX2__)
inline __m256 load_floats(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load_floats(const c10::BFloat16* x) {  // exact: a bfloat16 is a float32's upper half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// One 32-block of a row: q = round_half_even(x / scale), scale = absmax / 127 (AVX2: eight lanes at a time, the same
// results bit for bit).
template <typename scalar_t>
void quantize_block(const scalar_t* x, int8_t* q, float* d, float* s, int32_t* c) {
#if defined(__AVX2__)
  __m256 v[4];
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = load_floats(x + 8 * j);
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
  *c = -128 * _mm_cvtsi128_si32(s4);
#else
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
  *c = -128 * sum;
#endif
}

enum class Order { rows, pairs, tiles };

// Order::tiles is x16's (below): the rows in tiles of `tile` (the last one shorter); in a tile of R rows, per block b
// and 4-byte run j, the R rows' 4 bytes side by side (q[((b * 8 + j) * R + r) * 4 + e] = element 4j + e of row r's
// block b), and d, s, c per block for the R rows (d[b * R + r]): one pointer and constant offsets per tile.
template <typename scalar_t>
QuantRows quantize_rows(const at::Tensor& x, Order order = Order::rows, int64_t tile = 1) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK, ld = x.stride(0);
  QuantRows r;
  r.q.resize(M * K);
  r.d.resize(M * nb);
  r.s.resize(M * nb);
  r.c.resize(M * nb);
  const scalar_t* px = x.data_ptr<scalar_t>();
  const bool tiles = order == Order::tiles && M > 1;  // one row: the tile order is the row order
  at::parallel_for(0, M * nb, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t m = i / nb, b = i % nb;
      if (!tiles) {
        quantize_block(px + m * ld + b * QK, r.q.data() + m * K + b * QK, r.d.data() + i, r.s.data() + i,
                       r.c.data() + i);
        continue;
      }
      const int64_t m0 = m / tile * tile, R = std::min(tile, M - m0), at = m0 * nb + b * R + (m - m0);
      int8_t q[QK];
      quantize_block(px + m * ld + b * QK, q, r.d.data() + at, r.s.data() + at, r.c.data() + at);
      int8_t* dst = r.q.data() + m0 * K + b * 8 * R * 4 + (m - m0) * 4;
      for (int64_t j = 0; j < QK / 4; ++j) std::memcpy(dst + j * R * 4, q + 4 * j, 4);
    }
  });
  if (order == Order::pairs) {
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
// acc + eight s32 sums of four u8 w x s8 x products each. VNNI does it in one instruction; AVX2 in three
// (maddubs to s16 pairs, madd to s32, add). The same integers either way: maddubs saturates at 2^15, and no pair here
// reaches it (|w| <= 128 after the sign trick, |x| <= 127: 32512; 4-bit w <= 15), so every level gives equal sums.
inline __m256i dot_acc(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, w, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}
#if !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
// 4-bit w (<= 15) on plain AVX2: a maddubs pair sum is at most 2 * 15 * 128 = 3840, so up to eight of them (a 32-block's
// runs) add up exactly in 16 bits (30720 < 2^15) before one madd widens them: 9 multiplies per block where dot_acc
// takes 16, with the same integers.
inline __m256i dot16_acc(__m256i acc16, __m256i w, __m256i x) {
  return _mm256_add_epi16(acc16, _mm256_maddubs_epi16(w, x));
}
inline __m256i widen16(__m256i acc16) { return _mm256_madd_epi16(acc16, _mm256_set1_epi16(1)); }
#define LMFORGE_Q4_SUM16
#endif
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
#if defined(LMFORGE_512)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif
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
#if defined(LMFORGE_Q4_SUM16)
          const __m256 isum = _mm256_cvtepi32_ps(
              widen16(dot16_acc(_mm256_maddubs_epi16(lo[c], xlo), hi[c], xhi)));
#else
          const __m256 isum = _mm256_cvtepi32_ps(dot_acc(dot_acc(_mm256_setzero_si256(), lo[c], xlo), hi[c], xhi));
#endif
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

// ---- weights in groups of 16 output rows ("x16": lmforge/layers/quant_linear.py's group_rows) -------------------------
// Per group of 16 rows and per 32-block, the rows' block bytes are laid out as runs of 64: run j holds bytes 4j..4j+3
// of each of the 16 rows (row r in bytes 4r..4r+3). q8: 8 runs (a row's 32 bytes), elements 4j..4j+3, each byte
// stored + 128 (w ^ 0x80: unsigned); q4: 4 runs (a row's 16 nibble bytes), low nibbles elements 4j..4j+3 and high
// nibbles 16+4j..16+4j+3. Scales (and mins) are [N/16, K/32, 16]. One weight vector meets 4 activation bytes broadcast
// to every lane, so each lane is one output row: a block's integer sums come out as one vector and take one FMA with
// the rows' scales (and one with their mins), with no scalar scale work per row and no horizontal sum. With
// AVX512-VNNI, vpdpbusd (u8 x s8) takes a 64-byte weight vector as it is (unsigned bytes and nibbles) and the
// activation's 4 bytes broadcast: 64 multiply-adds per instruction, twice the bf16 dot product's rate; the
// + 128 of q8 bytes adds 128 * sum(q_x) to each sum, which the accumulator's start value (c = -128 sum(q_x), made with
// the quantisation) takes away. AVX2 undoes the offset (xor), moves the sign onto x and runs 8 lanes at a time. Every
// output is acc = fma(scale_w * scale_x, isum, acc) (+ fma(min, scale_x * sum(q_x), acc) for q4) over the blocks in
// order with exact integer sums, whatever the number of rows and the level: batch-invariant like the per-row kernels.
constexpr int64_t GROUP = 16;
#if defined(__AVX512VNNI__) && defined(LMFORGE_512)
constexpr int64_t X16_ROWS = 8;  // activation rows per tile: 16 accumulators, the weight vector loaded once for 8
#else
// AVX2 (and plain C++): 12 of the 16 ymm registers hold a tile's sums (4-bit 64-row products ~20 % faster than with 4)
constexpr int64_t X16_ROWS = 6;
#endif

// qt, ct, dt, st: the tile's activations in Order::tiles (quantize_rows).
template <int R, bool Q4, typename S>
inline void x16_tile(const uint8_t* wg, const S* sg, const S* mg, const int8_t* qt, const int32_t* ct,
                     const float* dt, const float* st, int64_t nb, float (*out)[GROUP]) {
  constexpr int64_t block_bytes = GROUP * (Q4 ? QK / 2 : QK), runs = Q4 ? 4 : 8;
  auto four = [&](int64_t b, int64_t j, int r) {  // activation bytes 4j..4j+3 of row r's block b
    int32_t v;
    std::memcpy(&v, qt + ((b * 8 + j) * R + r) * 4, 4);
    return v;
  };
#if defined(__AVX512VNNI__) && defined(LMFORGE_512)
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = Q4 ? _mm512_setzero_si512() : _mm512_set1_epi32(ct[b * R + r]);
    const uint8_t* wb = wg + b * block_bytes;
    for (int j = 0; j < runs; ++j) {
      const __m512i wv = _mm512_loadu_si512(wb + 64 * j);
      if constexpr (Q4) {
        const __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
        for (int r = 0; r < R; ++r)
          isum[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[r], lo, _mm512_set1_epi32(four(b, j, r))), hi,
                                        _mm512_set1_epi32(four(b, 4 + j, r)));
      } else {
        for (int r = 0; r < R; ++r) isum[r] = _mm512_dpbusd_epi32(isum[r], wv, _mm512_set1_epi32(four(b, j, r)));
      }
    }
    const __m512 ws = load16(sg + b * GROUP);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(ws, _mm512_set1_ps(dt[b * R + r])), _mm512_cvtepi32_ps(isum[r]), acc[r]);
    if constexpr (Q4) {
      const __m512 wm = load16(mg + b * GROUP);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(st[b * R + r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], acc[r]);
#elif defined(__AVX2__)
  // rows 8h..8h+7 in two passes over the group (it stays in L1/L2 between them): AVX2's 16 registers hold one half's
  // accumulators. With 256-bit VNNI the q8 bytes go in unsigned, as in the 512-bit loop; without, the xor undoes
  // the + 128 and the sign trick makes them unsigned.
  const __m256i m4 = _mm256_set1_epi8(0x0F);
#if !defined(LMFORGE_VNNI256)
  (void)ct;
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
#endif
  for (int h = 0; h < 2; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i isum[R];
#if defined(LMFORGE_VNNI256)
      for (int r = 0; r < R; ++r) isum[r] = Q4 ? _mm256_setzero_si256() : _mm256_set1_epi32(ct[b * R + r]);
#else
      for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
#endif
      const uint8_t* wb = wg + b * block_bytes + 32 * h;
      for (int j = 0; j < runs; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
        if constexpr (Q4) {
          const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
          for (int r = 0; r < R; ++r)
#if defined(LMFORGE_Q4_SUM16)  // isum holds 16-bit sums until the block's end
            isum[r] = dot16_acc(dot16_acc(isum[r], lo, _mm256_set1_epi32(four(b, j, r))), hi,
                                _mm256_set1_epi32(four(b, 4 + j, r)));
#else
            isum[r] = dot_acc(dot_acc(isum[r], lo, _mm256_set1_epi32(four(b, j, r))), hi,
                              _mm256_set1_epi32(four(b, 4 + j, r)));
#endif
        } else {
#if defined(LMFORGE_VNNI256)
          for (int r = 0; r < R; ++r) isum[r] = dot_acc(isum[r], raw, _mm256_set1_epi32(four(b, j, r)));
#else
          const __m256i wv = _mm256_xor_si256(raw, offset);
          const __m256i wabs = _mm256_sign_epi8(wv, wv);  // |w| as u8; the sign moves onto x
          for (int r = 0; r < R; ++r)
            isum[r] = dot_acc(isum[r], wabs, _mm256_sign_epi8(_mm256_set1_epi32(four(b, j, r)), wv));
#endif
        }
      }
#if defined(LMFORGE_Q4_SUM16)
      if constexpr (Q4)
        for (int r = 0; r < R; ++r) isum[r] = widen16(isum[r]);
#endif
      const __m256 ws = load8(sg + b * GROUP + 8 * h);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(ws, _mm256_set1_ps(dt[b * R + r])), _mm256_cvtepi32_ps(isum[r]), acc[r]);
      if constexpr (Q4) {
        const __m256 wm = load8(mg + b * GROUP + 8 * h);
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wm, _mm256_set1_ps(st[b * R + r]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
  }
#else
  (void)ct;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < GROUP; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * block_bytes;
        int isum = 0;
        for (int j = 0; j < runs; ++j)
          for (int e = 0; e < 4; ++e) {
            const uint8_t byte = wb[64 * j + 4 * c + e];
            const int8_t* x = qt + ((b * 8 + j) * R + r) * 4 + e;
            if constexpr (Q4) isum += (byte & 0x0F) * x[0] + (byte >> 4) * x[4 * R * 4];
            else isum += static_cast<int8_t>(byte ^ 0x80) * x[0];
          }
        acc += to_f(sg[b * GROUP + c]) * dt[b * R + r] * static_cast<float>(isum);
        if constexpr (Q4) acc += to_f(mg[b * GROUP + c]) * st[b * R + r];
      }
      out[r][c] = acc;
    }
#endif
}

// y[0:16] = out + bias (none: nullptr), vectorised where the build has AVX512 (bfloat16: round to nearest even as
// static_cast does, except that vcvtneps2bf16 flushes denormal outputs to zero).
template <typename scalar_t>
inline void store16(scalar_t* y, const float* out, const float* bias) {
#if defined(LMFORGE_512)
  __m512 v = _mm512_loadu_ps(out);
  if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  if constexpr (std::is_same_v<scalar_t, float>) return _mm512_storeu_ps(y, v);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
    return _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#endif
#endif
  for (int c = 0; c < GROUP; ++c) y[c] = static_cast<scalar_t>(out[c] + (bias ? bias[c] : 0.f));
}

template <bool Q4, typename S, typename scalar_t>
void linear_x16(const QuantRows& a, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scale,
                const at::Tensor& wmin, const float* bias, at::Tensor& y) {
  const int64_t groups = w.size(0) / GROUP, nb = K / QK, group_bytes = GROUP * (Q4 ? K / 2 : K);
  const uint8_t* pw = static_cast<const uint8_t*>(w.data_ptr());
  const S* ps = static_cast<const S*>(scale.data_ptr());
  const S* pm = Q4 ? static_cast<const S*>(wmin.data_ptr()) : nullptr;
  scalar_t* py = y.data_ptr<scalar_t>();
  const int64_t yld = y.stride(0);
  // a group's weight stays in L1 while every tile of activation rows meets it; one row (decoding): the weight, read
  // once, prefetched a group ahead
  at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
    float out[X16_ROWS][GROUP];
    for (int64_t g = lo; g < hi; ++g) {
      const uint8_t* wg = pw + g * group_bytes;
      if (M == 1 && g + 1 < groups)
        for (int64_t off = 0; off < group_bytes; off += 64) __builtin_prefetch(wg + group_bytes + off);
      const S* sg = ps + g * nb * GROUP;
      const S* mg = Q4 ? pm + g * nb * GROUP : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += X16_ROWS) {
        const int64_t rows = std::min(X16_ROWS, M - m0);
        const int64_t t = m0 * nb;  // the tile's first block entry
        [&]<int64_t... Rs>(std::integer_sequence<int64_t, Rs...>) {  // x16_tile<rows>
          ((rows == Rs + 1 ? x16_tile<Rs + 1, Q4, S>(wg, sg, mg, a.q.data() + m0 * K, a.c.data() + t, a.d.data() + t,
                                                     a.s.data() + t, nb, out) : void()), ...);
        }(std::make_integer_sequence<int64_t, X16_ROWS>{});
        for (int64_t r = 0; r < rows; ++r)
          store16(py + (m0 + r) * yld + g * GROUP, out[r], bias ? bias + g * GROUP : nullptr);
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
                scale.is_contiguous() && N % GROUP == 0 && scale.size(0) * GROUP == N && scale.size(1) == K / QK &&
                scale.size(2) == GROUP, "quant_linear: a weight in 16-row groups needs scales [N/16, K/32, 16] "
                "(float16; float32 for 4-bit), N a multiple of 16");
  } else {
    TORCH_CHECK((scale.scalar_type() == at::kFloat || (scale.scalar_type() == at::kHalf && scale.dim() == 2)) &&
                scale.is_contiguous() && scale.size(0) == N &&
                (scale.dim() == 1 ? !q4 : scale.dim() == 2 && scale.size(1) == K / QK), "quant_linear: scale must "
                "be float32 or float16 [N, K/32] (or float32 [N] for per-channel int8, [N/16, K/32, 16] for "
                "16-row groups)");
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
    const Order order = scale.dim() == 3 ? Order::tiles : (q4 ? Order::pairs : Order::rows);
#else
    const Order order = scale.dim() == 3 ? Order::tiles : Order::rows;
#endif
    const QuantRows a = quantize_rows<scalar_t>(x, order, X16_ROWS);
    if (scale.dim() == 3 && q4 && half) linear_x16<true, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (scale.dim() == 3 && q4) linear_x16<true, float, scalar_t>(a, M, K, w, scale, wmin, pb, y);
    else if (scale.dim() == 3) linear_x16<false, uint16_t, scalar_t>(a, M, K, w, scale, wmin, pb, y);
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
#if defined(LMFORGE_VNNI256)
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
  m.def("vnni", &vnni, "whether its integer dot products use VNNI (vpdpbusd)");
}
