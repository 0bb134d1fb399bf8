// The CPU projection GEMM for decode-sized batches: y[m, n] = x[m, k] @ w[n, k]^T (+ bias),
// over a weight packed once into panels of kPanel output columns (runtime/model/gemm_cpu.py).
//
// Why a kernel of our own: a decode step at batch 32 reads each of SmolLM2's ~540 MB of fp32
// weights once, for only 32 rows. oneDNN's GEMM reaches its in-cache rate only when the weight
// is cached; over weights streamed from memory its time was about compute plus memory, not the
// larger of the two (bench.real_model's roofline on the AVX2 VM: 84.6 ms of arithmetic, 32.3 of
// reads, 146.2 ms for the GEMMs back to back; ours 109.7 against 72.8 and 28.9). Here each
// panel is one contiguous run of memory and one thread's panels lie back to back, so a thread
// reads one sequential stream; while it computes on one block of the stream it prefetches the
// next (panel_rows says why the hardware prefetcher alone left it stalling, then idle).
//
// Numerics: every output is one chain of fused multiply-adds over k in ascending order, in
// float32, then + bias. Blocking never splits the chain (a partial sum goes to y and comes back
// unchanged), so a row's result does not depend on the batch size or on the other rows (unlike
// oneDNN or MKL, whose split of k depends on the shape). It differs from those libraries in the
// last bits, as they differ from each other; greedy tokens equal transformers' on every oracle.
// bfloat16 weights (`--dtype bfloat16` on a CPU without oneDNN's bf16 GEMM) are widened to
// float32 as they load (exact), so the sums are the float32 ones over the bf16 values, and each
// output rounds once to bfloat16; the weights stream at half the bytes.
//
// Three builds of the same order of operations: 512-bit vectors (the avx512 variant: panels of
// 32 columns, up to 12 rows per call), 256-bit (avx2: 16 columns, 6 rows) and plain C++ over
// std::fma. A fused multiply-add rounds once whatever the vector width, so all three give the
// same bits (tests/runtime/test_gemm_cpu.py checks it across the variants this CPU can run).
#include <torch/library.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "omp_parallel.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LORAGATE_GEMM_VECTOR 512
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORAGATE_GEMM_VECTOR 256
#endif

