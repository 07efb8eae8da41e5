// The paged KV cache of the engine (lmforge/engine/kv_cache.py): new keys and values into their slots, and the
// attention of a few query tokens per sequence over the cache in place.

#include "cpu_ops.h"

namespace lmforge {

// ---- new keys and values into their paged-cache slots -----------------------------------------------------------
// k/v [T, KVH, D] may be row-strided views (slices of a fused q/k/v product): each token's row is dense.
// An int8 cache (k_scale/v_scale given, float32 [blocks, block_size, KVH]) stores each row quantised as
// lmforge/layers/kv_quant.py does: scale = absmax / 127, round(x / scale) to nearest even.
namespace {
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t dim, int8_t* q, float* scales) {
  for (int64_t r = 0; r < rows; ++r, x += dim, q += dim) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(to_f(x[d])));
    const float s = amax / 127.f;
    scales[r] = s;
    if (s > 0.f) {
      for (int64_t d = 0; d < dim; ++d)
        q[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(to_f(x[d]) / s))));
    } else {
      std::fill(q, q + dim, int8_t{0});
    }
  }
}
}  // namespace

void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots,
              OptTensor k_scale, OptTensor v_scale) {
  const bool int8 = k_cache.scalar_type() == at::kChar;
  if (int8) {
    check(k, "k");
    TORCH_CHECK(v_cache.scalar_type() == at::kChar && v.scalar_type() == k.scalar_type() && k_scale && v_scale &&
                k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->is_contiguous() && v_scale->is_contiguous() &&
                k_scale->numel() * k.size(2) == k_cache.numel() && v_scale->numel() * k.size(2) == v_cache.numel(),
                "write_kv: an int8 cache needs float32 scales [blocks, block_size, kv_heads] for both caches");
  } else {
    check(k_cache, "k_cache");
    TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
                "write_kv: new keys/values must have the cache's dtype");
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv: caches must be contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "write_kv: k and v must be [T, kv_heads, dim]");
  auto kc = k.stride(2) == 1 && k.stride(1) == k.size(2) ? k : k.contiguous();
  auto vc = v.stride(2) == 1 && v.stride(1) == v.size(2) ? v : v.contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t t = kc.size(0), width = kc.size(1) * kc.size(2);
  const int64_t nslots = k_cache.numel() / width;
  const int64_t* s = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) TORCH_CHECK(s[i] >= 0 && s[i] < nslots, "write_kv: slot out of range");
  if (int8) {
    const int64_t heads = kc.size(1), dim = kc.size(2);
    dispatch(kc, [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < t; ++i) {
        quantize_rows(ptr<T>(kc) + i * kc.stride(0), heads, dim, ptr<int8_t>(k_cache) + s[i] * width,
                      ptr<float>(*k_scale) + s[i] * heads);
        quantize_rows(ptr<T>(vc) + i * vc.stride(0), heads, dim, ptr<int8_t>(v_cache) + s[i] * width,
                      ptr<float>(*v_scale) + s[i] * heads);
      }
    });
    return;
  }
  const int64_t size = kc.element_size(), bytes = width * size;
  auto* kd = static_cast<char*>(k_cache.data_ptr());
  auto* vd = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(kc.data_ptr());
  const auto* vs = static_cast<const char*>(vc.data_ptr());
  for (int64_t i = 0; i < t; ++i) {
    std::memcpy(kd + s[i] * bytes, ks + i * kc.stride(0) * size, bytes);
    std::memcpy(vd + s[i] * bytes, vs + i * vc.stride(0) * size, bytes);
  }
}

// ---- attention of a few query tokens per sequence over its paged cache ------------------------------------------
// q [T, H, D] (sequence r's queries are rows cu_q[r]..cu_q[r+1], the last ones of its seqlens_k[r] positions,
// causal, optional sliding window); k/v cache [blocks, block_size, KVH, D]; block_tables [S, W]. Each (sequence,
// head) task walks the sequence's blocks in place: no gather, no padding, softmax in float32.

