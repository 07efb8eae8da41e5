// bfloat16 GEMMs for decode-sized batches over weights packed for them once (layers/linear.py): dot products on
// AVX512-BF16 (vnni_*) and tiles on AMX (amx_*). Where the build's target lacks the instructions, vnni_available() and
// amx_available() say false and the other functions raise.

#include "cpu_ops.h"
#include <ATen/ops/zeros.h>

namespace lmforge {

// ---- bf16 GEMM on AVX512-BF16 dot products for decode-sized batches (CPUs without AMX) ----------------------------
// y[M, N] = x[M, K] . w[N, K]^T (+ b). oneDNN stays well short of the dot-product peak at 64 rows, and more so with
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

namespace {
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
}  // namespace

void vnni_linear_into(at::Tensor x, at::Tensor packed, OptTensor bias, at::Tensor y) {
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

at::Tensor vnni_linear(at::Tensor x, at::Tensor packed, OptTensor bias) {
  auto y = at::empty({x.size(0), packed.size(0)}, x.options());
  vnni_linear_into(x, packed, bias, y);
  return y;
}
#else
at::Tensor vnni_pack(at::Tensor) { TORCH_CHECK(false, "vnni_pack: built without AVX512-BF16"); }
at::Tensor vnni_linear(at::Tensor, at::Tensor, OptTensor) {
  TORCH_CHECK(false, "vnni_linear: built without AVX512-BF16");
}
void vnni_linear_into(at::Tensor, at::Tensor, OptTensor, at::Tensor) {
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

void amx_linear_into(at::Tensor x, at::Tensor packed, OptTensor bias, at::Tensor y) {
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

at::Tensor amx_linear(at::Tensor x, at::Tensor packed, OptTensor bias) {
  auto y = at::empty({x.size(0), packed.size(0) * 16}, x.options());
  amx_linear_into(x, packed, bias, y);
  return y;
}
#else
bool amx_available() { return false; }
at::Tensor amx_pack(at::Tensor) { TORCH_CHECK(false, "amx_pack: built without AMX"); }
at::Tensor amx_linear(at::Tensor, at::Tensor, OptTensor) {
  TORCH_CHECK(false, "amx_linear: built without AMX");
}
void amx_linear_into(at::Tensor, at::Tensor, OptTensor, at::Tensor) {
  TORCH_CHECK(false, "amx_linear: built without AMX");
}
#endif

}  // namespace lmforge