namespace {

#if LORAGATE_GEMM_VECTOR == 512
constexpr int kLanes = 16;
constexpr int kMaxRows = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast of 32 zmm
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
// 16 bfloat16 (their bits) as float32: exact, a bf16 is a float32's upper half.
inline vec vload(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vzero() { return _mm512_setzero_ps(); }
#elif LORAGATE_GEMM_VECTOR == 256
constexpr int kLanes = 8;
constexpr int kMaxRows = 6;  // 12 accumulators + 2 panel vectors + 1 broadcast of 16 ymm
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
// 8 bfloat16 (their bits) as float32: exact, a bf16 is a float32's upper half.
inline vec vload(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vzero() { return _mm256_setzero_ps(); }
#else
constexpr int kLanes = 4;
constexpr int kMaxRows = 6;
struct vec {
  float v[4];
};
inline vec vload(const float* p) {
  vec r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline vec vload(const uint16_t* p) {
  vec r;
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&r.v[i], &bits, sizeof(float));
  }
  return r;
}
inline void vstore(float* p, vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline vec vbroadcast(const float* p) { return vec{{*p, *p, *p, *p}}; }
inline vec vfma(vec a, vec b, vec c) {
  for (int i = 0; i < 4; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline vec vadd(vec a, vec b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
inline vec vzero() { return vec{{0.f, 0.f, 0.f, 0.f}}; }
#endif

constexpr int kVectors = 2;                 // vectors per panel row
constexpr int kPanel = kVectors * kLanes;   // output columns per panel
constexpr int64_t kKBlock = 4096 / kPanel;  // 16 KB of a panel per pass: stays in L1
constexpr int64_t kRowChunk = 48;           // rows of x kept in L2 while the panels stream

constexpr int64_t kLine = 64;               // bytes per cache line

// Cache lines of the weight stream to fetch ahead while a call computes: `lines` lines from
// `next`, `per_k` of them per k step (see panel_rows).
struct Prefetch {
  const char* next;
  int64_t lines, per_k;
};

// acc[r] (+)= sum over kk < kc of x[r, kk] * b[kk, :] for MR rows and one panel's kc rows;
// `first`: start from zero, else from y; `bias`: added at the store (the chain's last block).
template <int MR, typename W>
inline void micro(const float* x, int64_t ldx, const W* b, int64_t kc, float* y,
                  int64_t ldy, bool first, const float* bias, Prefetch pf) {
  vec acc[MR][kVectors];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v)
      acc[r][v] = first ? vzero() : vload(y + r * ldy + v * kLanes);
  for (int64_t kk = 0; kk < kc; ++kk) {
    for (int64_t l = kk * pf.per_k; l < std::min(pf.lines, (kk + 1) * pf.per_k); ++l)
      __builtin_prefetch(pf.next + l * kLine, 0, 2);  // to L2 (prefetcht1)
    vec bv[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) bv[v] = vload(b + kk * kPanel + v * kLanes);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const vec a = vbroadcast(x + r * ldx + kk);
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[r][v] = vfma(a, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const vec out = bias ? vadd(acc[r][v], vload(bias + v * kLanes)) : acc[r][v];
      vstore(y + r * ldy + v * kLanes, out);
    }
}

template <typename W>
void rows(int64_t mr, const float* x, int64_t ldx, const W* b, int64_t kc, float* y,
          int64_t ldy, bool first, const float* bias, Prefetch pf) {
  switch (mr) {
    case 1: return micro<1>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 2: return micro<2>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 3: return micro<3>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 4: return micro<4>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 5: return micro<5>(x, ldx, b, kc, y, ldy, first, bias, pf);
#if LORAGATE_GEMM_VECTOR == 512
    case 6: return micro<6>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 7: return micro<7>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 8: return micro<8>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 9: return micro<9>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 10: return micro<10>(x, ldx, b, kc, y, ldy, first, bias, pf);
    case 11: return micro<11>(x, ldx, b, kc, y, ldy, first, bias, pf);
    default: return micro<12>(x, ldx, b, kc, y, ldy, first, bias, pf);
#else
    default: return micro<6>(x, ldx, b, kc, y, ldy, first, bias, pf);
#endif
  }
}

// One panel over `mlen` rows of x: out[r, :kPanel] for r < mlen (ldo apart). `stream_end`:
// the end of this thread's panels, which lie back to back in memory.
template <typename W>
void panel_rows(const float* x, int64_t ldx, int64_t mlen, int64_t k, const W* panel,
                float* out, int64_t ldo, const float* bias, const W* stream_end) {
  // As few calls as ceil(mlen / kMaxRows) allows, their sizes as even as possible: 32 rows
  // are 6+6+5+5+5+5 on AVX2 and 11+11+10 on AVX-512, never a 2-row tail whose few
  // accumulators cannot hide the FMA latency.
  const int64_t calls = (mlen + kMaxRows - 1) / kMaxRows;
  for (int64_t kb = 0; kb < k; kb += kKBlock) {
    const int64_t kc = std::min(kKBlock, k - kb);
    const bool last = kb + kc == k;
    const W* block = panel + kb * kPanel;
    // The first call over a block waits for it to come from memory and the others find it
    // cached, so on its own the stream would stall, then idle. Each call instead fetches its
    // share of the next block (the rest of this panel, or the next panel: one stream) while
    // it computes, so the reads overlap the arithmetic (bench/README.md, sixth round). Into
    // L2, not L1: the L1's few miss buffers capped the lines in flight (A/B in one process on
    // the Zen 5, batch 32 over SmolLM2's weights: 3% faster in each of three runs).
    const char* next = reinterpret_cast<const char*>(block + kc * kPanel);
    const int64_t ahead = std::max<int64_t>(
        0, std::min<int64_t>(kKBlock * kPanel * sizeof(W),
                             reinterpret_cast<const char*>(stream_end) - next));
    const int64_t share = (ahead / kLine + calls - 1) / calls;  // lines per call
    int64_t row = 0;
    for (int64_t c = 0; c < calls; ++c) {
      const int64_t left = mlen - row, mr = (left + (calls - c) - 1) / (calls - c);
      const int64_t first_line = std::min(c * share, ahead / kLine);
      const Prefetch pf{next + first_line * kLine,
                        std::min(share, ahead / kLine - first_line), (share + kc - 1) / kc};
      rows(mr, x + row * ldx + kb, ldx, block, kc, out + row * ldo, ldo, kb == 0,
           last ? bias : nullptr, pf);
      row += mr;
    }
  }
}

// Asks the kernel to back the whole 2 MB pages inside `t` with huge pages (Linux, where
// transparent huge pages are "madvise" or "always"), before anything touches them: a step
// streams every weight once, and with 4 KB pages each 4 KB of the stream took a TLB miss.
// A/B in one process on the Zen 5 (batch 32 over SmolLM2's weights, best of 40): ~3% faster
// in four runs of four. Advice only: where it is refused, the pages stay small.
inline void ask_for_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (start + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// W: float (float32 weights) or uint16_t (bfloat16 weights, by their bits).
template <typename W>
void pack_panels(const W* src, W* dst, int64_t n, int64_t k, int64_t panels) {
  loragate_cpu::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c) {
        const W* row = src + (p * kPanel + c) * k;
        for (int64_t kk = 0; kk < k; ++kk) dst[(p * k + kk) * kPanel + c] = row[kk];
      }
  });
}

at::Tensor pack_weight(const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  weight.device().is_cpu(),
              "pack_weight: a 2-D float32 or bfloat16 CPU weight [out_features, in_features]");
  const auto w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kPanel - 1) / kPanel;
  auto packed = at::empty({panels, k, kPanel}, w.options());
  ask_for_huge_pages(packed);
  packed.zero_();  // columns past n stay 0
  if (dtype == at::kFloat) {
    pack_panels(w.data_ptr<float>(), packed.data_ptr<float>(), n, k, panels);
  } else {
    pack_panels(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>()), n, k, panels);
  }
  return packed;
}

template <typename W>
void run_panels(const float* xp, int64_t ldx, int64_t m, int64_t k, int64_t n, int64_t panels,
                const W* wp, const float* bp, float* yp) {
  // Threads split the panels (each streams its contiguous share of the weight); each walks
  // x in chunks of kRowChunk rows so a chunk stays in L2 while its panels pass.
  loragate_cpu::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float tile[kRowChunk * kPanel];  // the last panel, when n is not a multiple
    alignas(64) float tail_bias[kPanel] = {};     // its bias, zero past n
    const W* stream_end = wp + p1 * k * kPanel;
    for (int64_t m0 = 0; m0 < m; m0 += kRowChunk) {
      const int64_t mlen = std::min(kRowChunk, m - m0);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t col = p * kPanel, width = std::min<int64_t>(kPanel, n - col);
        const W* panel = wp + p * k * kPanel;
        if (width == kPanel) {
          panel_rows(xp + m0 * ldx, ldx, mlen, k, panel, yp + m0 * n + col, n,
                     bp ? bp + col : nullptr, stream_end);
          continue;
        }
        if (bp) std::memcpy(tail_bias, bp + col, width * sizeof(float));
        panel_rows(xp + m0 * ldx, ldx, mlen, k, panel, tile, kPanel, bp ? tail_bias : nullptr,
                   stream_end);
        for (int64_t r = 0; r < mlen; ++r)
          std::memcpy(yp + (m0 + r) * n + col, tile + r * kPanel, width * sizeof(float));
      }
    }
  });
}