namespace {
// The K and V blocks of the sequence a thread attends to next, asked for a few cache lines per key of the current
// one: they are in L2 by the time that sequence starts, so DRAM streams while the current one computes (without
// it, each sequence began with a wait on DRAM; docs/benchmarks.md). The per-row prefetch below
// still covers a thread's first sequence, which no stream announced.
struct BlockStream {
  std::vector<const char*> blocks;
  int64_t bytes = 0, next = 0, offset = 0, per_step = 0;
  inline void step() {
    for (int64_t i = 0; i < per_step && next < static_cast<int64_t>(blocks.size()); ++i) {
      __builtin_prefetch(blocks[next] + offset, 0, 2);  // _MM_HINT_T1, on any CPU
      if ((offset += 64) >= bytes) {
        offset = 0;
        ++next;
      }
    }
  }
};

#if defined(__AVX2__) && defined(__FMA__)
// Asks for the cache lines of a key or value row ahead of use: blocks of a paged cache are scattered, which the
// hardware prefetcher does not follow. The task of a sequence's first kv head fetches the rows of all its kv heads
// (`span` = kv_heads * dim elements, one contiguous run): the tasks of the other heads, which the same thread runs
// next, then read them from its L2 instead of DRAM (span 0: no prefetch).
template <typename C>
inline void prefetch_row(const C* p, int64_t span) {
  const auto* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < span * static_cast<int64_t>(sizeof(C)); i += 64) _mm_prefetch(bytes + i, _MM_HINT_T0);
}
constexpr int64_t PREFETCH_KEYS = 24;
#endif

#if defined(__AVX512BF16__)

// The four horizontal sums of a, b, c, d.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a b a b
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // per 128 bits: a b c d
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps128(x);
}

