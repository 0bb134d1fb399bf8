// The decoder layer's small ops on the CPU (float32, or bfloat16 weights and activations with
// float32 attention), each fused into one call.
//
// Why: at batch 32 a SmolLM2 decode step spends its time outside the GEMMs in dozens of tiny
// torch ops per layer (the norm alone is five: pow, mean, add, rsqrt, mul), each paying
// dispatch, an allocation and an OpenMP fork for microseconds of arithmetic. Two calls replace
// them (runtime/model/fused_cpu.py wraps both, runtime/model/llama.py calls them):
//
//   add_rms_norm(h, delta, weight, eps) -> x
//       h += delta (in place; delta may be None), then x = weight * (h * rsqrt(mean(h^2) + eps))
//   rope_write_kv(qkv, cos, signed_sin, k_pool, v_pool, slot_mapping, heads, kv_heads) -> q
//       rotary on q and k out of the fused qkv projection, k and v written to their pool rows,
//       the rotated q returned [tokens, heads, head_dim]
//   silu_mul(gate_up) -> silu(gate) * up, of the fused gate_up projection [tokens, 2 inter]
//
// Numerics: every product and sum rounds to float32 in the order transformers rounds it (this
// file is built with -ffp-contract=off, so no a * b + c becomes an FMA), which makes the rotary
// and the residual add bitwise equal to the torch ops they replace. The norm's sum of squares is
// one float32 sum in another order than torch's mean, so x can differ from F.rms_norm's in the
// last bit, and silu's exp is a polynomial within ~2 ulp of torch's (tests/runtime/
// test_fused_cpu.py bounds both; every greedy oracle stays token-equal).

#include <ATen/ATen.h>
#include "omp_parallel.h"
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "exp_nonpositive.h"

namespace {

using loragate_cpu::exp_nonpositive;

constexpr int64_t kLanes = 16;

// Rows of `rows` floats each: how many a thread should take so that a fork pays for itself.
int64_t grain_for(int64_t rows_floats) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, rows_floats));
}

// Float storage types of the activations: float32, or bfloat16 whose every op computes in float
// and rounds once to bfloat16 (round to nearest even, as torch's kernels do).
template <typename T>
inline float up(T v) { return static_cast<float>(v); }
template <typename T>
inline T down(float v) { return static_cast<T>(v); }

bool is_activation(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

template <typename T>
void add_rms_norm_rows(T* hp, const T* d, const T* w, T* op, int64_t tokens, int64_t hidden,
                       float e) {
  loragate_cpu::parallel_for(0, tokens, grain_for(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = hp + t * hidden;
      if (d != nullptr) {
        const T* dr = d + t * hidden;
        for (int64_t i = 0; i < hidden; ++i) row[i] = down<T>(up(row[i]) + up(dr[i]));
      }
      float lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= hidden; i += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += up(row[i + j]) * up(row[i + j]);
      }
      float sum = 0.0f;
      for (; i < hidden; ++i) sum += up(row[i]) * up(row[i]);
      for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
      const float mean = sum / static_cast<float>(hidden);
      const float r = 1.0f / std::sqrt(mean + e);
      T* o = op + t * hidden;
      // weight * (h * r).to(T): for bfloat16 the normalized row rounds before the weight
      // multiplies it (runtime/model/llama.py rms_norm); for float32 both casts are no-ops.
      for (int64_t x = 0; x < hidden; ++x) o[x] = down<T>(up(w[x]) * up(down<T>(up(row[x]) * r)));
    }
  });
}

at::Tensor add_rms_norm(at::Tensor& h, const std::optional<at::Tensor>& delta,
                        const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.dim() == 2 && is_activation(h) && h.is_contiguous(),
              "h: contiguous float32 or bfloat16 [tokens, hidden]");
  const int64_t tokens = h.size(0), hidden = h.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden &&
                  weight.scalar_type() == h.scalar_type() && weight.is_contiguous(),
              "weight: contiguous [hidden] of h's dtype");
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type() &&
                    delta->is_contiguous(),
                "delta: contiguous, of h's shape and dtype");
    TORCH_CHECK(!delta->is_same(h), "delta must not be h itself");
  }
  at::Tensor out = at::empty_like(h);
  const float e = static_cast<float>(eps);
  if (h.scalar_type() == at::kFloat) {
    add_rms_norm_rows<float>(h.data_ptr<float>(),
                             delta.has_value() ? delta->data_ptr<float>() : nullptr,
                             weight.data_ptr<float>(), out.data_ptr<float>(), tokens, hidden, e);
  } else {
    using B = c10::BFloat16;
    add_rms_norm_rows<B>(h.data_ptr<B>(), delta.has_value() ? delta->data_ptr<B>() : nullptr,
                         weight.data_ptr<B>(), out.data_ptr<B>(), tokens, hidden, e);
  }
  return out;
}

