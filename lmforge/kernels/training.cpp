// Training's kernels: RMSNorm, rotary embedding and SwiGLU with their backward passes (the autograd Functions of
// lmforge/layers/train_kernels.py), and the fused loss's float32 accumulation and cross-entropy.

#include "cpu_ops.h"
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

namespace lmforge {

// ---- training: RMSNorm, rotary embedding and SwiGLU with their backward passes -----------------------------------
// Each replaces the chain of eager ops that autograd would record (and the tensors it would keep) by one sweep forward
// and one backward; float32 inside, one rounding per output. Inputs and outputs may differ in dtype (float32 weights
// and residual stream under bf16 autocast): dispatch2 instantiates each pair.
namespace {
template <typename F>
void dispatch2(const at::Tensor& a, at::ScalarType b, F&& f) {
  dispatch(a, [&](auto ta) {
    if (b == at::kBFloat16) f(ta, bf16{}); else f(ta, float{});
  });
}
}  // namespace

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
namespace {
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
}  // namespace

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

}  // namespace lmforge
