// The dense LoRA term of one projection on the CPU: kernels/torch_lora.py add_lora_dense.
//
// Semantics (width = a_pack rows / num_slices, off_j = sum of the slice sizes before j):
//   for every token t and pack column c with mask[t, c] != 0, j = c / width:
//     h = mask[t, c] * (x[t] . a_pack[c])
//     y[t, off_j : off_j + n_j] += h * b_pack[c, off_j : off_j + n_j]
// which is y += ((x @ a_pack.T) * mask) @ b_pack for the block-diagonal b_pack that
// pack_dense builds, without its waste: the torch form runs every token against every
// active adapter's columns (most of the mask is 0) and b_pack's zero blocks, in three MKL
// calls per projection whose small-GEMM overhead dominates a decode step's LoRA cost. Columns
// with a zero mask are never read here, so a non-finite value in another adapter's rows
// cannot reach a token (0 * inf is NaN in the torch form), and a token without an adapter
// leaves its row of y untouched, bit for bit.
//
// How: a scan of the mask lists each token's nonzero columns, and tokens with the same list
// (in a decode step: the tokens of one adapter) are taken up to kTokens at a time, so that
// each load of that adapter's rows of a_pack and b_pack serves all of them (read once per
// group from L2, not once per token). Groups are split over the calling thread's OpenMP team
// (omp_parallel.h: torch's pool, no second one). Per group and slice, the h of the nonzero
// columns (at most kGroup at a time) are computed first, a few columns per pass over x so that each
// load of x serves several; then one pass over the output slice adds sum_i h_i *
// b_pack[c_i] into y, the sums held in registers: one load and store of y per group of
// columns, float32 throughout. Every sum runs in one order whatever the group and the
// thread count, so a token's answer depends on its own inputs only.
// Built by kernels/torch_lora.py through kernels/native.py with -O3 and, per CPU kind,
// -mavx512* (16-lane intrinsics), -mavx2 -mfma (8 lanes) or nothing (plain 8-lane loops
// that GCC vectorizes without -ffast-math).

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include "omp_parallel.h"
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kRegisters = 32;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vset1(float s) { return _mm512_set1_ps(s); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
constexpr int kRegisters = 16;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vset1(float s) { return _mm256_set1_ps(s); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
constexpr int64_t kLanes = 8;
constexpr int kRegisters = 8;  // 16 SSE registers, two per Vec
struct Vec {
  float l[kLanes];
};
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) {
  Vec v;
  for (int64_t i = 0; i < kLanes; ++i) v.l[i] = p[i];
  return v;
}
inline void vstore(float* p, const Vec& v) {
  for (int64_t i = 0; i < kLanes; ++i) p[i] = v.l[i];
}
inline Vec vset1(float s) {
  Vec v;
  for (int64_t i = 0; i < kLanes; ++i) v.l[i] = s;
  return v;
}
inline Vec vfma(const Vec& a, const Vec& b, const Vec& c) {
  Vec v;
  for (int64_t i = 0; i < kLanes; ++i) v.l[i] = a.l[i] * b.l[i] + c.l[i];
  return v;
}
inline Vec vadd(const Vec& a, const Vec& b) {
  Vec v;
  for (int64_t i = 0; i < kLanes; ++i) v.l[i] = a.l[i] + b.l[i];
  return v;
}
inline float vsum(const Vec& v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v.l[i];
  return s;
}
#endif

constexpr int kTokens = 4;    // tokens of one column pattern computed together
constexpr int kGroup = 64;    // columns whose h are held for one pass over y
constexpr int64_t kMinWork = 1 << 16;  // multiply-adds per parallel chunk, at least

// Columns per pass over x (shrink) and vectors of y per pass over the columns (expand) for
// G tokens at once: G x R accumulators plus the G x loads (G x V plus V b loads) and one
// operand, within the vector registers, at most 8.
template <int G> constexpr int kCols = std::max(1, std::min(8, (kRegisters - G - 1) / G));
template <int G> constexpr int kVecs = std::max(1, std::min(8, (kRegisters - 1) / (G + 1)));

// dot[g][at + r] = x[g] . rows[r] for g < G, r < R, over `in` elements: each load of a row of
// a_pack serves G tokens, each load of x serves R columns. Every (g, r) sum is accumulated in
// the same order whatever G and R, so a token's answer does not depend on its group.
template <int G, int R>
inline void dots(const float* const* x, const float* const* rows, int64_t in,
                 float (*dot)[kGroup], int at) {
  Vec acc[G][R];
  for (int g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) acc[g][r] = vzero();
  }
  int64_t d = 0;
  for (; d + kLanes <= in; d += kLanes) {
    Vec xv[G];
    for (int g = 0; g < G; ++g) xv[g] = vload(x[g] + d);
    for (int r = 0; r < R; ++r) {
      const Vec av = vload(rows[r] + d);
      for (int g = 0; g < G; ++g) acc[g][r] = vfma(xv[g], av, acc[g][r]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) {
      float s = vsum(acc[g][r]);
      for (int64_t e = d; e < in; ++e) s += x[g][e] * rows[r][e];
      dot[g][at + r] = s;
    }
  }
}

// dots<G, n> for a run-time n in 1..R.
template <int G, int R>
inline void dots_upto(int n, const float* const* x, const float* const* rows, int64_t in,
                      float (*dot)[kGroup], int at) {
  if (n == R) {
    dots<G, R>(x, rows, in, dot, at);
  } else if constexpr (R > 1) {
    dots_upto<G, R - 1>(n, x, rows, in, dot, at);
  }
}

// h[g][i] *= x[g] . rows[i] for g < G, i < k.
template <int G>
inline void shrink(const float* const* x, const float* const* rows, int64_t in, int k,
                   float (*h)[kGroup]) {
  float dot[G][kGroup];
  for (int i = 0; i < k; i += kCols<G>) {
    dots_upto<G, kCols<G>>(std::min(kCols<G>, k - i), x, rows + i, in, dot, i);
  }
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < k; ++i) h[g][i] *= dot[g][i];
  }
}