// One head's rotary: out[i] = x[i] * cos[i] + x[i +- half] * signed_sin[i], the products and the
// sum each rounded (runtime/model/llama.py apply_rotary says why this equals transformers'),
// x read as float (a bfloat16 projection's q and k go to float32 first, as in llama.py).
template <typename T>
inline void rotate(const T* x, const float* cos, const float* ssin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = up(x[i]) * cos[i];
    const float b = up(x[i + half]) * ssin[i];
    out[i] = a + b;
  }
  for (int64_t i = half; i < dim; ++i) {
    const float a = up(x[i]) * cos[i];
    const float b = up(x[i - half]) * ssin[i];
    out[i] = a + b;
  }
}

template <typename T>
void rope_write_rows(const T* src, const float* c, const float* s, const int64_t* slots,
                     float* qp, float* kp, float* vp, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t dim) {
  const int64_t width = (heads + 2 * kv_heads) * dim, kv_width = kv_heads * dim;
  loragate_cpu::parallel_for(0, tokens, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = src + t * width;
      const float* ct = c + t * dim;
      const float* st = s + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        rotate(row + h * dim, ct, st, dim, qp + (t * heads + h) * dim);
      }
      float* k_row = kp + slots[t] * kv_width;
      const T* k_src = row + heads * dim;
      for (int64_t g = 0; g < kv_heads; ++g) rotate(k_src + g * dim, ct, st, dim, k_row + g * dim);
      const T* v_src = k_src + kv_width;
      float* v_row = vp + slots[t] * kv_width;
      for (int64_t x = 0; x < kv_width; ++x) v_row[x] = up(v_src[x]);
    }
  });
}

at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& ssin,
                         at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slot_mapping,
                         int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && is_activation(qkv) && qkv.is_contiguous(),
              "qkv: contiguous float32 or bfloat16 [tokens, (heads + 2 kv_heads) * head_dim]");
  TORCH_CHECK(heads > 0 && kv_heads > 0, "heads and kv_heads must be positive");
  TORCH_CHECK(k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes() &&
                  k_pool.scalar_type() == at::kFloat && v_pool.scalar_type() == at::kFloat &&
                  k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.size(1) == kv_heads,
              "k_pool, v_pool: contiguous float32 [rows, kv_heads, head_dim]");
  const int64_t tokens = qkv.size(0), dim = k_pool.size(2), pool_rows = k_pool.size(0);
  TORCH_CHECK(dim > 0 && dim % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "qkv's width must be (heads + 2 kv_heads) * head_dim, head_dim even");
  for (const at::Tensor* t : {&cos, &ssin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == tokens * dim,
                "cos, signed_sin: contiguous float32 [tokens, 1, head_dim]");
  }
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping: contiguous int64 [tokens]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  // Checked before any write: a bad row fails the call and leaves the pools as they were.
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < pool_rows, "slot_mapping points outside the pool");
  }
  at::Tensor q = at::empty({tokens, heads, dim}, k_pool.options());
  const float* c = cos.data_ptr<float>();
  const float* s = ssin.data_ptr<float>();
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  if (qkv.scalar_type() == at::kFloat) {
    rope_write_rows<float>(qkv.data_ptr<float>(), c, s, slots, q.data_ptr<float>(), kp, vp,
                           tokens, heads, kv_heads, dim);
  } else {
    rope_write_rows<c10::BFloat16>(qkv.data_ptr<c10::BFloat16>(), c, s, slots,
                                   q.data_ptr<float>(), kp, vp, tokens, heads, kv_heads, dim);
  }
  return q;
}

// silu(g) * u with silu(g) = g / (1 + exp(-g)), written with e = exp(-|g|) so that the exp's
// argument is never positive: g / (1 + e) for g >= 0, g * e / (1 + e) below (the same value,
// e = exp(g) there). A NaN gate stays NaN. bfloat16: silu rounds to bfloat16 before the
// product, as F.silu(gate).mul_(up) rounds.
template <typename T>
void silu_mul_rows(const T* src, T* dst, int64_t tokens, int64_t inter) {
  loragate_cpu::parallel_for(0, tokens, grain_for(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = src + t * 2 * inter;
      const T* u = g + inter;
      T* o = dst + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float x = up(g[i]);
        const float e = exp_nonpositive(x >= 0.0f ? -x : x);
        const float silu = (x >= 0.0f ? x : x * e) / (1.0f + e);
        o[i] = down<T>(up(down<T>(silu)) * up(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && is_activation(gate_up) && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0,
              "gate_up: contiguous float32 or bfloat16 [tokens, 2 * intermediate]");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({tokens, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), tokens, inter);
  } else {
    using B = c10::BFloat16;
    silu_mul_rows<B>(gate_up.data_ptr<B>(), out.data_ptr<B>(), tokens, inter);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(loragate_decode, m) {
  m.def("add_rms_norm(Tensor(a!) h, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor signed_sin, Tensor(a!) k_pool, "
        "Tensor(b!) v_pool, Tensor slot_mapping, int heads, int kv_heads) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(loragate_decode, CPU, m) {
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rope_write_kv", rope_write_kv);
  m.impl("silu_mul", silu_mul);
}