// acc[G][16 C] = sum over keys p of probability[h][p] * value[p], the accumulators held in registers.
template <int G, int C>
void weigh_values(const float* scores, int64_t stride, const bf16* vc, const int64_t* offs, int64_t first,
                  int64_t pos, int64_t span, float* acc, BlockStream& ahead) {
  constexpr int64_t dim = 16 * C;
  __m512 a[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) a[h][c] = _mm512_setzero_ps();
  if (span)
    for (int64_t p = first; p < std::min(first + PREFETCH_KEYS, pos + 1); ++p) prefetch_row(vc + offs[p], span);
  for (int64_t p = first; p <= pos; ++p) {
    const bf16* vp = vc + offs[p];
    if (span && p + PREFETCH_KEYS <= pos) prefetch_row(vc + offs[p + PREFETCH_KEYS], span);
    ahead.step();
    __m512 w[G];
    for (int h = 0; h < G; ++h) w[h] = _mm512_set1_ps(scores[h * stride + p - first]);
    for (int c = 0; c < C; ++c) {
      const __m512 v = load_f32x16(vp + 16 * c);
      for (int h = 0; h < G; ++h) a[h][c] = _mm512_fmadd_ps(w[h], v, a[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + h * dim + 16 * c, a[h][c]);
}

// scores[h][i] = scale * q[h] . key[first + i] for the G query heads sharing one kv head (dim = 32 C), each key row
// loaded once for all of them, four keys sharing one horizontal reduction: faster than a loop per head
// (docs/benchmarks.md). Kept out of line: inlined, attend_bf16's other loops ran slower than before.
template <int G, int C>
__attribute__((noinline)) void scores_bf16(const bf16* q, const bf16* kc, const int64_t* offs, int64_t first, int64_t n, int64_t span,
                 float scale, float* scores, int64_t stride, BlockStream& ahead) {
  __m512bh qv[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = (__m512bh)_mm512_loadu_si512(q + (h * C + c) * 32);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    if (span)
      for (int64_t j = i + PREFETCH_KEYS; j < std::min(i + PREFETCH_KEYS + 4, n); ++j)
        prefetch_row(kc + offs[first + j], span);
    for (int h = 0; h < G; ++h) ahead.step();  // the rate the stream was planned for: one step per head and 4 keys
    __m512 a[G][4];
    for (int j = 0; j < 4; ++j) {
      const bf16* kp = kc + offs[first + i + j];
      __m512bh kv[C];
      for (int c = 0; c < C; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kp + 32 * c);
      for (int h = 0; h < G; ++h) {
        a[h][j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), kv[0], qv[h][0]);
        for (int c = 1; c < C; ++c) a[h][j] = _mm512_dpbf16_ps(a[h][j], kv[c], qv[h][c]);
      }
    }
    for (int h = 0; h < G; ++h)
      _mm_storeu_ps(scores + h * stride + i, _mm_mul_ps(sum4(a[h][0], a[h][1], a[h][2], a[h][3]), _mm_set1_ps(scale)));
  }
  for (; i < n; ++i) {
    const bf16* kp = kc + offs[first + i];
    for (int h = 0; h < G; ++h) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kp + 32 * c), qv[h][c]);
      scores[h * stride + i] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}

// scores_bf16 for the common shapes (false for others: the caller's loop per head computes them).
bool grouped_scores(const bf16* q, int64_t group, int64_t dim, const bf16* kc, const int64_t* offs, int64_t first,
                    int64_t n, int64_t span, float scale, float* scores, int64_t stride, BlockStream& ahead) {
  switch (group * 100 + dim) {
    case 164: scores_bf16<1, 2>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    case 264: scores_bf16<2, 2>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    case 364: scores_bf16<3, 2>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    case 464: scores_bf16<4, 2>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    case 1128: scores_bf16<1, 4>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    case 2128: scores_bf16<2, 4>(q, kc, offs, first, n, span, scale, scores, stride, ahead); return true;
    default: return false;
  }
}

// One query token against keys first..pos of one kv head, for the `group` query heads sharing it (bf16, dim a
// multiple of 32). Scores use the bf16 dot-product instruction (exact products, float32 sums).
void attend_bf16(const bf16* q, int64_t group, int64_t dim, const bf16* kc, const bf16* vc, const int64_t* offs,
                 int64_t first, int64_t pos, int64_t span, float scale, float* scores, int64_t stride, float* acc,
                 bf16* out, BlockStream& ahead) {
  const int64_t n = pos - first + 1;
  if (span)  // the first keys at once: they are needed before the running prefetch gets ahead
    for (int64_t j = 0; j < std::min(PREFETCH_KEYS, n); ++j) prefetch_row(kc + offs[first + j], span);
  if (!grouped_scores(q, group, dim, kc, offs, first, n, span, scale, scores, stride, ahead)) {  // other shapes
    for (int64_t h = 0; h < group; ++h) {
      const bf16* qh = q + h * dim;
      float* sh = scores + h * stride;
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) {  // four keys at a time: one shared horizontal reduction for their dot products
        if (h == 0 && span)
          for (int64_t j = i + PREFETCH_KEYS; j < std::min(i + PREFETCH_KEYS + 4, n); ++j)
            prefetch_row(kc + offs[first + j], span);
        ahead.step();
        __m512 a[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t p = first + i + j;
          const bf16* kp = kc + offs[p];
          a[j] = _mm512_setzero_ps();
          for (int64_t c = 0; c < dim; c += 32)
            a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512(kp + c), (__m512bh)_mm512_loadu_si512(qh + c));
        }
        _mm_storeu_ps(sh + i, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
      }
      for (; i < n; ++i) {
        const int64_t p = first + i;
        const bf16* kp = kc + offs[p];
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 32)
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kp + c), (__m512bh)_mm512_loadu_si512(qh + c));
        sh[i] = _mm512_reduce_add_ps(a) * scale;
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {  // softmax in place, 16 scores at a time
    float* sh = scores + h * stride;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sh + i));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 e = exp_f32x16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sh + i), top));
      _mm512_mask_storeu_ps(sh + i, m, e);
      sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(sh + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sh + i), inv));
    }
  }
  switch (group * 100 + dim) {  // the common shapes keep their accumulators in registers
    case 164: weigh_values<1, 4>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    case 264: weigh_values<2, 4>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    case 364: weigh_values<3, 4>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    case 464: weigh_values<4, 4>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    case 1128: weigh_values<1, 8>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    case 2128: weigh_values<2, 8>(scores, stride, vc, offs, first, pos, span, acc, ahead); break;
    default:
      std::fill(acc, acc + group * dim, 0.f);
      for (int64_t p = first; p <= pos; ++p) {
        const bf16* vp = vc + offs[p];
        for (int64_t c = 0; c < dim; c += 16) {
          const __m512 v = load_f32x16(vp + c);
          for (int64_t h = 0; h < group; ++h) {
            float* a = acc + h * dim + c;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[h * stride + p - first]), v, _mm512_loadu_ps(a)));
          }
        }
      }
  }
  for (int64_t i = 0; i < group * dim; ++i) out[i] = from_f<bf16>(acc[i]);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The same walk for every other cache (float32, int8 with a scale per row, bf16 on CPUs without its dot product)