// y[g][o : o + V * kLanes] += sum_i h[g][i] * rows[i][o : ...] for g < G, the sums in
// registers (one load and store of y), each load of b_pack serving G tokens.
template <int G, int V>
inline void expand_block(float* const* y, const float* const* rows, const float (*h)[kGroup],
                         int k, int64_t o) {
  Vec acc[G][V];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) acc[g][v] = vzero();
  }
  for (int i = 0; i < k; ++i) {
    Vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = vload(rows[i] + o + v * kLanes);
    for (int g = 0; g < G; ++g) {
      const Vec hv = vset1(h[g][i]);
      for (int v = 0; v < V; ++v) acc[g][v] = vfma(hv, bv[v], acc[g][v]);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      float* yo = y[g] + o + v * kLanes;
      vstore(yo, vadd(vload(yo), acc[g][v]));
    }
  }
}

// expand_block<G, n> for a run-time n in 1..V.
template <int G, int V>
inline void expand_upto(int64_t n, float* const* y, const float* const* rows,
                        const float (*h)[kGroup], int k, int64_t o) {
  if (n == V) {
    expand_block<G, V>(y, rows, h, k, o);
  } else if constexpr (V > 1) {
    expand_upto<G, V - 1>(n, y, rows, h, k, o);
  }
}

// y[g][0:n] += sum_i h[g][i] * rows[i][0:n] for g < G, i < k. Which lanes are vectors and
// which scalar depends on n only, so a token's answer does not depend on G.
template <int G>
inline void expand(float* const* y, const float* const* rows, const float (*h)[kGroup], int k,
                   int64_t n) {
  constexpr int64_t kStep = kVecs<G> * kLanes;
  int64_t o = 0;
  for (; o + kStep <= n; o += kStep) expand_block<G, kVecs<G>>(y, rows, h, k, o);
  if (const int64_t rest = (n - o) / kLanes; rest > 0) {
    expand_upto<G, kVecs<G>>(rest, y, rows, h, k, o);
    o += rest * kLanes;
  }
  for (; o < n; ++o) {
    for (int g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int i = 0; i < k; ++i) s += h[g][i] * rows[i][o];
      y[g][o] += s;
    }
  }
}

// The pack's shapes and the nonzero columns of every token's mask row.
struct Problem {
  float* y;
  const float* x;
  const float* a;
  const float* b;
  const float* mask;
  int64_t in, out, cols, width, num_slices;
  std::vector<int64_t> offsets;  // [num_slices + 1] output offset of each slice
  std::vector<int32_t> nz;       // nonzero columns of token t: nz[nz_start[t] : nz_start[t + 1]]
  std::vector<int64_t> nz_start;  // [num_tokens + 1]
};

