// Causal attention's backward pass on AMX tiles (training, lmforge/layers/train_kernels.py).

#include "cpu_ops.h"

namespace lmforge {

// ---- causal attention backward on AMX tiles (training): the flash-attention recurrence in 32 x 32 blocks ----------
// q/out/grad [B, L, H, D], k/v [B, L, KVH, D] (any strides, the last dimension contiguous), lse [B, H, L] from the
// forward (torch's CPU flash attention) -> dq, dk, dv. One task per (sequence, kv head) owns its heads' gradients, so
// nothing is shared between threads. Per block: S = Q K^T and dP = dO V^T from the tiles, P = exp(scale S - lse),
// dS = P (dP - rowsum(dO o O)) scale, then dV += P^T dO, dK += dS^T Q, dQ += dS K, accumulated in float32.
// torch's own CPU backward runs these products through non-AMX code, several times its forward's time.
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace {

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

}  // namespace

std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                              at::Tensor grad, at::Tensor lse, double scale) {
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

}  // namespace lmforge
