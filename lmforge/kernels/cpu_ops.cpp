// lmforge's CPU kernels. For inference, each replaces a chain of small eager ops whose dispatch cost dominates
// decode on a CPU: every kernel takes float32 or bfloat16, computes in float32 and rounds where the eager PyTorch
// code it replaces rounds, so results match the pure-torch path (lmforge/layers) to the last bit or within one
// bfloat16 rounding. For training (the autograd Functions of lmforge/layers/train_kernels.py and the fused loss),
// forward and backward passes of element-wise chains, attention's backward on AMX tiles and the loss's softmax.
// Compiled at first use by lmforge/kernels/__init__.py; hot path — keep minimal.

// Not <torch/extension.h>: it parses for 45 s of a build's ~65; these are what the kernels use (half that).
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace {

using bf16 = uint16_t;  // a bfloat16's bits: a plain integer type, so loops over it vectorize

template <typename T> inline T* ptr(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// Conversions written as bit operations so that the compiler vectorizes the loops that use them.
inline float to_f(float x) { return x; }
inline float to_f(int8_t x) { return x; }  // an int8 KV cache's rows, before their scale
inline float to_f(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T> inline T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline bf16 from_f<bf16>(float x) {  // round to nearest even, NaN kept NaN: what torch does
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}
// The value a float takes once stored in T: what an eager op's rounded intermediate holds.
template <typename T> inline float round_to(float x) { return to_f(from_f<T>(x)); }


#if defined(__AVX512BF16__)
inline __m512 load_f32x16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_f32x16_bits(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

// Rounds 16 floats to bfloat16 precision (nearest even), kept as floats: an eager op's rounded intermediate.
inline __m512 round_bf16x16(__m512 x) {
  return load_f32x16_bits(_mm512_cvtneps_pbh(x));
}

// exp as 2^n * 2^f (|f| <= 1/2, Taylor series of 2^f to degree 6: relative error < 2e-7), 16 lanes.
inline __m512 exp_f32x16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

#endif

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

// Calls f with a value of the tensor's scalar type (the generic lambda reads it as decltype).
template <typename F>
void dispatch(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(bf16{});
  } else {
    f(float{});
  }
}

// ---- linear for a few rows: y[m, n] = x[m, :] . w[n, :] (+ b[n]); the weight matrix is streamed once -------------
// Decode is memory-bound: each weight row is read once for all (at most 8) input rows, accumulating in float32.
template <typename T>
void linear_small_impl(const T* x, const T* w, const T* b, T* y, int64_t m, int64_t n, int64_t k) {
  std::vector<float> xf(m * k);
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f(x[i]);
  const float* xs = xf.data();
  at::parallel_for(0, n, 16, [=](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const T* row = w + j * k;
      for (int64_t r = 0; r < m; ++r) {
        const float* xr = xs + r * k;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t i = 0; i < k; ++i) a += to_f(row[i]) * xr[i];
        y[r * n + j] = from_f<T>(a + (b ? to_f(b[j]) : 0.f));
      }
    }
  });
}

#if defined(__AVX512BF16__)
// bfloat16 x bfloat16 products are exact in float32, so the dot-product instruction changes only the summation order.
// M (the row count) is a template parameter so that the accumulators stay in registers.
constexpr int64_t PREFETCH_ROWS = 64;

template <int M>
void linear_rows_bf16(const bf16* x, const bf16* w, const bf16* b, bf16* y, int64_t n, int64_t k) {
  const int64_t full = k / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (k - full)) - 1);
  at::parallel_for(0, n, 16, [=](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const bf16* row = w + j * k;
      if (j + PREFETCH_ROWS < hi)  // more reads in flight than the hardware prefetcher keeps (benchmarks/cpu_kernels.py)
        for (int64_t i = 0; i < k; i += 32)
          _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_ROWS * k + i), _MM_HINT_T1);
      __m512 acc[M];
      for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + i);
        for (int r = 0; r < M; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(x + r * k + i));
      }
      if (tail) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, row + full);
        for (int r = 0; r < M; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * k + full));
      }
      for (int r = 0; r < M; ++r) y[r * n + j] = from_f<bf16>(_mm512_reduce_add_ps(acc[r]) + (b ? to_f(b[j]) : 0.f));
    }
  });
}

template <>
void linear_small_impl<bf16>(const bf16* x, const bf16* w, const bf16* b, bf16* y, int64_t m, int64_t n, int64_t k) {
  switch (m) {
    case 1: return linear_rows_bf16<1>(x, w, b, y, n, k);
    case 2: return linear_rows_bf16<2>(x, w, b, y, n, k);
    case 3: return linear_rows_bf16<3>(x, w, b, y, n, k);
    case 4: return linear_rows_bf16<4>(x, w, b, y, n, k);
    case 5: return linear_rows_bf16<5>(x, w, b, y, n, k);
    case 6: return linear_rows_bf16<6>(x, w, b, y, n, k);
    case 7: return linear_rows_bf16<7>(x, w, b, y, n, k);
    default: return linear_rows_bf16<8>(x, w, b, y, n, k);
  }
}
#endif

// Each kernel that returns a new tensor has an `_into` twin writing into a given one, which the step graphs replay.
void linear_small_into(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, at::Tensor y) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= 8 && x.is_contiguous(), "linear_small: x must be [<=8, in], contiguous");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "linear_small: w must be [out, in], contiguous, x's dtype");
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* b = bias ? ptr<scalar_t>(bias->contiguous()) : nullptr;
    linear_small_impl<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(w), b, ptr<scalar_t>(y),
                                x.size(0), w.size(0), x.size(1));
  });
}

at::Tensor linear_small(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_small_into(x, w, bias, y);
  return y;
}

// ATen's own product (oneDNN / MKL), called from here so that step graphs record and replay it: the row counts and
// dtypes no kernel above serves (float32 batches, bf16 beyond the GEMMs' reach). Rounds exactly as F.linear does:
// at::linear of a 2-d input is addmm with a bias and mm without.
void linear_into(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, at::Tensor y) {
  if (bias) {
    at::addmm_out(y, *bias, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
}

at::Tensor linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1), "linear: x must be [m, in], w [out, in]");
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_into(x, w, bias, y);
  return y;
}

// ---- float32 linear on AVX2 + FMA: y[m, n] = x[m, :] . w[n, :] (+ b[n]), on the weight as it is ([out, in]) --------
// Each output is a dot product along k in 8 lanes and one horizontal sum at the end. A tile of R rows x C outputs
// keeps R * C accumulators in registers and loads R + C vectors per R * C FMAs (4 x 3: 7 loads per 12 FMAs, all 16
// registers). Every (row, output) pair is summed in the same order whatever the tile, the row count or the thread, so
// results do not depend on the batch: a sequence's tokens are the same alone and batched, which MKL's sgemm does not
// promise. Rows are taken in blocks that stay in L2 while the weight streams past them.
#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t F32_ROW_BLOCK = 64, F32_COLS = 3;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int R, int C>
void f32_tile(const float* x, const float* w, const float* b, float* y, int64_t n, int64_t k, __m256i tail) {
  const int64_t full = k / 8 * 8;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < full; i += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * k + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (full < k) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_maskload_ps(w + c * k + full, tail);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * k + full, tail);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * n + c] = hsum8(acc[r][c]) + (b ? b[c] : 0.f);
}

template <int R>
void f32_tile_cols(int cols, const float* x, const float* w, const float* b, float* y, int64_t n, int64_t k,
                   __m256i tail) {
  switch (cols) {
    case 3: return f32_tile<R, 3>(x, w, b, y, n, k, tail);
    case 2: return f32_tile<R, 2>(x, w, b, y, n, k, tail);
    default: return f32_tile<R, 1>(x, w, b, y, n, k, tail);
  }
}