// The G tokens t[0:G], whose masks have the same nonzero columns, slice by slice.
template <int G>
void run_group(const Problem& p, const int32_t* t) {
  const float* x[G];
  float* y[G];
  for (int g = 0; g < G; ++g) {
    x[g] = p.x + t[g] * p.in;
    y[g] = p.y + t[g] * p.out;
  }
  const int32_t* cols = p.nz.data() + p.nz_start[t[0]];
  const int32_t* cols_end = p.nz.data() + p.nz_start[t[0] + 1];
  const float* a_rows[kGroup];
  const float* b_rows[kGroup];
  float h[G][kGroup];
  float* y_off[G];
  while (cols < cols_end) {
    const int64_t j = *cols / p.width;  // nz is ascending: one slice's columns are a run
    const int64_t off = p.offsets[j], n = p.offsets[j + 1] - off;
    int k = 0;
    for (; cols < cols_end && k < kGroup && *cols / p.width == j; ++cols, ++k) {
      a_rows[k] = p.a + *cols * p.in;
      b_rows[k] = p.b + *cols * p.out + off;
      for (int g = 0; g < G; ++g) h[g][k] = p.mask[t[g] * p.cols + *cols];
    }
    shrink<G>(x, a_rows, p.in, k, h);
    for (int g = 0; g < G; ++g) y_off[g] = y[g] + off;
    expand<G>(y_off, b_rows, h, k, n);
  }
}

void add_lora_dense_float(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pack,
                          const at::Tensor& b_pack, const at::Tensor& mask,
                          at::IntArrayRef slice_sizes) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a_pack.dim() == 2 && b_pack.dim() == 2 &&
                  mask.dim() == 2,
              "add_lora_dense: y [tokens, out], x [tokens, in], a_pack [slices * width, in], "
              "b_pack [slices * width, out] and mask [tokens, slices * width] must be 2-D");
  const at::Tensor* all[] = {&y, &x, &a_pack, &b_pack, &mask};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "add_lora_dense: float32 tensors only, got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "add_lora_dense: CPU tensors only");
    TORCH_CHECK(t->is_contiguous(), "add_lora_dense: contiguous tensors only");
  }
  const int64_t num_tokens = y.size(0), out = y.size(1), in = x.size(1);
  const int64_t cols = a_pack.size(0);
  const int64_t num_slices = static_cast<int64_t>(slice_sizes.size());
  TORCH_CHECK(x.size(0) == num_tokens && mask.size(0) == num_tokens,
              "add_lora_dense: y, x and mask must have one row per token, got ", num_tokens,
              ", ", x.size(0), " and ", mask.size(0));
  TORCH_CHECK(a_pack.size(1) == in, "add_lora_dense: a_pack has in=", a_pack.size(1),
              ", x has ", in);
  TORCH_CHECK(b_pack.size(0) == cols && mask.size(1) == cols,
              "add_lora_dense: a_pack, b_pack and mask must share the ", cols,
              " pack columns, got b_pack ", b_pack.size(0), " and mask ", mask.size(1));
  TORCH_CHECK(b_pack.size(1) == out, "add_lora_dense: b_pack has ", b_pack.size(1),
              " outputs, y ", out);
  TORCH_CHECK(num_slices > 0 && cols % num_slices == 0, "add_lora_dense: the ", cols,
              " pack columns are not num_slices (", num_slices, ") x width");
  TORCH_CHECK(num_tokens < (int64_t{1} << 31) && cols < (int64_t{1} << 31),
              "add_lora_dense: too many tokens or pack columns");
  Problem p;
  p.offsets.assign(num_slices + 1, 0);
  for (int64_t j = 0; j < num_slices; ++j) {
    TORCH_CHECK(slice_sizes[j] > 0, "add_lora_dense: slice sizes must be positive, got ",
                slice_sizes);
    p.offsets[j + 1] = p.offsets[j] + slice_sizes[j];
    TORCH_CHECK(p.offsets[j + 1] <= out, "add_lora_dense: slice sizes ", slice_sizes,
                " exceed y's ", out, " outputs");
  }
  TORCH_CHECK(p.offsets[num_slices] == out, "add_lora_dense: slice sizes ", slice_sizes,
              " must sum to y's ", out, " outputs");
  for (const at::Tensor* t : all) {
    if (t != &y) at::assert_no_overlap(y, *t);
  }
  if (num_tokens == 0 || cols == 0) return;

  p.y = y.data_ptr<float>();
  p.x = x.data_ptr<float>();
  p.a = a_pack.data_ptr<float>();
  p.b = b_pack.data_ptr<float>();
  p.mask = mask.data_ptr<float>();
  p.in = in;
  p.out = out;
  p.cols = cols;
  p.width = cols / num_slices;
  p.num_slices = num_slices;
  // Each token's nonzero columns (a scan of the mask, small beside the products), then the
  // tokens grouped by that pattern, kTokens at most per group: tokens of one adapter share
  // their pattern, and a group reads the adapter's rows once for all of them.
  p.nz_start.assign(num_tokens + 1, 0);
  std::vector<int32_t> order;
  int64_t work = 0;  // multiply-adds in all
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* mt = p.mask + t * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (mt[c] != 0.0f) {  // NaN counts as nonzero: it propagates, as in the torch form
        p.nz.push_back(static_cast<int32_t>(c));
        const int64_t j = c / p.width;
        work += in + p.offsets[j + 1] - p.offsets[j];
      }
    }
    p.nz_start[t + 1] = static_cast<int64_t>(p.nz.size());
    if (p.nz_start[t + 1] > p.nz_start[t]) order.push_back(static_cast<int32_t>(t));
  }
  if (order.empty()) return;
  const auto pattern_less = [&p](int32_t u, int32_t v) {
    const int32_t* nz = p.nz.data();
    return std::lexicographical_compare(nz + p.nz_start[u], nz + p.nz_start[u + 1],
                                        nz + p.nz_start[v], nz + p.nz_start[v + 1]);
  };
  std::stable_sort(order.begin(), order.end(), pattern_less);
  std::vector<int64_t> groups;  // start of each group in order; a sentinel at the end
  for (size_t i = 0; i < order.size();) {
    size_t run = i + 1;
    while (run < order.size() && !pattern_less(order[i], order[run])) ++run;
    for (; i < run; i = std::min(i + kTokens, run)) groups.push_back(static_cast<int64_t>(i));
  }
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  groups.push_back(static_cast<int64_t>(order.size()));
  // Chunks of at least kMinWork multiply-adds, so that a thread's share outweighs the
  // pool's wake-up.
  const int64_t grain = std::max<int64_t>(1, kMinWork * num_groups / std::max<int64_t>(1, work));
  loragate_cpu::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* t = order.data() + groups[i];
      switch (std::min<int64_t>(kTokens, groups[i + 1] - groups[i])) {
        case 4: run_group<4>(p, t); break;
        case 3: run_group<3>(p, t); break;
        case 2: run_group<2>(p, t); break;
        default: run_group<1>(p, t); break;
      }
    }
  });
}

