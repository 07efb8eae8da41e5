// Linears for inference: few-row products that stream the weight once (decode), the float32 product on AVX2 + FMA
// (batch-invariant), and ATen's own product for the rest, each callable from a step graph.

#include "cpu_ops.h"
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

namespace lmforge {

// ---- linear for a few rows: y[m, n] = x[m, :] . w[n, :] (+ b[n]); the weight matrix is streamed once -------------
// Decode is memory-bound: each weight row is read once for all (at most 8) input rows, accumulating in float32.
namespace {
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
}  // namespace

// Each kernel that returns a new tensor has an `_into` twin writing into a given one, which the step graphs replay.
void linear_small_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y) {
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

at::Tensor linear_small(at::Tensor x, at::Tensor w, OptTensor bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_small_into(x, w, bias, y);
  return y;
}

// ATen's own product (oneDNN / MKL), called from here so that step graphs record and replay it: the row counts and
// dtypes no kernel above serves (float32 batches, bf16 beyond the GEMMs' reach). Rounds exactly as F.linear does:
// at::linear of a 2-d input is addmm with a bias and mm without.
void linear_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y) {
  if (bias) {
    at::addmm_out(y, *bias, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
}

at::Tensor linear(at::Tensor x, at::Tensor w, OptTensor bias) {
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
namespace {
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
}  // namespace

void linear_f32_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y) {
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
void linear_f32_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y) {
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

at::Tensor linear_f32(at::Tensor x, at::Tensor w, OptTensor bias) {
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_f32_into(x, w, bias, y);
  return y;
}

}  // namespace lmforge