void linear_f32_into(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, at::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "linear_f32: x must be float32 "
              "[m, in], contiguous");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "linear_f32: w must be float32 [out, in], contiguous");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  const float* xs = ptr<float>(x);
  const float* ws = ptr<float>(w);
  auto bc = bias ? bias->contiguous() : at::Tensor();
  const float* bs = bias ? ptr<float>(bc) : nullptr;
  float* ys = ptr<float>(y);
  alignas(32) int32_t lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = i < k % 8 ? -1 : 0;
  const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  const int64_t groups = (n + F32_COLS - 1) / F32_COLS;
  for (int64_t r0 = 0; r0 < m; r0 += F32_ROW_BLOCK) {
    const int64_t rows = std::min(F32_ROW_BLOCK, m - r0);
    at::parallel_for(0, groups, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t n0 = g * F32_COLS;
        const int cols = static_cast<int>(std::min(F32_COLS, n - n0));
        const float* wg = ws + n0 * k;
        const float* bg = bs ? bs + n0 : nullptr;
        int64_t r = r0;
        for (; r + 4 <= r0 + rows; r += 4) f32_tile_cols<4>(cols, xs + r * k, wg, bg, ys + r * n + n0, n, k, tail);
        switch (r0 + rows - r) {
          case 3: f32_tile_cols<3>(cols, xs + r * k, wg, bg, ys + r * n + n0, n, k, tail); break;
          case 2: f32_tile_cols<2>(cols, xs + r * k, wg, bg, ys + r * n + n0, n, k, tail); break;
          case 1: f32_tile_cols<1>(cols, xs + r * k, wg, bg, ys + r * n + n0, n, k, tail); break;
          default: break;
        }
      }
    });
  }
}
#else
void linear_f32_into(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, at::Tensor y) {
  linear_into(x, w, bias, y);  // built without AVX2 and FMA: ATen's product
}
#endif

bool linear_f32_available() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

at::Tensor linear_f32(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_f32_into(x, w, bias, y);
  return y;
}

// ---- bf16 GEMM on AVX512-BF16 dot products for decode-sized batches (CPUs without AMX) ----------------------------
// y[M, N] = x[M, K] . w[N, K]^T (+ b). oneDNN reaches about 70 % of the dot-product peak at 64 rows, and less with
// the weights in DRAM. Here w is packed (vnni_pack) in panels of 48 outputs: for each k pair, three vectors of 16
// outputs x 2 k values, so a tile of 8 rows keeps 24 float32 accumulators in registers and needs 3 weight loads and
// 8 broadcasts per 24 dot products. While a thread works on one panel it prefetches its next, which the hardware
// prefetcher would not reach before the panel's last rows. Needs N % 16 == 0 and K % 2 == 0.
#if defined(__AVX512BF16__)
constexpr int64_t PANEL = 48, ROW_BLOCK = 128;

at::Tensor vnni_pack(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 16 == 0 && w.size(1) % 2 == 0,
              "vnni_pack: w must be bf16 [N, K] with N a multiple of 16 and K even");
  auto wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1);
  auto out = at::empty({n, k}, wc.options());  // w's shape, the panels' order
  const bf16* src = ptr<bf16>(wc);
  bf16* dst = ptr<bf16>(out);
  at::parallel_for(0, (n + PANEL - 1) / PANEL, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t n0 = p * PANEL, vecs = std::min(PANEL, n - n0) / 16;
      bf16* d = dst + n0 * k;
      for (int64_t q = 0; q < k / 2; ++q)
        for (int64_t v = 0; v < vecs; ++v)
          for (int64_t o = 0; o < 16; ++o)
            for (int64_t i = 0; i < 2; ++i) d[((q * vecs + v) * 16 + o) * 2 + i] = src[(n0 + 16 * v + o) * k + 2 * q + i];
    }
  });
  return out;
}

// Rows x (16 C) outputs of one panel; issues `per` prefetches of the next panel per k pair until it is covered.
template <int R, int C>
void vnni_tile(const bf16* x, int64_t k, const bf16* w, const bf16* b, bf16* y, int64_t n, const char*& pf,
               const char* pf_end, int64_t per) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);  // x's k pairs, one broadcast each
  for (int64_t q = 0; q < k / 2; ++q) {
    for (int64_t i = 0; i < per && pf < pf_end; ++i, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + (q * C + c) * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pairs[r * (k / 2) + q]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xb, wv[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const __m512 bv = b ? load_f32x16(b + 16 * c) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][c], bv)));
  }
}

template <int C>
void vnni_panel(const bf16* x, int64_t m, int64_t k, const bf16* w, const bf16* b, bf16* y, int64_t n,
                const char* pf, const char* pf_end) {
  constexpr int R = 8;
  const int64_t steps = (m + R - 1) / R * (k / 2);
  const int64_t per = ((pf_end - pf) / 64 + steps - 1) / steps;
  int64_t r0 = 0;
  for (; r0 + R <= m; r0 += R) vnni_tile<R, C>(x + r0 * k, k, w, b, y + r0 * n, n, pf, pf_end, per);
  x += r0 * k;
  y += r0 * n;
  switch (m - r0) {
    case 1: return vnni_tile<1, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 2: return vnni_tile<2, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 3: return vnni_tile<3, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 4: return vnni_tile<4, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 5: return vnni_tile<5, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 6: return vnni_tile<6, C>(x, k, w, b, y, n, pf, pf_end, per);
    case 7: return vnni_tile<7, C>(x, k, w, b, y, n, pf, pf_end, per);
    default: return;
  }
}

void vnni_linear_into(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, at::Tensor y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(1) % 2 == 0 &&
              packed.dim() == 2 && packed.size(1) == x.size(1) && packed.size(0) % 16 == 0,
              "vnni_linear: x must be contiguous bf16 [M, K] and packed a vnni_pack of a [N, K] weight");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  auto bc = bias ? bias->contiguous() : at::Tensor();
  const bf16* xs = ptr<bf16>(x);
  const bf16* ws = ptr<bf16>(packed);
  const bf16* bs = bias ? ptr<bf16>(bc) : nullptr;
  bf16* ys = ptr<bf16>(y);
  for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {  // a block of rows stays in L2 while the panels stream past it
    const int64_t rows = std::min(ROW_BLOCK, m - r0);
    at::parallel_for(0, (n + PANEL - 1) / PANEL, 1, [=](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t n0 = p * PANEL, n1 = std::min(n, n0 + PANEL);
        const char* next = reinterpret_cast<const char*>(ws + n1 * k);
        const char* next_end = p + 1 < hi ? reinterpret_cast<const char*>(ws + std::min(n, n1 + PANEL) * k) : next;
        const bf16* b = bs ? bs + n0 : nullptr;
        const bf16* xr = xs + r0 * k;
        bf16* yr = ys + r0 * n + n0;
        switch ((n1 - n0) / 16) {
          case 3: vnni_panel<3>(xr, rows, k, ws + n0 * k, b, yr, n, next, next_end); break;
          case 2: vnni_panel<2>(xr, rows, k, ws + n0 * k, b, yr, n, next, next_end); break;
          default: vnni_panel<1>(xr, rows, k, ws + n0 * k, b, yr, n, next, next_end);
        }
      }
    });
  }
}

