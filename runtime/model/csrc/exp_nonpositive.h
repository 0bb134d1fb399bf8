// exp(x) for x <= 0 on the CPU, shared by the paged attention kernel (its scores minus a running
// max) and the fused decode ops (silu's exp(-|x|)).
#pragma once

#include <cstdint>
#include <cstring>

namespace loragate_cpu {

// exp(x) for x <= 0, ~2 ulp: x = n ln2 + r
// with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n through the exponent bits. Plain
// arithmetic, so a loop over it vectorizes (std::exp would stay scalar). NaN stays NaN: a
// sequence whose own activations are non-finite must come out non-finite, for the engine's
// check to stop it.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // below this exp underflows float's normal range anyway
  float t = x * 1.44269504088896341f - 0.5f;
  t = t >= -127.0f ? t : -127.0f;  // also maps NaN to a valid int below
  const int32_t n = static_cast<int32_t>(t);  // truncation of t - 0.5 rounds x log2(e)
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // n in [-126, 0]: a normal power of two
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return p * pow2;
}

}  // namespace loragate_cpu