// in 8 float32 lanes: AVX2 machines run their float32 models here, AVX512 ones their float32 and int8 caches.
inline __m256 load_f32x8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_f32x8(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline __m256 load_f32x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// The four horizontal sums of a, b, c, d (one of them alone: the same additions, so a key's score does not depend
// on whether it fell in a group of four).
inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline __m256i first_lanes(int64_t n) {  // a maskload / maskstore mask of lanes 0..n-1
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// scores[h][j] = q[h] . key[first + j] (q scaled) for J <= 4 keys and G <= 3 query heads sharing one kv head,
// dim = 8 C: each key row loaded once for all of them, the J keys sharing one horizontal reduction.
template <int G, int C, int J, typename K>
inline void score_keys(const float* q, const K* kc, const int64_t* offs, float* scores, int64_t stride) {
  __m256 a[G][4];
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < 4; ++j) a[h][j] = _mm256_setzero_ps();
  for (int j = 0; j < J; ++j) {
    const K* kp = kc + offs[j];
    for (int c = 0; c < C; ++c) {
      const __m256 k = load_f32x8(kp + 8 * c);
      for (int h = 0; h < G; ++h) a[h][j] = _mm256_fmadd_ps(k, _mm256_loadu_ps(q + h * 8 * C + 8 * c), a[h][j]);
    }
  }
  const __m128i part = _mm256_castsi256_si128(first_lanes(J));
  for (int h = 0; h < G; ++h) _mm_maskstore_ps(scores + h * stride, part, sum4(a[h][0], a[h][1], a[h][2], a[h][3]));
}

template <int G, int C, typename K>
void scores_f32(const float* q, const K* kc, const int64_t* offs, int64_t first, int64_t n, int64_t span,
                float* scores, int64_t stride, BlockStream& ahead) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    if (span)
      for (int64_t j = i + PREFETCH_KEYS; j < std::min(i + PREFETCH_KEYS + 4, n); ++j)
        prefetch_row(kc + offs[first + j], span);
    for (int h = 0; h < G; ++h) ahead.step();  // the rate the stream was planned for: one step per head, 4 keys
    score_keys<G, C, 4>(q, kc, offs + first + i, scores + i, stride);
  }
  switch (n - i) {
    case 3: score_keys<G, C, 3>(q, kc, offs + first + i, scores + i, stride); break;
    case 2: score_keys<G, C, 2>(q, kc, offs + first + i, scores + i, stride); break;
    case 1: score_keys<G, C, 1>(q, kc, offs + first + i, scores + i, stride); break;
  }
}