at::Tensor vnni_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  auto y = at::empty({x.size(0), packed.size(0)}, x.options());
  vnni_linear_into(x, packed, bias, y);
  return y;
}
#else
at::Tensor vnni_pack(at::Tensor) { TORCH_CHECK(false, "vnni_pack: built without AVX512-BF16"); }
at::Tensor vnni_linear(at::Tensor, at::Tensor, c10::optional<at::Tensor>) {
  TORCH_CHECK(false, "vnni_linear: built without AVX512-BF16");
}
void vnni_linear_into(at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor) {
  TORCH_CHECK(false, "vnni_linear: built without AVX512-BF16");
}
#endif

bool vnni_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// ---- bf16 GEMM on AMX tiles for decode-sized batches: y[M, N] = x[M, K] . w[N, K]^T (+ b) -------------------------
// At decode sizes (M <= 64) oneDNN streams the weights at well below the memory bandwidth; this kernel walks a copy
// of w packed tile by tile (amx_pack) in one sequential pass. Needs K % 32 == 0 and N % 32 == 0.
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
bool amx_available() {
  static const bool ok = [] {  // Linux hands out the AMX register state only on request
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// w [N, K] -> [N/16][K/32][16][32]: tile (n, k) row r holds k pair (2r, 2r+1) of its 16 outputs, interleaved (VNNI).
at::Tensor amx_pack(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 32 == 0 && w.size(1) % 32 == 0,
              "amx_pack: w must be bf16 [N, K] with N and K multiples of 32");
  auto wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1);
  auto out = at::empty({n / 16, k / 32, 16, 32}, wc.options());
  const bf16* src = ptr<bf16>(wc);
  bf16* dst = ptr<bf16>(out);
  at::parallel_for(0, n / 16, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t nb = lo; nb < hi; ++nb)
      for (int64_t kb = 0; kb < k / 32; ++kb)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t i = 0; i < 2; ++i)
              dst[((nb * (k / 32) + kb) * 16 + r) * 32 + 2 * c + i] = src[(nb * 16 + c) * k + kb * 32 + 2 * r + i];
  });
  return out;
}

void amx_linear_into(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias, at::Tensor y) {
  TORCH_CHECK(amx_available(), "amx_linear: AMX is not available");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
              packed.size(1) * 32 == x.size(1) && packed.size(0) % 2 == 0, "amx_linear: shapes do not match");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0) * 16, kb_count = k / 32;
  const int64_t mp = (m + 31) / 32 * 32;  // whole pairs of 16-row tiles; padding rows are zeros
  auto xp = at::zeros({mp, k}, x.options());
  xp.narrow(0, 0, m).copy_(x);
  auto b = bias ? bias->contiguous() : at::Tensor();
  const bf16* xs = ptr<bf16>(xp);
  const bf16* ws = ptr<bf16>(packed);
  const bf16* bs = bias ? ptr<bf16>(b) : nullptr;
  bf16* ys = ptr<bf16>(y);
  at::parallel_for(0, n / 32, 1, [=](int64_t lo, int64_t hi) {
    TileConfig cfg;  // 8 tiles of 16 rows x 64 bytes: C 0-3 (fp32), A 4-5 and B 6-7 (bf16)
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    alignas(64) float buf[32 * 32];
    for (int64_t j = lo; j < hi; ++j) {  // 32 outputs at a time
      const bf16* w0 = ws + (2 * j) * kb_count * 512;
      const bf16* w1 = w0 + kb_count * 512;
      for (int64_t m0 = 0; m0 < mp; m0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kb_count; ++kb) {
          _tile_loadd(4, xs + m0 * k + kb * 32, k * 2);
          _tile_loadd(5, xs + (m0 + 16) * k + kb * 32, k * 2);
          _tile_loadd(6, w0 + kb * 512, 64);
          _tile_loadd(7, w1 + kb * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, buf, 128);
        _tile_stored(1, buf + 16, 128);
        _tile_stored(2, buf + 16 * 32, 128);
        _tile_stored(3, buf + 16 * 32 + 16, 128);
        const __m512 b0 = bs ? load_f32x16(bs + j * 32) : _mm512_setzero_ps();
        const __m512 b1 = bs ? load_f32x16(bs + j * 32 + 16) : _mm512_setzero_ps();
        for (int64_t r = 0; r < 32 && m0 + r < m; ++r) {
          bf16* yr = ys + (m0 + r) * n + j * 32;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(buf + r * 32), b0)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(buf + r * 32 + 16), b1)));
        }
      }
    }
    _tile_release();
  });
}

at::Tensor amx_linear(at::Tensor x, at::Tensor packed, c10::optional<at::Tensor> bias) {
  auto y = at::empty({x.size(0), packed.size(0) * 16}, x.options());
  amx_linear_into(x, packed, bias, y);
  return y;
}
#else
bool amx_available() { return false; }
at::Tensor amx_pack(at::Tensor) { TORCH_CHECK(false, "amx_pack: built without AMX"); }
at::Tensor amx_linear(at::Tensor, at::Tensor, c10::optional<at::Tensor>) {
  TORCH_CHECK(false, "amx_linear: built without AMX");
}
void amx_linear_into(at::Tensor, at::Tensor, c10::optional<at::Tensor>, at::Tensor) {
  TORCH_CHECK(false, "amx_linear: built without AMX");
}
#endif

// ---- RMSNorm as Hugging Face computes it: in float32, rounded to the input dtype, then times the weight ----------
// x in TX, w and y in TO (training: float32 residual stream, bf16 output under autocast); inv, when given, gets
// each row's 1 / rms for the backward pass.
template <typename TX, typename TO>
void rms_norm_impl(const TX* x, const TO* w, TO* y, float* inv, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, 8, [=](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const TX* xr = x + r * dim;
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < dim; ++i) ss += to_f(xr[i]) * to_f(xr[i]);
      const float k = 1.f / std::sqrt(ss / dim + eps);
      if (inv) inv[r] = k;
      TO* yr = y + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) yr[i] = from_f<TO>(to_f(w[i]) * round_to<TO>(to_f(xr[i]) * k));
    }
  });
}

void rms_norm_into(at::Tensor x, at::Tensor weight, double eps, at::Tensor y) {
  check(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1), "rms_norm: weight mismatch");
  TORCH_CHECK(y.is_contiguous() && y.numel() == x.numel(), "rms_norm: out must be contiguous, x's size");
  auto xc = x.contiguous();
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_impl<scalar_t, scalar_t>(ptr<scalar_t>(xc), ptr<scalar_t>(weight.contiguous()), ptr<scalar_t>(y),
                                      nullptr, xc.numel() / x.size(-1), x.size(-1), static_cast<float>(eps));
  });
}

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  auto y = at::empty(x.sizes(), x.options());
  rms_norm_into(x, weight, eps, y);
  return y;
}

// ---- rotary embedding in place, half-split layout: x = x * cos + rotate_half(x) * sin on the first rot dims ------
at::Tensor rope_(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_: x must be [T, heads, dim] "
              "with contiguous heads");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(0) == x.size(0), "rope_: cos/sin must be [T, rot] contiguous in x's dtype");
  const int64_t t = x.size(0), heads = x.size(1), dim = x.size(2), rot = cos.size(1), half = rot / 2;
  const int64_t ts = x.stride(0);
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = ptr<scalar_t>(x);
    const scalar_t* cp = ptr<scalar_t>(cos);
    const scalar_t* sp = ptr<scalar_t>(sin);
    at::parallel_for(0, t, 16, [=](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* c = cp + i * rot;
        const scalar_t* s = sp + i * rot;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* v = xp + i * ts + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < half; ++d) {
            float x1 = to_f(v[d]), x2 = to_f(v[d + half]);
            // eager: x_rot * cos + cat(-x2, x1) * sin, each product rounded to the dtype before the sum
            float lo_ = round_to<scalar_t>(x1 * to_f(c[d])) + round_to<scalar_t>(-x2 * to_f(s[d]));
            float hi_ = round_to<scalar_t>(x2 * to_f(c[d + half])) + round_to<scalar_t>(x1 * to_f(s[d + half]));
            v[d] = from_f<scalar_t>(lo_);
            v[d + half] = from_f<scalar_t>(hi_);
          }
        }
      }
    });
  });
  return x;
}