// float32: x, weight, bias and y float32. bfloat16 (`--dtype bfloat16`): x, weight, bias and
// y bfloat16; x and bias are widened to float32 (exactly), the sums run in float32 as for
// float32 weights, and y rounds once to bfloat16 (to nearest even, as torch rounds), which is
// torch's bf16 linear's contract (float32 accumulation, one rounding).
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed,
                  const std::optional<at::Tensor>& bias_in, int64_t out_features) {
  const auto dtype = packed.scalar_type();
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  (dtype == at::kFloat || dtype == at::kBFloat16) && packed.device().is_cpu(),
              "linear: packed must come from pack_weight of this build");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == dtype && x_in.device().is_cpu(),
              "linear: x must be a 2-D CPU tensor of the weight's dtype (float32 or bfloat16)");
  const int64_t m = x_in.size(0), k = x_in.size(1), n = out_features, panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == k, "linear: x has ", k, " features, the weight ",
              packed.size(1));
  TORCH_CHECK(k > 0, "linear: in_features must be positive");
  TORCH_CHECK(n > (panels - 1) * kPanel && n <= panels * kPanel,
              "linear: out_features ", n, " does not match the packed weight");
  // Rows may be a wider tensor's columns (the model feeds split views): only unit column
  // stride is needed.
  at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= k ? x_in : x_in.contiguous();
  if (dtype == at::kBFloat16) x = x.to(at::kFloat);
  const int64_t ldx = m > 1 ? x.stride(0) : k;
  // The bias as float32 [n]: a float32 one as it is (no copy on the decode path), a bf16 one
  // widened once per call; the last panel's few values are padded on the stack.
  at::Tensor bias;
  if (bias_in.has_value()) {
    const auto& b = *bias_in;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n && b.scalar_type() == dtype &&
                    b.device().is_cpu(),
                "linear: bias must be a CPU tensor [out_features] of the weight's dtype");
    bias = b.to(at::kFloat).contiguous();
  }
  auto y = at::empty({m, n}, x.options());  // float32
  if (m > 0) {
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    if (dtype == at::kFloat) {
      run_panels(x.data_ptr<float>(), ldx, m, k, n, panels, packed.data_ptr<float>(), bp,
                 y.data_ptr<float>());
    } else {
      run_panels(x.data_ptr<float>(), ldx, m, k, n, panels,
                 reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), bp,
                 y.data_ptr<float>());
    }
  }
  return dtype == at::kFloat ? y : y.to(at::kBFloat16);
}

int64_t panel_width() { return kPanel; }

}  // namespace

TORCH_LIBRARY(loragate_gemm, m) {
  m.def("pack_weight(Tensor weight) -> Tensor", &pack_weight);
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &linear);
  m.def("panel_width() -> int", &panel_width);
}