// acc[h] = sum over keys p of weights[h][p - first] * value[p], G <= 3 heads, 4 x 8 columns at a time in registers.
template <int G, int C, typename V>
void weigh_f32(const float* weights, int64_t stride, const V* vc, const int64_t* offs, int64_t first, int64_t pos,
               int64_t span, float* acc, BlockStream& ahead) {
  static_assert(C % 4 == 0);
  for (int c0 = 0; c0 < C; c0 += 4) {
    __m256 a[G][4];
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < 4; ++c) a[h][c] = _mm256_setzero_ps();
    for (int64_t p = first; p <= pos; ++p) {
      if (c0 == 0) {  // the first pass streams the rows; the later ones find them in L1 / L2
        if (span && p + PREFETCH_KEYS <= pos) prefetch_row(vc + offs[p + PREFETCH_KEYS], span);
        ahead.step();
      }
      const V* vp = vc + offs[p] + 8 * c0;
      __m256 w[G];
      for (int h = 0; h < G; ++h) w[h] = _mm256_broadcast_ss(weights + h * stride + p - first);
      for (int c = 0; c < 4; ++c) {
        const __m256 v = load_f32x8(vp + 8 * c);
        for (int h = 0; h < G; ++h) a[h][c] = _mm256_fmadd_ps(w[h], v, a[h][c]);
      }
    }
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + h * 8 * C + 8 * (c0 + c), a[h][c]);
  }
}

// fn(h0, G, C) for the group's query heads h0..h0+G-1, up to 3 per walk (their accumulators fill the 16 registers),
// G and C (dim = 8 C, 64 or 128) as std::integral_constant.
template <typename Fn>
void head_chunks(int64_t group, int64_t dim, Fn&& fn) {
  for (int64_t h0 = 0; h0 < group; h0 += 3) {
    auto with_dim = [&](auto g) {
      if (dim == 64)
        fn(h0, g, std::integral_constant<int, 8>{});
      else
        fn(h0, g, std::integral_constant<int, 16>{});
    };
    const int64_t heads = std::min<int64_t>(3, group - h0);
    if (heads == 1)
      with_dim(std::integral_constant<int, 1>{});
    else if (heads == 2)
      with_dim(std::integral_constant<int, 2>{});
    else
      with_dim(std::integral_constant<int, 3>{});
  }
}

// One query token (q: the group's heads, scaled, float32) against keys first..pos of one kv head: acc [group, dim].
// False for head sizes other than 64 and 128 (the caller's plain loops take them).
template <typename K>
bool attend_f32(const float* q, int64_t group, int64_t dim, const K* kc, const K* vc, const float* ksc,
                const float* vsc, const int64_t* offs, int64_t first, int64_t pos, int64_t span, float* scores,
                int64_t stride, float* acc, BlockStream& ahead) {
  if (dim != 64 && dim != 128) return false;
  const int64_t n = pos - first + 1;
  if (span)  // the first keys at once: they are needed before the running prefetch gets ahead
    for (int64_t j = 0; j < std::min(PREFETCH_KEYS, n); ++j) prefetch_row(kc + offs[first + j], span);
  head_chunks(group, dim, [&](int64_t h0, auto G, auto C) {
    scores_f32<decltype(G)::value, decltype(C)::value>(q + h0 * dim, kc, offs, first, n, h0 ? 0 : span,
                                                        scores + h0 * stride, stride, ahead);
  });
  for (int64_t h = 0; h < group; ++h) {  // softmax in place, 8 scores at a time; an int8 cache's row scales folded in
    float* sh = scores + h * stride;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 8) {
      const __m256i m = first_lanes(n - i);
      __m256 x = _mm256_maskload_ps(sh + i, m);
      if (ksc != nullptr) {  // an int8 cache: the key row's scale
        x = _mm256_mul_ps(x, _mm256_maskload_ps(ksc + first + i, m));
        _mm256_maskstore_ps(sh + i, m, x);
      }
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(mx, x, _mm256_castsi256_ps(m)));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const __m256 top = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256i m = first_lanes(n - i);
      const __m256 e = _mm256_and_ps(exp_f32x8(_mm256_sub_ps(_mm256_maskload_ps(sh + i, m), top)),
                                     _mm256_castsi256_ps(m));
      _mm256_maskstore_ps(sh + i, m, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 z = _mm256_setzero_ps();
    const __m256 inv = _mm256_set1_ps(1.f / _mm_cvtss_f32(sum4(sum, z, z, z)));
    for (int64_t i = 0; i < n; i += 8) {
      const __m256i m = first_lanes(n - i);
      __m256 w = _mm256_mul_ps(_mm256_maskload_ps(sh + i, m), inv);
      if (vsc != nullptr) w = _mm256_mul_ps(w, _mm256_maskload_ps(vsc + first + i, m));
      _mm256_maskstore_ps(sh + i, m, w);
    }
  }
  head_chunks(group, dim, [&](int64_t h0, auto G, auto C) {
    weigh_f32<decltype(G)::value, decltype(C)::value>(scores + h0 * stride, stride, vc, offs, first, pos,
                                                       h0 ? 0 : span, acc + h0 * dim, ahead);
  });
  return true;
}
#endif