// ---- new keys and values into their paged-cache slots -----------------------------------------------------------
// k/v [T, KVH, D] may be row-strided views (slices of a fused q/k/v product): each token's row is dense.
// An int8 cache (k_scale/v_scale given, float32 [blocks, block_size, KVH]) stores each row quantised as
// lmforge/layers/kv_quant.py does: scale = absmax / 127, round(x / scale) to nearest even.
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

void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots,
              c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale) {
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

// ---- silu(gate) * up, the SwiGLU activation, rounding silu to the dtype before the product as eager does ----------
// gate and up may be row-strided views (the two halves of a fused gate/up product).
template <typename T>
void silu_mul_rows(const T* g, const T* u, T* y, int64_t rows, int64_t n, int64_t gs, int64_t us) {
  at::parallel_for(0, rows, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* gr = g + r * gs;
      const T* ur = u + r * us;
      T* yr = y + r * n;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, bf16>) {
        for (; i + 16 <= n; i += 16) {
          const __m512 a = load_f32x16(gr + i);
          const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp_f32x16(_mm512_sub_ps(_mm512_setzero_ps(), a)));
          __m512 r = _mm512_rcp14_ps(d);  // 1/d to 14 bits, then one Newton step: cheaper than a division
          r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
          const __m512 silu = _mm512_mul_ps(a, r);
          const __m512 prod = _mm512_mul_ps(round_bf16x16(silu), load_f32x16(ur + i));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i), (__m256i)_mm512_cvtneps_pbh(prod));
        }
      }
#endif
      for (; i < n; ++i) {
        const float a = to_f(gr[i]);
        yr[i] = from_f<T>(round_to<T>(a / (1.f + std::exp(-a))) * to_f(ur[i]));
      }
    }
  });
}

void silu_mul_into(at::Tensor gate, at::Tensor up, at::Tensor y) {
  check(gate, "gate");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type() &&
              gate.stride(1) == 1 && up.stride(1) == 1, "silu_mul: gate and up must be [T, n] with unit inner stride");
  dispatch(gate, [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_rows<scalar_t>(ptr<scalar_t>(gate), ptr<scalar_t>(up), ptr<scalar_t>(y), gate.size(0), gate.size(1),
                            gate.stride(0), up.stride(0));
  });
}

at::Tensor silu_mul(at::Tensor gate, at::Tensor up) {
  auto y = at::empty(gate.sizes(), gate.options());
  silu_mul_into(gate, up, y);
  return y;
}

// ---- training: RMSNorm, rotary embedding and SwiGLU with their backward passes -----------------------------------
// Each replaces the chain of eager ops that autograd would record (and the tensors it would keep) by one sweep forward
// and one backward; float32 inside, one rounding per output. Inputs and outputs may differ in dtype (float32 weights
// and residual stream under bf16 autocast): dispatch2 instantiates each pair.
template <typename F>
void dispatch2(const at::Tensor& a, at::ScalarType b, F&& f) {
  dispatch(a, [&](auto ta) {
    if (b == at::kBFloat16) f(ta, bf16{}); else f(ta, float{});
  });
}

// y = w * round(x / rms(x)) in y's dtype (w already in it), as eager RMSNorm under autocast; also returns 1/rms per row.
std::vector<at::Tensor> rms_norm_train(at::Tensor x, at::Tensor w, double eps) {
  check(x, "x");
  check(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.numel() == x.size(1) && w.is_contiguous(),
              "rms_norm_train: x must be [rows, dim] contiguous, w [dim]");
  const int64_t rows = x.size(0), dim = x.size(1);
  auto y = at::empty({rows, dim}, x.options().dtype(w.scalar_type()));
  auto inv = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch2(x, w.scalar_type(), [&](auto tx, auto to) {
    using TX = decltype(tx);
    using TO = decltype(to);
    rms_norm_impl<TX, TO>(ptr<TX>(x), ptr<TO>(w), ptr<TO>(y), inv.data_ptr<float>(), rows, dim, static_cast<float>(eps));
  });
  return {y, inv};
}

// dx = inv (g - xh mean(g xh)) with g = dy w and xh = x inv; dw = sum over rows of dy round(xh) (float32; empty
// unless asked for).
std::vector<at::Tensor> rms_norm_train_backward(at::Tensor dy, at::Tensor x, at::Tensor w,
                                                   at::Tensor inv, bool want_dw) {
  check(dy, "dy");
  check(x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && x.is_contiguous() && dy.dim() == 2 &&
              w.scalar_type() == dy.scalar_type(), "rms_norm_train_backward: shapes or dtypes do not match");
  const int64_t rows = x.size(0), dim = x.size(1);
  auto dx = at::empty_like(x);
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({want_dw ? threads : 0, dim}, x.options().dtype(at::kFloat));
  dispatch2(x, dy.scalar_type(), [&](auto tx, auto to) {
    using TX = decltype(tx);
    using TO = decltype(to);
    const TX* xs = ptr<TX>(x);
    const TO* gs = ptr<TO>(dy);
    const TO* ws = ptr<TO>(w);
    const float* is = inv.data_ptr<float>();
    TX* dxs = ptr<TX>(dx);
    float* parts = want_dw ? partial.data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, 16, [=](int64_t lo, int64_t hi) {
      float* dw = parts ? parts + at::get_thread_num() * dim : nullptr;
      for (int64_t r = lo; r < hi; ++r) {
        const TX* xr = xs + r * dim;
        const TO* gr = gs + r * dim;
        const float k = is[r];
        float dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < dim; ++i) dot += to_f(gr[i]) * to_f(ws[i]) * to_f(xr[i]) * k;
        dot /= dim;
        TX* out = dxs + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) {
          const float xh = to_f(xr[i]) * k;
          out[i] = from_f<TX>(k * (to_f(gr[i]) * to_f(ws[i]) - xh * dot));
        }
        if (dw)
#pragma omp simd
          for (int64_t i = 0; i < dim; ++i) dw[i] += to_f(gr[i]) * round_to<TO>(to_f(xr[i]) * k);
      }
    });
  });
  return {dx, want_dw ? partial.sum(0) : partial};
}

// Rotary embedding out of place, half-split layout, float32 cos/sin [T, rot]: y = x cos + rotate_half(x) sin on the
// first rot dims (the rest copied), in out_dtype. inverse: the transposed rotation, which is the backward pass.
at::Tensor rope_train(at::Tensor x, at::Tensor cos, at::Tensor sin, bool inverse, at::ScalarType out_dtype) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) <= x.size(2),
              "rope_train: x must be [T, heads, dim] (last dimension contiguous), cos/sin float32 [T, rot]");
  const int64_t t = x.size(0), heads = x.size(1), dim = x.size(2), rot = cos.size(1), half = rot / 2;
  auto y = at::empty({t, heads, dim}, x.options().dtype(out_dtype));
  dispatch2(x, out_dtype, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    const TI* xs = ptr<TI>(x);
    TO* ys = ptr<TO>(y);
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    const float sign = inverse ? -1.f : 1.f;
    at::parallel_for(0, t, 16, [=](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* c = cp + i * rot;
        // forward: (x1 c - x2 s, x2 c' + x1 s'); inverse: (x1 c + x2 s', x2 c' - x1 s), c' s' of the upper half
        const float* s_lo = sp + i * rot + (inverse ? half : 0);
        const float* s_hi = sp + i * rot + (inverse ? 0 : half);
        for (int64_t h = 0; h < heads; ++h) {
          const TI* v = xs + i * ts + h * hs;
          TO* o = ys + (i * heads + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < half; ++d) {
            const float x1 = to_f(v[d]), x2 = to_f(v[d + half]);
            o[d] = from_f<TO>(x1 * c[d] - sign * x2 * s_lo[d]);
            o[d + half] = from_f<TO>(x2 * c[d + half] + sign * x1 * s_hi[d]);
          }
          for (int64_t d = rot; d < dim; ++d) o[d] = from_f<TO>(to_f(v[d]));
        }
      }
    });
  });
  return y;
}

