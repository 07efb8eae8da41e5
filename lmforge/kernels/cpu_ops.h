// What the sources of the cpu_ops extension share: conversions between bfloat16 and float32, the 16-lane AVX512
// helpers, argument checks and dtype dispatch, RMSNorm's row loop (inference and training), and the kernels each
// source defines for the others (the step graph replays the `_into` twins; cpu_ops.cpp binds them all).

#pragma once

// Not <torch/extension.h> nor <ATen/Functions.h>: every source parses what it includes, and these two alone take
// longer than the kernels' code. Each source includes the ATen/ops headers of the operators it calls.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lmforge {

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


#if defined(__x86_64__)
// 2^f for |f| <= 1/2: Taylor coefficients, highest degree first (exp_f32x8 / exp_f32x16)
constexpr float EXP2_POLY[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.618129107628477e-3f,
                                5.550410866482158e-2f, 2.402265069591007e-1f, 6.931471805599453e-1f, 1.f};
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp_f32x16's method in 8 lanes.
inline __m256 exp_f32x8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

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
  __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
struct TileConfig {  // the operand of _tile_loadconfig
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
#endif

inline void check(const at::Tensor& t, const char* name) {
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

using OptTensor = c10::optional<at::Tensor>;

// linear.cpp: few-row, float32 (AVX2) and ATen linears. Each kernel that returns a new tensor has an `_into` twin
// writing into a given one, which the step graphs replay.
void linear_small_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y);
at::Tensor linear_small(at::Tensor x, at::Tensor w, OptTensor bias);
void linear_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y);
at::Tensor linear(at::Tensor x, at::Tensor w, OptTensor bias);
bool linear_f32_available();
void linear_f32_into(at::Tensor x, at::Tensor w, OptTensor bias, at::Tensor y);
at::Tensor linear_f32(at::Tensor x, at::Tensor w, OptTensor bias);

// linear_bf16.cpp: bf16 GEMMs on AVX512-BF16 dot products (vnni) and AMX tiles, over weights packed for them.
bool vnni_available();
at::Tensor vnni_pack(at::Tensor w);
void vnni_linear_into(at::Tensor x, at::Tensor packed, OptTensor bias, at::Tensor y);
at::Tensor vnni_linear(at::Tensor x, at::Tensor packed, OptTensor bias);
bool amx_available();
at::Tensor amx_pack(at::Tensor w);
void amx_linear_into(at::Tensor x, at::Tensor packed, OptTensor bias, at::Tensor y);
at::Tensor amx_linear(at::Tensor x, at::Tensor packed, OptTensor bias);

// elementwise.cpp: a decode step's element-wise ops and greedy sampling's argmax.
void rms_norm_into(at::Tensor x, at::Tensor weight, double eps, at::Tensor y);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor shm_all_reduce(at::Tensor x, at::Tensor data, at::Tensor seqs, at::Tensor state, at::Tensor watch);
at::Tensor rope_(at::Tensor x, at::Tensor cos, at::Tensor sin);
void silu_mul_into(at::Tensor gate, at::Tensor up, at::Tensor y);
at::Tensor silu_mul(at::Tensor gate, at::Tensor up);
at::Tensor argmax_rows(at::Tensor x);

// paged_attention.cpp: the paged KV cache's writes and the attention of a few query tokens per sequence over it.
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, OptTensor k_scale,
              OptTensor v_scale);
void paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cu_q, at::Tensor seqlens_k,
                     at::Tensor block_tables, at::Tensor seqs, double scale, int64_t window, at::Tensor out,
                     OptTensor k_scale, OptTensor v_scale);

// training.cpp: RMSNorm, rotary embedding and SwiGLU with their backward passes; the fused loss's pieces.
std::vector<at::Tensor> rms_norm_train(at::Tensor x, at::Tensor w, double eps);
std::vector<at::Tensor> rms_norm_train_backward(at::Tensor dy, at::Tensor x, at::Tensor w, at::Tensor inv,
                                                bool want_dw);
at::Tensor rope_train(at::Tensor x, at::Tensor cos, at::Tensor sin, bool inverse, at::ScalarType out_dtype);
std::vector<at::Tensor> silu_mul_backward(at::Tensor gate, at::Tensor up, at::Tensor dy);
void accumulate_(at::Tensor dst, at::Tensor src);
at::Tensor cross_entropy_(at::Tensor logits, at::Tensor labels);

// attention_backward.cpp: causal attention's backward pass on AMX tiles.
std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor grad,
                                           at::Tensor lse, double scale);

}  // namespace lmforge