// C, the cache's type: T, or int8_t with a float32 scale per row (ksc/vsc, [blocks, block_size, KVH]) that each
// score and each probability is multiplied by: rows are dequantised in registers, the cache is never copied.
template <typename T, typename C>
void paged_attention_impl(const T* q, const C* kc, const C* vc, const float* ksc, const float* vsc,
                          const int64_t* cu_q, const int64_t* lens_k,
                          const int64_t* tables, const int64_t* seqs, int64_t nseq, int64_t width, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int64_t window, int64_t qs,
                          T* out) {
  constexpr bool int8 = std::is_same_v<C, int8_t>;
  const int64_t group = heads / kv_heads;  // query heads sharing one kv head: each key is read once for all
  at::parallel_for(0, nseq * kv_heads, 1, [=](int64_t lo, int64_t hi) {
    std::vector<float> qf(group * dim), acc(group * dim), scores, k_scales, v_scales;
    std::vector<int64_t> offs;  // where key/value p of this task's kv head starts in the caches (no division per key)
    [[maybe_unused]] BlockStream ahead;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = seqs[task / kv_heads], g = task % kv_heads;
      const int64_t q0 = cu_q[r], lq = cu_q[r + 1] - q0, lk = lens_k[r];
#if defined(__AVX2__) && defined(__FMA__)
      if (g == 0) {  // the next sequence's blocks, spread over this sequence's tasks (their key steps)
        ahead.blocks.clear();
        ahead.next = ahead.offset = 0;
        if (task + kv_heads < hi) {
          const int64_t after = seqs[task / kv_heads + 1], count = (lens_k[after] + block_size - 1) / block_size;
          ahead.bytes = block_size * kv_heads * dim * static_cast<int64_t>(sizeof(C));
          for (int64_t b = 0; b < count; ++b) {
            const int64_t start = tables[after * width + b] * block_size * kv_heads * dim;
            ahead.blocks.push_back(reinterpret_cast<const char*>(kc + start));
            ahead.blocks.push_back(reinterpret_cast<const char*>(vc + start));
          }
          const int64_t lines = 2 * count * ahead.bytes / 64, steps = kv_heads * lq * (lk + lk / 4 * group) + 1;
          ahead.per_step = (lines + steps - 1) / steps;
        }
      }
#endif
      const int64_t* table = tables + r * width;
      scores.resize(group * lk);
      offs.resize(lk);
      if constexpr (int8) {
        k_scales.resize(lk);
        v_scales.resize(lk);
      }
      for (int64_t b = 0, p = 0; p < lk; ++b)
        for (int64_t o = 0; o < block_size && p < lk; ++o, ++p) {
          const int64_t row = (table[b] * block_size + o) * kv_heads + g;
          offs[p] = row * dim;
          if constexpr (int8) {
            k_scales[p] = ksc[row];
            v_scales[p] = vsc[row];
          }
        }
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t pos = lk - lq + i;  // this query's position: it sees keys first..pos
        const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, bf16>) {
          if (dim % 32 == 0) {
            attend_bf16(q + (q0 + i) * qs + g * group * dim, group, dim, kc, vc, offs.data(), first, pos,
                        g == 0 ? kv_heads * dim : 0, scale,
                        scores.data(), lk, acc.data(), out + ((q0 + i) * heads + g * group) * dim, ahead);
            continue;
          }
        }
#endif
        for (int64_t h = 0; h < group; ++h) {
          const T* qp = q + (q0 + i) * qs + (g * group + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) qf[h * dim + d] = to_f(qp[d]) * scale;
        }
        T* op = out + ((q0 + i) * heads + g * group) * dim;
#if defined(__AVX2__) && defined(__FMA__)
        if (attend_f32(qf.data(), group, dim, kc, vc, int8 ? k_scales.data() : nullptr,
                       int8 ? v_scales.data() : nullptr, offs.data(), first, pos, g == 0 ? kv_heads * dim : 0,
                       scores.data(), lk, acc.data(), ahead)) {
#pragma omp simd
          for (int64_t d = 0; d < group * dim; ++d) op[d] = from_f<T>(acc[d]);
          continue;
        }
#endif
        for (int64_t p = first; p <= pos; ++p) {
          const C* kp = kc + offs[p];
          for (int64_t h = 0; h < group; ++h) {
            const float* qh = qf.data() + h * dim;
            float s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qh[d] * to_f(kp[d]);
            if constexpr (int8) s *= k_scales[p];
            scores[h * lk + p] = s;
          }
        }
        for (int64_t h = 0; h < group; ++h) {
          float* sh = scores.data() + h * lk;
          float mx = -INFINITY, sum = 0;
          for (int64_t p = first; p <= pos; ++p) mx = std::max(mx, sh[p]);
#pragma omp simd reduction(+ : sum)
          for (int64_t p = first; p <= pos; ++p) sum += (sh[p] = std::exp(sh[p] - mx));
          const float inv = 1.f / sum;
#pragma omp simd
          for (int64_t p = first; p <= pos; ++p) sh[p] *= inv;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = first; p <= pos; ++p) {
          const C* vp = vc + offs[p];
          for (int64_t h = 0; h < group; ++h) {
            float w = scores[h * lk + p];
            if constexpr (int8) w *= v_scales[p];
            float* ah = acc.data() + h * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ah[d] += w * to_f(vp[d]);
          }
        }
#pragma omp simd
        for (int64_t d = 0; d < group * dim; ++d) op[d] = from_f<T>(acc[d]);
      }
    }
  });
}
}  // namespace

void paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cu_q,
                     at::Tensor seqlens_k, at::Tensor block_tables, at::Tensor seqs, double scale,
                     int64_t window, at::Tensor out, OptTensor k_scale,
                     OptTensor v_scale) {
  check(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous() &&
              out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "paged_attention: q must be [T, heads, dim] with dense rows, out contiguous in q's dtype");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK((int8 || k_cache.scalar_type() == q.scalar_type()) && v_cache.scalar_type() == k_cache.scalar_type() &&
              k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_attention: caches must be contiguous, in q's dtype or int8");
  if (int8)
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->is_contiguous() && v_scale->is_contiguous() &&
                k_scale->numel() * q.size(2) == k_cache.numel() && v_scale->numel() * q.size(2) == v_cache.numel(),
                "paged_attention: an int8 cache needs float32 scales [blocks, block_size, kv_heads] for both caches");
  auto cu = cu_q.to(at::kLong).contiguous(), lk = seqlens_k.to(at::kLong).contiguous();
  auto bt = block_tables.to(at::kLong).contiguous(), sq = seqs.to(at::kLong).contiguous();
  dispatch(q, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = [&](auto cache_tag, const float* ksc, const float* vsc) {
      using cache_t = decltype(cache_tag);
      paged_attention_impl<scalar_t, cache_t>(
          ptr<scalar_t>(q), ptr<cache_t>(k_cache), ptr<cache_t>(v_cache), ksc, vsc, cu.data_ptr<int64_t>(),
          lk.data_ptr<int64_t>(), bt.data_ptr<int64_t>(), sq.data_ptr<int64_t>(), sq.numel(), bt.size(1), q.size(1),
          k_cache.size(2), q.size(2), k_cache.size(1), static_cast<float>(scale), window, q.stride(0),
          ptr<scalar_t>(out));
    };
    if (int8)
      run(int8_t{}, ptr<float>(*k_scale), ptr<float>(*v_scale));
    else
      run(scalar_t{}, nullptr, nullptr);
  });
}

}  // namespace lmforge