// d/d(gate, up) of silu(gate) * up: dup = dy round(silu(gate)); dgate = round(dy up) sigmoid (1 + gate (1 - sigmoid)),
// rounded where eager autograd rounds.
std::vector<at::Tensor> silu_mul_backward(at::Tensor gate, at::Tensor up, at::Tensor dy) {
  check(gate, "gate");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && dy.sizes() == gate.sizes() &&
              up.scalar_type() == gate.scalar_type() && dy.scalar_type() == gate.scalar_type() &&
              gate.stride(1) == 1 && up.stride(1) == 1 && dy.stride(1) == 1,
              "silu_mul_backward: gate, up, dy must be [T, n] of one dtype with unit inner stride");
  const int64_t rows = gate.size(0), n = gate.size(1);
  auto dgate = at::empty({rows, n}, gate.options());
  auto dup = at::empty({rows, n}, gate.options());
  dispatch(gate, [&](auto tag) {
    using T = decltype(tag);
    const T* g = ptr<T>(gate);
    const T* u = ptr<T>(up);
    const T* d = ptr<T>(dy);
    T* dg = ptr<T>(dgate);
    T* du = ptr<T>(dup);
    const int64_t gs = gate.stride(0), us = up.stride(0), ds = dy.stride(0);
    at::parallel_for(0, rows, 1, [=](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* gr = g + r * gs;
        const T* ur = u + r * us;
        const T* dr = d + r * ds;
        T* dgr = dg + r * n;
        T* dur = du + r * n;
        int64_t i = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, bf16>) {
          const __m512 one = _mm512_set1_ps(1.f);
          for (; i + 16 <= n; i += 16) {
            const __m512 a = load_f32x16(gr + i), dyv = load_f32x16(dr + i);
            const __m512 den = _mm512_add_ps(one, exp_f32x16(_mm512_sub_ps(_mm512_setzero_ps(), a)));
            __m512 sig = _mm512_rcp14_ps(den);
            sig = _mm512_mul_ps(sig, _mm512_fnmadd_ps(den, sig, _mm512_set1_ps(2.f)));
            const __m512 silu = round_bf16x16(_mm512_mul_ps(a, sig));
            const __m512 dsilu = round_bf16x16(_mm512_mul_ps(dyv, load_f32x16(ur + i)));
            const __m512 grad = _mm512_mul_ps(dsilu, _mm512_mul_ps(sig, _mm512_fmadd_ps(a, _mm512_sub_ps(one, sig), one)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dur + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(dyv, silu)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dgr + i), (__m256i)_mm512_cvtneps_pbh(grad));
          }
        }
#endif
        for (; i < n; ++i) {
          const float a = to_f(gr[i]), dyv = to_f(dr[i]);
          const float sig = 1.f / (1.f + std::exp(-a));
          dur[i] = from_f<T>(dyv * round_to<T>(a * sig));
          dgr[i] = from_f<T>(round_to<T>(dyv * to_f(ur[i])) * sig * (1.f + a * (1.f - sig)));
        }
      }
    });
  });
  return {dgate, dup};
}

// ---- row-wise argmax (the first of equal maxima), for greedy sampling straight from bf16 logits --------------------
template <typename T>
void argmax_impl(const T* x, int64_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * n;
      float best = -INFINITY;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, bf16>) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, load_f32x16(xr + i));
        best = _mm512_reduce_max_ps(mx);
      }
#endif
      for (; i < n; ++i) best = std::max(best, to_f(xr[i]));
      int64_t at = 0;
      while (at < n - 1 && !(to_f(xr[at]) == best)) ++at;  // NaN-free rows always stop at the maximum
      out[r] = at;
    }
  });
}

at::Tensor argmax_rows(at::Tensor x) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "argmax_rows: x must be [rows, n], contiguous");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    argmax_impl<scalar_t>(ptr<scalar_t>(x), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  });
  return out;
}

// ---- causal attention backward on AMX tiles (training): the flash-attention recurrence in 32 x 32 blocks ----------
// q/out/grad [B, L, H, D], k/v [B, L, KVH, D] (any strides, the last dimension contiguous), lse [B, H, L] from the
// forward (torch's CPU flash attention) -> dq, dk, dv. One task per (sequence, kv head) owns its heads' gradients, so
// nothing is shared between threads. Per block: S = Q K^T and dP = dO V^T from the tiles, P = exp(scale S - lse),
// dS = P (dP - rowsum(dO o O)) scale, then dV += P^T dO, dK += dS^T Q, dQ += dS K, accumulated in float32.
// torch's own CPU backward runs these products through non-AMX code: about 6x its forward's time.
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace attn {

constexpr int64_t BLK = 32;

// c[32, 32] (float32, row stride ldc) (+)= a[32, 32 ks] (bf16, row stride lda) . b, whose two 16-column tiles of
// k-step s sit at b + s * 512 and b + bt + s * 512 (amx_pack's tile layout).
template <bool ACCUMULATE>
inline void gemm(const bf16* a, int64_t lda, const bf16* b, int64_t bt, int64_t ks, float* c, int64_t ldc) {
  if constexpr (ACCUMULATE) {
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(1, c + 16, ldc * 4);
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < ks; ++s) {
    _tile_loadd(4, a + s * 32, lda * 2);
    _tile_loadd(5, a + 16 * lda + s * 32, lda * 2);
    _tile_loadd(6, b + s * 512, 64);
    _tile_loadd(7, b + bt + s * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// 16 values of row r0 and 16 of row r1 -> 32 interleaved (r0[0], r1[0], r0[1], ...): one row of a B tile.
inline void interleave16(const bf16* r0, const bf16* r1, bf16* dst) {
  alignas(64) static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)));
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, _mm512_load_si512(order), b));
}

// x [k, n] row-major (row stride ld; k, n multiples of 32) -> the B tiles of x as amx_pack lays out w = x^T [n, k].
void pack_transposed(const bf16* x, int64_t ld, int64_t k, int64_t n, bf16* dst) {
  for (int64_t nb = 0; nb < n / 16; ++nb)
    for (int64_t kb = 0; kb < k / 32; ++kb)
      for (int64_t r = 0; r < 16; ++r) {
        const bf16* row = x + (kb * 32 + 2 * r) * ld + nb * 16;
        interleave16(row, row + ld, dst + ((nb * (k / 32) + kb) * 16 + r) * 32);
      }
}

// w [n, k] row-major (row stride ld; n, k multiples of 32) -> amx_pack's layout: tile row r gathers the 32-bit
// pair (2r, 2r + 1) of 16 rows.
void pack_rows(const bf16* w, int64_t ld, int64_t n, int64_t k, bf16* dst) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(ld * 2)));
  for (int64_t nb = 0; nb < n / 16; ++nb)
    for (int64_t kb = 0; kb < k / 32; ++kb)
      for (int64_t r = 0; r < 16; ++r)
        _mm512_storeu_si512(dst + ((nb * (k / 32) + kb) * 16 + r) * 32,
                            _mm512_i32gather_epi32(offsets, w + nb * 16 * ld + kb * 32 + 2 * r, 1));
}