// The op. float32 throughout, or (--dtype bfloat16) bfloat16 y and x with the float32 packs
// and mask: the sums then run in float32 into a zeroed term that is added to y once, one
// rounding to bfloat16 per element, as the torch form's y.add_(h @ b_pack) rounds.
void add_lora_dense(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pack,
                    const at::Tensor& b_pack, const at::Tensor& mask,
                    at::IntArrayRef slice_sizes) {
  if (y.scalar_type() != at::kBFloat16) {
    add_lora_dense_float(y, x, a_pack, b_pack, mask, slice_sizes);
    return;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16,
              "add_lora_dense: a bfloat16 y takes a bfloat16 x, got ", x.scalar_type());
  TORCH_CHECK(y.dim() == 2 && y.device().is_cpu() && y.is_contiguous(),
              "add_lora_dense: y must be a contiguous 2-D CPU tensor");
  at::assert_no_overlap(y, x);
  at::Tensor term = at::zeros(y.sizes(), y.options().dtype(at::kFloat));
  add_lora_dense_float(term, x.to(at::kFloat), a_pack, b_pack, mask, slice_sizes);
  y.add_(term);
}

}  // namespace

TORCH_LIBRARY(loragate_kernels, m) {
  m.def("add_lora_dense(Tensor(a!) y, Tensor x, Tensor a_pack, Tensor b_pack, Tensor mask, "
        "int[] slice_sizes) -> ()");
}

TORCH_LIBRARY_IMPL(loragate_kernels, CPU, m) { m.impl("add_lora_dense", add_lora_dense); }
