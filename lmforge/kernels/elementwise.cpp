// The element-wise ops of a decode step (RMSNorm, rotary embedding, SwiGLU) and greedy sampling's row-wise argmax.

#include "cpu_ops.h"

namespace lmforge {

// ---- RMSNorm as Hugging Face computes it (rms_norm_impl, cpu_ops.h) ------------------------------------------
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

// ---- silu(gate) * up, the SwiGLU activation, rounding silu to the dtype before the product as eager does ----------
// gate and up may be row-strided views (the two halves of a fused gate/up product).
namespace {
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
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {  // AVX2 machines' float32 models: no libm call per element
        for (; i + 8 <= n; i += 8) {
          const __m256 a = _mm256_loadu_ps(gr + i);
          const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp_f32x8(_mm256_sub_ps(_mm256_setzero_ps(), a)));
          _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_div_ps(a, d), _mm256_loadu_ps(ur + i)));
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
}  // namespace

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

// ---- row-wise argmax (the first of equal maxima), for greedy sampling straight from bf16 logits --------------------
namespace {
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
}  // namespace

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

}  // namespace lmforge