// rows [len, dim] of one head (row stride `stride`) -> zero-padded contiguous [lp, dim]
void gather_rows(const bf16* src, int64_t stride, int64_t len, int64_t lp, int64_t dim, bf16* dst) {
  for (int64_t t = 0; t < len; ++t) std::memcpy(dst + t * dim, src + t * stride, dim * sizeof(bf16));
  std::memset(dst + len * dim, 0, (lp - len) * dim * sizeof(bf16));
}

// x [lp, dim] -> x^T [dim, lp] (lp a multiple of 16, dim even): each 32-bit gather brings the pair (d, d + 1) of
// 16 rows, whose halves are rows d and d + 1 of the transpose.
void transpose(const bf16* x, int64_t lp, int64_t dim, bf16* xt) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(dim * 2)));
  for (int64_t t = 0; t < lp; t += 16)
    for (int64_t d = 0; d < dim; d += 2) {
      const __m512i pairs = _mm512_i32gather_epi32(rows, x + t * dim + d, 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xt + d * lp + t), _mm512_cvtepi32_epi16(pairs));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xt + (d + 1) * lp + t),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
    }
}

}  // namespace attn

std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                              at::Tensor grad, at::Tensor lse, double scale) {
  using namespace attn;
  TORCH_CHECK(amx_available(), "attention_backward: AMX is not available");
  for (const auto* t : {&q, &k, &v, &out, &grad})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->stride(3) == 1,
                "attention_backward: q, k, v, out, grad must be bf16 [B, L, heads, D], last dimension contiguous");
  const int64_t nb = q.size(0), len = q.size(1), heads = q.size(2), dim = q.size(3), kv_heads = k.size(2);
  TORCH_CHECK(dim % 32 == 0 && heads % kv_heads == 0 && k.size(1) == len && lse.scalar_type() == at::kFloat,
              "attention_backward: shapes do not match");
  const int64_t group = heads / kv_heads, lp = (len + BLK - 1) / BLK * BLK, blocks = lp / BLK;
  auto dq = at::empty({nb, len, heads, dim}, q.options());
  auto dk = at::empty({nb, len, kv_heads, dim}, q.options());
  auto dv = at::empty({nb, len, kv_heads, dim}, q.options());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, nb * kv_heads, 1, [&](int64_t lo, int64_t hi) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    const int64_t n = lp * dim;
    // Everything is computed transposed, keys as rows: S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T come out
    // as the row-major A operands of dV = P^T dO and dK = dS^T Q; dQ^T = K^T dS^T is transposed back at the end.
    std::vector<bf16> kpad(n), vpad(n), kt(n), qpad(group * n), dopad(group * n), q_rows(group * n),
        do_rows(group * n), q_cols(group * n), do_cols(group * n), pt_strip(BLK * lp), dst_strip(BLK * lp);
    std::vector<float> dq_t(group * n), lse_p(group * lp), delta(group * lp);
    std::vector<float> dk_blk(BLK * dim), dv_blk(BLK * dim);
    alignas(64) float st[BLK * BLK], dpt[BLK * BLK];
    alignas(64) bf16 ds_tiles[BLK * BLK];
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      gather_rows(ptr<bf16>(k) + b * k.stride(0) + g * k.stride(2), k.stride(1), len, lp, dim, kpad.data());
      gather_rows(ptr<bf16>(v) + b * v.stride(0) + g * v.stride(2), v.stride(1), len, lp, dim, vpad.data());
      transpose(kpad.data(), lp, dim, kt.data());
      std::fill(dq_t.begin(), dq_t.end(), 0.f);
      for (int64_t j = 0; j < group; ++j) {
        const int64_t h = g * group + j;
        bf16* qh = qpad.data() + j * n;
        bf16* doh = dopad.data() + j * n;
        gather_rows(ptr<bf16>(q) + b * q.stride(0) + h * q.stride(2), q.stride(1), len, lp, dim, qh);
        gather_rows(ptr<bf16>(grad) + b * grad.stride(0) + h * grad.stride(2), grad.stride(1), len, lp, dim, doh);
        pack_rows(qh, dim, lp, dim, q_rows.data() + j * n);           // S^T = K Q^T
        pack_rows(doh, dim, lp, dim, do_rows.data() + j * n);         // dP^T = V dO^T
        pack_transposed(qh, dim, lp, dim, q_cols.data() + j * n);     // dK = dS^T Q
        pack_transposed(doh, dim, lp, dim, do_cols.data() + j * n);   // dV = P^T dO
        const bf16* oh = ptr<bf16>(out) + b * out.stride(0) + h * out.stride(2);
        const float* lh = ptr<float>(lse) + b * lse.stride(0) + h * lse.stride(1);
        for (int64_t t = 0; t < lp; ++t) {  // padded queries: lse 0 and dO = 0, so they give no gradient
          __m512 acc = _mm512_setzero_ps();
          if (t < len)
            for (int64_t d = 0; d < dim; d += 16)
              acc = _mm512_fmadd_ps(load_f32x16(doh + t * dim + d), load_f32x16(oh + t * out.stride(1) + d), acc);
          delta[j * lp + t] = _mm512_reduce_add_ps(acc);
          lse_p[j * lp + t] = t < len ? lh[t * lse.stride(2)] : 0.f;
        }
      }
      const int64_t kstep = dim / 32, bt_d = kstep * 512, bt_l = blocks * 512;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const bf16* kb_rows = kpad.data() + kb * BLK * dim;
        const bf16* vb_rows = vpad.data() + kb * BLK * dim;
        std::fill(dk_blk.begin(), dk_blk.end(), 0.f);
        std::fill(dv_blk.begin(), dv_blk.end(), 0.f);
        for (int64_t j = 0; j < group; ++j) {
          const float* lse_h = lse_p.data() + j * lp;
          const float* delta_h = delta.data() + j * lp;
          for (int64_t qb = kb; qb < blocks; ++qb) {  // P^T and dS^T of this key block: [32 keys, queries kb*32..]
            gemm<false>(kb_rows, dim, q_rows.data() + j * n + 2 * qb * bt_d, bt_d, kstep, st, BLK);
            gemm<false>(vb_rows, dim, do_rows.data() + j * n + 2 * qb * bt_d, bt_d, kstep, dpt, BLK);
            for (int64_t r = 0; r < BLK; ++r) {
              const int64_t ki = kb * BLK + r;
              for (int64_t c = 0; c < BLK; c += 16) {
                const int64_t q0 = qb * BLK + c;
                __m512 pv = exp_f32x16(_mm512_fmsub_ps(_mm512_load_ps(st + r * BLK + c), _mm512_set1_ps(sc),
                                                       _mm512_loadu_ps(lse_h + q0)));
                if (qb == kb)  // the diagonal block: a query attends to keys up to its own position
                  pv = _mm512_maskz_mov_ps(
                      _mm512_cmpge_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0)), lane),
                                              _mm512_set1_epi32(static_cast<int>(ki))), pv);
                const __m512 dp = _mm512_sub_ps(_mm512_load_ps(dpt + r * BLK + c), _mm512_loadu_ps(delta_h + q0));
                const __m512 dsv = _mm512_mul_ps(_mm512_mul_ps(pv, dp), _mm512_set1_ps(sc));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt_strip.data() + r * lp + q0),
                                    (__m256i)_mm512_cvtneps_pbh(pv));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst_strip.data() + r * lp + q0),
                                    (__m256i)_mm512_cvtneps_pbh(dsv));
              }
            }
            pack_transposed(dst_strip.data() + qb * BLK, lp, BLK, BLK, ds_tiles);  // dS^T as B: [keys, queries]
            for (int64_t d0 = 0; d0 < dim; d0 += 32)  // dQ^T[dims, queries] += K^T dS^T
              gemm<true>(kt.data() + d0 * lp + kb * BLK, lp, ds_tiles, 512, 1, dq_t.data() + j * n + d0 * lp + qb * BLK,
                         lp);
          }
          for (int64_t d0 = 0; d0 < dim; d0 += 32) {  // dV += P^T dO, dK += dS^T Q over the whole strip
            const int64_t tiles = 2 * (d0 / 32) * bt_l + kb * 512;
            gemm<true>(pt_strip.data() + kb * BLK, lp, do_cols.data() + j * n + tiles, bt_l, blocks - kb,
                       dv_blk.data() + d0, dim);
            gemm<true>(dst_strip.data() + kb * BLK, lp, q_cols.data() + j * n + tiles, bt_l, blocks - kb,
                       dk_blk.data() + d0, dim);
          }
        }
        auto store_rows = [&](const float* acc, at::Tensor& t) {
          bf16* o = ptr<bf16>(t) + b * t.stride(0) + g * t.stride(2);
          for (int64_t r = 0; r < BLK && kb * BLK + r < len; ++r)
            for (int64_t d = 0; d < dim; d += 16)
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + (kb * BLK + r) * t.stride(1) + d),
                                  (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + r * dim + d)));
        };
        store_rows(dk_blk.data(), dk);
        store_rows(dv_blk.data(), dv);
      }
      const __m512i dims = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(lp)));
      for (int64_t j = 0; j < group; ++j) {  // dQ^T back to [queries, dims]
        bf16* o = ptr<bf16>(dq) + b * dq.stride(0) + (g * group + j) * dq.stride(2);
        for (int64_t r = 0; r < len; ++r)
          for (int64_t d = 0; d < dim; d += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + r * dq.stride(1) + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(dims, dq_t.data() + j * n + d * lp + r, 4)));
      }
    }
    _tile_release();
  });
  return {dq, dk, dv};
}
#else
std::vector<at::Tensor> attention_backward(at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                              at::Tensor, at::Tensor, double) {
  TORCH_CHECK(false, "attention_backward: built without AMX");
}
#endif

// ---- dst (float32) += src (bfloat16 or float32), in place: torch's mixed-dtype add_ first copies src to float32 ----
void accumulate_(at::Tensor dst, at::Tensor src) {
  check(src, "src");
  TORCH_CHECK(dst.scalar_type() == at::kFloat && dst.is_contiguous() && src.is_contiguous() &&
              dst.numel() == src.numel(), "accumulate_: dst must be float32, both contiguous and of one size");
  dispatch(src, [&](auto tag) {
    using T = decltype(tag);
    const T* x = ptr<T>(src);
    float* y = dst.data_ptr<float>();
    at::parallel_for(0, dst.numel(), 1 << 16, [=](int64_t lo, int64_t hi) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) y[i] += to_f(x[i]);
    });
  });
}

// ---- cross-entropy against labels, with its gradient written over the logits (training's fused loss) -------------
// logits [R, V], labels [R]: returns each row's -log softmax(row)[label] in float32 and replaces the row by
// softmax(row) - onehot(label) in the logits' dtype, which is d(loss)/d(logits). One row at a time, so the row's
// exponentials stay in this thread's cache: three sweeps over a row in place of the eager ops' ten over the chunk.
template <typename T>
void cross_entropy_impl(T* x, const int64_t* labels, float* loss, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [=](int64_t lo, int64_t hi) {
    std::vector<float> e(n);
    for (int64_t r = lo; r < hi; ++r) {
      T* xr = x + r * n;
      float top = -INFINITY, sum = 0;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      auto load = [](const T* p) {
        if constexpr (std::is_same_v<T, bf16>) return load_f32x16(p); else return _mm512_loadu_ps(p);
      };
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, load(xr + i));
      top = _mm512_reduce_max_ps(mx);
#endif
      for (; i < n; ++i) top = std::max(top, to_f(xr[i]));
      i = 0;
#if defined(__AVX512BF16__)
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= n; i += 16) {
        const __m512 v = exp_f32x16(_mm512_sub_ps(load(xr + i), _mm512_set1_ps(top)));
        _mm512_storeu_ps(e.data() + i, v);
        acc = _mm512_add_ps(acc, v);
      }
      sum = _mm512_reduce_add_ps(acc);
#endif
      for (; i < n; ++i) sum += (e[i] = std::exp(to_f(xr[i]) - top));
      const int64_t y = labels[r];
      loss[r] = top + std::log(sum) - to_f(xr[y]);
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) xr[j] = from_f<T>(e[j] * inv);
      xr[y] = from_f<T>(e[y] * inv - 1.f);
    }
  });
}

at::Tensor cross_entropy_(at::Tensor logits, at::Tensor labels) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy_: logits must be [rows, vocab], contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == logits.size(0),
              "cross_entropy_: labels must be int64 [rows]");
  auto y = labels.contiguous();
  if (y.numel() > 0) {
    TORCH_CHECK(y.min().item<int64_t>() >= 0 && y.max().item<int64_t>() < logits.size(1),
                "cross_entropy_: a label is outside the vocabulary");
  }
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  dispatch(logits, [&](auto tag) {
    using scalar_t = decltype(tag);
    cross_entropy_impl<scalar_t>(ptr<scalar_t>(logits), y.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                 logits.size(0), logits.size(1));
  });
  return loss;
}

// ---- attention of a few query tokens per sequence over its paged cache ------------------------------------------
// q [T, H, D] (sequence r's queries are rows cu_q[r]..cu_q[r+1], the last ones of its seqlens_k[r] positions,
// causal, optional sliding window); k/v cache [blocks, block_size, KVH, D]; block_tables [S, W]. Each (sequence,
// head) task walks the sequence's blocks in place: no gather, no padding, softmax in float32.

// The K and V blocks of the sequence a thread attends to next, asked for a few cache lines per key of the current
// one: they are in L2 by the time that sequence starts, so DRAM streams while the current one computes (1.3-1.4x on
// 64 sequences of 90-200 keys; without it, each sequence began with a wait on DRAM). The per-row prefetch below
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

#if defined(__AVX512BF16__)
// Asks for the cache lines of a key or value row ahead of use: blocks of a paged cache are scattered, which the
// hardware prefetcher does not follow. The task of a sequence's first kv head fetches the rows of all its kv heads
// (`span` = kv_heads * dim, one contiguous run): the tasks of the other heads, which the same thread runs next,
// then read them from its L2 instead of DRAM (span 0: no prefetch).
inline void prefetch_row(const bf16* p, int64_t dim) {
  for (int64_t i = 0; i < dim; i += 32) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}
constexpr int64_t PREFETCH_KEYS = 24;

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
// loaded once for all of them, four keys sharing one horizontal reduction: 5-9 % off a throughput step's attention
// against a loop per head. Kept out of line: inlined, attend_bf16's other loops ran slower than before.
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
#if defined(__AVX512BF16__)
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
        for (int64_t h = 0; h < group; ++h) {
          T* op = out + ((q0 + i) * heads + g * group + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) op[d] = from_f<T>(acc[h * dim + d]);
        }
      }
    }
  });
}

void paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cu_q,
                     at::Tensor seqlens_k, at::Tensor block_tables, at::Tensor seqs, double scale,
                     int64_t window, at::Tensor out, c10::optional<at::Tensor> k_scale,
                     c10::optional<at::Tensor> v_scale) {
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

// ---- a recorded decode step, replayed without Python: the CPU counterpart of a CUDA graph -----------------------
// lmforge/engine/cpu_graph.py runs a decode step's layers once while each kernel call (and each residual add) is
// recorded here with the very tensors it read and wrote; run() copies a new step's inputs into the recorded input
// tensors and calls the same kernels on the same tensors again, so none of the Python between them runs. It declines
// (returns false, nothing computed) when a guarded tensor was changed in place since recording (a weight update) or
// an input does not fit its recorded tensor.
class StepGraph {
 public:
  using T = at::Tensor;
  using B = c10::optional<at::Tensor>;
  void linear_small(T x, T w, B b, T y) { add([=] { linear_small_into(x, w, b, y); }); }
  void linear(T x, T w, B b, T y) { add([=] { linear_into(x, w, b, y); }); }
  void linear_f32(T x, T w, B b, T y) { add([=] { linear_f32_into(x, w, b, y); }); }
  void vnni_linear(T x, T w, B b, T y) { add([=] { vnni_linear_into(x, w, b, y); }); }
  void amx_linear(T x, T w, B b, T y) { add([=] { amx_linear_into(x, w, b, y); }); }
  void rms_norm(T x, T w, double eps, T y) { add([=] { rms_norm_into(x, w, eps, y); }); }
  void rope_(T x, T cos, T sin) { add([=] { ::rope_(x, cos, sin); }); }
  void silu_mul(T gate, T up, T y) { add([=] { silu_mul_into(gate, up, y); }); }
  void write_kv(T k, T v, T kc, T vc, T slots, B ks, B vs) { add([=] { ::write_kv(k, v, kc, vc, slots, ks, vs); }); }
  void paged_attention(T q, T kc, T vc, T cu_q, T lk, T tables, T seqs, double scale, int64_t window, T out, B ks,
                       B vs) {
    add([=] { ::paged_attention(q, kc, vc, cu_q, lk, tables, seqs, scale, window, out, ks, vs); });
  }
  void add_tensors(T a, T b, T out) { add([=]() mutable { at::add_out(out, a, b); }); }
  // A kernel of another lmforge extension (quant_ops.cpp), given as the address of a function of the step's tensors.
  void external(int64_t fn, std::vector<T> tensors) {
    const auto step = reinterpret_cast<void (*)(const std::vector<T>&)>(fn);
    add([=] { step(tensors); });
  }
  void set_inputs(std::vector<T> inputs) { inputs_ = std::move(inputs); }
  void guard(std::vector<T> tensors) {
    for (auto& t : tensors) guards_.emplace_back(t, t._version());
  }
  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

  // Each fresh input goes into its recorded tensor, or into the leading part of it when smaller (a block table
  // narrower than the recorded one).
  bool run(std::vector<T> fresh) {
    for (auto& [t, version] : guards_)
      if (t._version() != version) return false;
    if (fresh.size() != inputs_.size()) return false;
    for (size_t i = 0; i < fresh.size(); ++i) {
      const T& src = fresh[i];
      T dst = inputs_[i];
      if (src.dim() != dst.dim() || src.scalar_type() != dst.scalar_type()) return false;
      for (int64_t d = 0; d < src.dim(); ++d) {
        if (src.size(d) > dst.size(d) || (d == 0 && src.size(0) != dst.size(0))) return false;
        if (src.size(d) < dst.size(d)) dst = dst.narrow(d, 0, src.size(d));
      }
      dst.copy_(src);
    }
    for (auto& step : steps_) step();
    return true;
  }

 private:
  void add(std::function<void()> step) { steps_.push_back(std::move(step)); }
  std::vector<std::function<void()>> steps_;
  std::vector<T> inputs_;
  std::vector<std::pair<T, int64_t>> guards_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StepGraph>(m, "StepGraph")
      .def(py::init<>())
      .def("linear_small", &StepGraph::linear_small)
      .def("linear", &StepGraph::linear)
      .def("linear_f32", &StepGraph::linear_f32)
      .def("vnni_linear", &StepGraph::vnni_linear)
      .def("amx_linear", &StepGraph::amx_linear)
      .def("rms_norm", &StepGraph::rms_norm)
      .def("rope_", &StepGraph::rope_)
      .def("silu_mul", &StepGraph::silu_mul)
      .def("write_kv", &StepGraph::write_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("slots"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("paged_attention", &StepGraph::paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("cu_q"), py::arg("seqlens_k"), py::arg("block_tables"), py::arg("seqs"), py::arg("scale"),
           py::arg("window"), py::arg("out"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("add_tensors", &StepGraph::add_tensors)
      .def("external", &StepGraph::external)
      .def("set_inputs", &StepGraph::set_inputs)
      .def("guard", &StepGraph::guard)
      .def("size", &StepGraph::size)
      .def("run", &StepGraph::run, py::call_guard<py::gil_scoped_release>(),
           "copies the inputs in and replays the recorded kernels; false (nothing run) when a guard or input fails");
  m.def("linear_small", &linear_small, "x [<=8, in] @ w[out, in].T (+ b), streaming w once");
  m.def("linear", &linear, "F.linear of a 2-d x through ATen, callable from step graphs");
  m.def("linear_f32_available", &linear_f32_available, "whether the AVX2 float32 linear is built");
  m.def("linear_f32", &linear_f32, "float32 x [m, in] @ w[out, in].T (+ b) on AVX2 FMAs, batch-invariant");
  m.def("vnni_available", &vnni_available, "whether the AVX512-BF16 GEMM (vnni_pack / vnni_linear) is built");
  m.def("vnni_pack", &vnni_pack, "bf16 weight [N, K] -> 48-output panels of k pairs");
  m.def("vnni_linear", &vnni_linear, "x [M, K] @ w.T on AVX512-BF16 dot products, w packed by vnni_pack");
  m.def("amx_available", &amx_available, "whether AMX tiles can be used here");
  m.def("amx_pack", &amx_pack, "bf16 weight [N, K] -> AMX tile layout");
  m.def("amx_linear", &amx_linear, "x [M, K] @ w.T on AMX tiles, w packed by amx_pack");
  m.def("rms_norm", &rms_norm, "RMSNorm as Hugging Face computes it");
  m.def("rope_", &rope_, "rotary embedding in place (half-split layout)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax, first of equal maxima");
  m.def("write_kv", &write_kv, "new keys/values into paged-cache slots (int8 ones quantised, with scales)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("paged_attention", &paged_attention, "attention of few-token queries over a paged KV cache (or an int8 one)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_q"), py::arg("seqlens_k"),
        py::arg("block_tables"), py::arg("seqs"), py::arg("scale"), py::arg("window"), py::arg("out"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("attention_backward", &attention_backward, "causal attention backward on AMX tiles (dq, dk, dv)");
  m.def("rms_norm_train", &rms_norm_train, "RMSNorm for training: (y, 1/rms per row)");
  m.def("rms_norm_train_backward", &rms_norm_train_backward, "RMSNorm backward: (dx, dw or empty)");
  m.def("rope_train", &rope_train, "rotary embedding out of place (inverse: its backward)");
  m.def("silu_mul_backward", &silu_mul_backward, "d/d(gate, up) of silu(gate) * up");
  m.def("accumulate_", &accumulate_, "float32 dst += src in place");
  m.def("cross_entropy_", &cross_entropy_, "per-row cross-entropy; the logits become its gradient in place");
}
