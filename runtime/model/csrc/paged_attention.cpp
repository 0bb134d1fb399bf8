// Paged attention on the CPU, read through the block table (no copy of the context).
//
// Semantics, for every listed query i, head h, kv head g = h / (num_heads / num_kv_heads):
//   ctx  = pool rows block_tables[seqs[i]][p / block_size] * block_size + p % block_size,
//          for p in [0, lens[i])
//   out[rows[i], h] = softmax(scale * q[rows[i], h] . k_pool[ctx, g]) @ v_pool[ctx, g]
// Only those rows are read: a row past lens[i] (another tenant's block, a stale or NaN row
// of the sequence's own last block) never enters the sum.
//
// How (decode reads every K/V row once per step, so the job is to stream them at memory speed):
// - Work items are (query, chunk of kChunkTokens positions) over all kv heads of the row, so
//   that a long context keeps every thread busy even for one sequence; the chunks' partial
//   (max, sum, unnormalized acc) are merged afterwards (flash-decoding). The split depends on
//   the lengths only, never on the thread count, so the answer does not either.
// - Threads take items from a shared counter (torch's intra-op pool, no second pool), so
//   ragged lengths do not leave one thread idle behind a long sequence.
// - Blocks are scattered in the pool: the hardware prefetcher, which follows one stream, stalls
//   at each block's start, so the next tile's K and V are prefetched while this one is scored.
//   Even so, scattered 16-row blocks read slower than one stream: on the development VM a bare
//   read of SmolLM2's K/V in that order runs at ~20 GB/s against ~40 GB/s in pool order.
// - Within a tile (at most kTile rows, never crossing a block boundary) the query heads of one
//   kv head (GQA) read its K/V rows from L1, several heads per load where the registers allow
//   (AVX-512); an online softmax rescales the accumulators once per tile.
// Built by runtime/model/paged_attention_cpu.py with -O3 and, per CPU kind, -mavx512* (AVX-512
// path below), -mavx2 -mfma (8-row dot with one hadd tree) or nothing (plain loops written
// with fixed-width lanes so that GCC vectorizes them without -ffast-math).

#include <ATen/ATen.h>
#include "omp_parallel.h"
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "exp_nonpositive.h"

namespace {

using loragate_cpu::exp_nonpositive;

constexpr int64_t kTile = 16;        // rows scored before one softmax rescale
constexpr int64_t kLanes = 16;       // head_dim must be a multiple of this
constexpr int64_t kChunkTokens = 256;  // positions per work item (rounded to whole blocks)
// Scratch is sized at run time; these bounds (also in paged_attention_cpu.py) keep it small.
constexpr int64_t kMaxGroup = 16;  // query heads per kv head
constexpr int64_t kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The running max m, sum l and this tile's rescale c of one head, from the tile's scores
// s[0:n], which become exp(s - new max). NaN scores are skipped by the max (a comparison with
// NaN is false) and carried into the sum, hence into the output.
inline float softmax_update(float* s, int64_t n, float& m, float& l) {
  float mx = m;
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - mx);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += s[j];
  // exp(-inf - mx) would be exp(-87) here, not 0: the first tile sets c = 0 itself.
  const float c = m == kNegInf ? 0.0f : exp_nonpositive(m - mx);
  l = l * c + sum;
  m = mx;
  return c;
}

#if defined(__AVX512F__)

// exp_nonpositive on 16 lanes, the same steps (so the variants agree to rounding). max_ps(a, x)
// answers x where x is NaN, which keeps NaN lanes NaN.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  __m512 t = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  t = _mm512_max_ps(_mm512_set1_ps(-127.0f), t);
  const __m512i n = _mm512_cvttps_epi32(t);
  const __m512 nf = _mm512_cvtepi32_ps(n);
  const __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Lane j of the result: the sum of the 16 lanes of v[j'] where j' = 4 (j % 4) + j / 4; callers
// store row r's partial at that slot and get the scores in row order. Four levels of
// (two shuffles, one add), 45 instructions for 16 horizontal sums instead of 16 x 8.
inline __m512 transpose_sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [v[2i] folded | v[2i+1] folded]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit quarters: one per input, 4 partial lanes each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // pairs of lanes per input
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// Scores of the tile's n <= 16 rows for one head (q already scaled) into s[0:16]; lanes past
// n come out 0 and are never used. Each row's product over head_dim is folded into one vector
// in two FMA chains, then one transpose_sum16 does all 16 horizontal sums.
template <int64_t kDim>
inline void tile_scores(const float* q, const float* k, int64_t row_stride, int64_t n,
                        int64_t dim_rt, float* s) {
  const int64_t dim = kDim > 0 ? kDim : dim_rt;
  __m512 part[16];
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t slot = 4 * (r % 4) + r / 4;
    if (r >= n) {
      part[slot] = _mm512_setzero_ps();
      continue;
    }
    const float* k_r = k + r * row_stride;
    __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k_r));
    __m512 x1 = _mm512_setzero_ps();
    int64_t d = kLanes;
    for (; d + kLanes < dim; d += 2 * kLanes) {
      x1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k_r + d), x1);
      x0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + kLanes), _mm512_loadu_ps(k_r + d + kLanes),
                           x0);
    }
    if (d < dim) x1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k_r + d), x1);
    part[slot] = _mm512_add_ps(x0, x1);
  }
  _mm512_storeu_ps(s, transpose_sum16(part));
}

// tile_scores for kHeads heads of one kv head's group at once (head_dim kVecs * 16): each
// K row is loaded once for all of them, the heads' q held in registers.
template <int kHeads, int kVecs>
inline void group_scores(const float* q, const float* k, int64_t row_stride, int64_t n,
                         float* s) {
  constexpr int64_t dim = kVecs * kLanes;
  __m512 qv[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    for (int x = 0; x < kVecs; ++x) qv[h][x] = _mm512_loadu_ps(q + h * dim + x * kLanes);
  }
  __m512 part[kHeads][16];
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t slot = 4 * (r % 4) + r / 4;
    if (r >= n) {
      for (int h = 0; h < kHeads; ++h) part[h][slot] = _mm512_setzero_ps();
      continue;
    }
    __m512 kv[kVecs];
    for (int x = 0; x < kVecs; ++x) kv[x] = _mm512_loadu_ps(k + r * row_stride + x * kLanes);
    for (int h = 0; h < kHeads; ++h) {  // two chains per head, folded at the end
      __m512 x0 = _mm512_mul_ps(qv[h][0], kv[0]);
      __m512 x1 = kVecs > 1 ? _mm512_mul_ps(qv[h][1], kv[1]) : _mm512_setzero_ps();
      for (int x = 2; x < kVecs; x += 2) {
        x0 = _mm512_fmadd_ps(qv[h][x], kv[x], x0);
        if (x + 1 < kVecs) x1 = _mm512_fmadd_ps(qv[h][x + 1], kv[x + 1], x1);
      }
      part[h][slot] = _mm512_add_ps(x0, x1);
    }
  }
  for (int h = 0; h < kHeads; ++h) _mm512_storeu_ps(s + h * kTile, transpose_sum16(part[h]));
}

// Scores of a group's `heads` query heads (q scaled, [heads, dim]) into s [heads, kTile]:
// head_dim 64 and 128 in blocks of heads sharing each K load (at most 16 q registers),
// other sizes one head at a time.
template <int64_t kDim>
inline void tile_group_scores(const float* q, const float* k, int64_t row_stride, int64_t n,
                              int64_t dim, int64_t heads, float* s) {
  int64_t h = 0;
  if constexpr (kDim == 64) {
    for (; h + 3 <= heads; h += 3) group_scores<3, 4>(q + h * dim, k, row_stride, n, s + h * kTile);
  } else if constexpr (kDim == 128) {
    for (; h + 2 <= heads; h += 2) group_scores<2, 8>(q + h * dim, k, row_stride, n, s + h * kTile);
  }
  for (; h < heads; ++h) tile_scores<kDim>(q + h * dim, k, row_stride, n, dim, s + h * kTile);
}

// softmax_update on 16 lanes (n <= 16 of them valid).
inline float tile_softmax(float* s, int64_t n, float& m, float& l) {
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  const __m512 x = _mm512_loadu_ps(s);
  // max_ps(x, m) answers m where x is NaN: the max skips NaN scores, as the scalar one does.
  const float mx = _mm512_mask_reduce_max_ps(valid, _mm512_max_ps(x, _mm512_set1_ps(m)));
  const __m512 p = _mm512_maskz_mov_ps(valid, exp_nonpositive16(
                                                  _mm512_sub_ps(x, _mm512_set1_ps(mx))));
  _mm512_storeu_ps(s, p);
  const float c = m == kNegInf ? 0.0f : exp_nonpositive(m - mx);
  l = l * c + _mm512_reduce_add_ps(p);
  m = mx;
  return c;
}

// acc[h] = acc[h] * c[h] + sum_j p[h][j] v[j] over kHeads heads and kVecs * 16 dims: the
// accumulators stay in registers over the tile and each V load serves every head.
template <int kHeads, int kVecs>
inline void pv_block(float* acc, int64_t acc_stride, const float* v, int64_t row_stride,
                     const float* p, const float* c, int64_t n) {
  __m512 t[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    const __m512 ch = _mm512_set1_ps(c[h]);
    for (int x = 0; x < kVecs; ++x) {
      t[h][x] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * acc_stride + x * kLanes), ch);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 vj[kVecs];
    for (int x = 0; x < kVecs; ++x) vj[x] = _mm512_loadu_ps(v + j * row_stride + x * kLanes);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * kTile + j]);
      for (int x = 0; x < kVecs; ++x) t[h][x] = _mm512_fmadd_ps(w, vj[x], t[h][x]);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    for (int x = 0; x < kVecs; ++x) _mm512_storeu_ps(acc + h * acc_stride + x * kLanes, t[h][x]);
  }
}

template <int kHeads>
inline void pv_heads(float* acc, int64_t dim, const float* v, int64_t row_stride,
                     const float* p, const float* c, int64_t n) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
    pv_block<kHeads, 4>(acc + d, dim, v + d, row_stride, p, c, n);
  }
  for (; d < dim; d += kLanes) pv_block<kHeads, 1>(acc + d, dim, v + d, row_stride, p, c, n);
}

// P @ V for the `heads` query heads of one kv head: blocks of up to 4 heads x 64 dims, 16
// accumulators, so each V row is loaded once per 4 heads.
inline void tile_pv(float* acc, int64_t dim, const float* v, int64_t row_stride, const float* p,
                    const float* c, int64_t heads, int64_t n) {
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4) {
    pv_heads<4>(acc + h * dim, dim, v, row_stride, p + h * kTile, c + h, n);
  }
  switch (heads - h) {
    case 3: pv_heads<3>(acc + h * dim, dim, v, row_stride, p + h * kTile, c + h, n); break;
    case 2: pv_heads<2>(acc + h * dim, dim, v, row_stride, p + h * kTile, c + h, n); break;
    case 1: pv_heads<1>(acc + h * dim, dim, v, row_stride, p + h * kTile, c + h, n); break;
    default: break;
  }
}

#else  // AVX2 or plain

inline float dot(const float* __restrict a, const float* __restrict b, int64_t dim) {
  float lanes[kLanes] = {};
  for (int64_t d = 0; d < dim; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float s = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kDot8 = true;
// Scores of 8 consecutive rows for one head: 8 independent FMA chains sharing each load of
// q, reduced together by one hadd tree instead of 8 horizontal sums (those cost as much as
// the FMAs at head_dim 64). dim: a multiple of 8.
inline void dot8(const float* q, const float* k, int64_t row_stride, int64_t dim, float* out) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int r = 0; r < 8; ++r) {
      acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + r * row_stride + d), acc[r]);
    }
  }
  // t0 = [row r's low-half sums for r < 4 | their high-half sums], t1 the same for r >= 4.
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                      _mm256_permute2f128_ps(t0, t1, 0x31)));
}
#else
constexpr bool kDot8 = false;
inline void dot8(const float*, const float*, int64_t, int64_t, float*) {}
#endif

template <int64_t kDim>
inline void tile_scores(const float* q, const float* k, int64_t row_stride, int64_t n,
                        int64_t dim_rt, float* s) {
  const int64_t dim = kDim > 0 ? kDim : dim_rt;
  int64_t j = 0;
  if (kDot8) {
    for (; j + 8 <= n; j += 8) dot8(q, k + j * row_stride, row_stride, dim, s + j);
  }
  for (; j < n; ++j) s[j] = dot(q, k + j * row_stride, dim);
}

inline float tile_softmax(float* s, int64_t n, float& m, float& l) {
  return softmax_update(s, n, m, l);
}

template <int64_t kDim>
inline void tile_group_scores(const float* q, const float* k, int64_t row_stride, int64_t n,
                              int64_t dim, int64_t heads, float* s) {
  for (int64_t h = 0; h < heads; ++h) {
    tile_scores<kDim>(q + h * dim, k, row_stride, n, dim, s + h * kTile);
  }
}

// acc[0:W] = acc[0:W] * c + sum_j p[j] * v[j * row_stride + 0:W], held in registers over
// the tile's rows, so acc is loaded and stored once per tile. W = 64 gives 8 independent FMA
// chains on AVX2: with one chain per 8 floats, the FMA latency, not the loads, set the pace.
template <int64_t W>
inline void pv_chunk(float* __restrict acc, const float* __restrict v, const float* p, float c,
                     int64_t n, int64_t row_stride) {
  float t[W];
  for (int64_t x = 0; x < W; ++x) t[x] = acc[x] * c;
  for (int64_t j = 0; j < n; ++j) {
    const float w = p[j];
    const float* v_j = v + j * row_stride;
    for (int64_t x = 0; x < W; ++x) t[x] += w * v_j[x];
  }
  for (int64_t x = 0; x < W; ++x) acc[x] = t[x];
}

inline void tile_pv(float* acc, int64_t dim, const float* v, int64_t row_stride, const float* p,
                    const float* c, int64_t heads, int64_t n) {
  for (int64_t h = 0; h < heads; ++h) {
    float* acc_h = acc + h * dim;
    const float* p_h = p + h * kTile;
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) pv_chunk<64>(acc_h + d, v + d, p_h, c[h], n, row_stride);
    for (; d < dim; d += kLanes) pv_chunk<kLanes>(acc_h + d, v + d, p_h, c[h], n, row_stride);
  }
}

#endif

struct Args {
  const float* q;          // [num_tokens, num_heads, head_dim]
  const float* k_pool;     // [pool_rows, num_kv_heads, head_dim]
  const float* v_pool;     // [pool_rows, num_kv_heads, head_dim]
  const int32_t* tables;   // [num_seqs, max_blocks]
  const int32_t* rows;     // [num_queries]
  const int32_t* seqs;     // [num_queries]
  const int32_t* lens;     // [num_queries]
  float* out;              // [num_tokens, num_heads, head_dim]
  int64_t max_blocks, block_size, num_heads, num_kv_heads, group, dim;
  float scale;
};

// Scratch of one thread: scaled q, then per head acc [dim], m, l, c and a tile's scores.
struct Scratch {
  float *qs, *acc, *m, *l, *c, *s;
  static int64_t floats(int64_t heads, int64_t dim) { return heads * (2 * dim + 3 + kTile); }
  Scratch(float* base, int64_t heads, int64_t dim)
      : qs(base), acc(qs + heads * dim), m(acc + heads * dim), l(m + heads), c(l + heads),
        s(c + heads) {}
};

// GCC 12 at -O1 and up deleted a loop of nothing but __builtin_prefetch here as dead code
// (the sliced loop below; a plain 0..bytes loop survived), so on x86 the instruction is
// spelled out where no optimizer can drop it.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Asks for the `part`-th of `parts` slices of rows [first, first + n) of both pools (whole
// rows: every kv head) to be brought to L1 while the current tile is computed. In slices:
// a tile's worth of prefetches at once (2 x 12 KB at SmolLM2's shapes) fills the core's miss
// buffers and stalls it until they drain.
inline void prefetch_rows(const Args& a, int64_t first, int64_t n, int64_t part, int64_t parts) {
  const int64_t row_floats = a.num_kv_heads * a.dim;
  const char* k = reinterpret_cast<const char*>(a.k_pool + first * row_floats);
  const char* v = reinterpret_cast<const char*>(a.v_pool + first * row_floats);
  const int64_t lines = (n * row_floats * static_cast<int64_t>(sizeof(float)) + 63) / 64;
  for (int64_t b = lines * part / parts * 64; b < lines * (part + 1) / parts * 64; b += 64) {
    prefetch_line(k + b);
    prefetch_line(v + b);
  }
}

// Query i's heads over positions [p0, p1): leaves the unnormalized acc, the max m and the sum
// l of every head in `w`. Each tile walks the kv heads in turn, the group's query heads reading
// that kv head's K (then V) slice of the tile from L1.
template <int64_t kDim>
void attend(const Args& a, int64_t i, int64_t p0, int64_t p1, const Scratch& w) {
  const int64_t dim = kDim > 0 ? kDim : a.dim;
  const int64_t group = a.group, heads = a.num_heads;
  const int32_t* table = a.tables + a.seqs[i] * a.max_blocks;
  const int64_t row_stride = a.num_kv_heads * dim;
  const float* q = a.q + a.rows[i] * a.num_heads * dim;
  for (int64_t x = 0; x < heads * dim; ++x) {
    w.qs[x] = q[x] * a.scale;
    w.acc[x] = 0.0f;
  }
  for (int64_t h = 0; h < heads; ++h) {
    w.m[h] = kNegInf;
    w.l[h] = 0.0f;
  }
  auto tile_at = [&](int64_t p, int64_t& n) {  // first pool row and length of the tile at p
    const int64_t offset = p % a.block_size;
    n = std::min({kTile, a.block_size - offset, p1 - p});
    return static_cast<int64_t>(table[p / a.block_size]) * a.block_size + offset;
  };
  // This tile (first, n) and the next (next, next_n), prefetched in slices while this one is
  // computed (on the development VM, batch 8 x 2048 over 30 layers' pools: ~20% off the
  // kernel's time; two tiles ahead, or into L2 only, did no better). next_n = 0: none.
  int64_t n = 0;
  int64_t first = tile_at(p0, n);
  for (int64_t p = p0; p < p1;) {
    int64_t next_n = 0;
    const int64_t next = p + n < p1 ? tile_at(p + n, next_n) : 0;
    const float* k = a.k_pool + first * row_stride;
    const float* v = a.v_pool + first * row_stride;
    const int64_t parts = 2 * a.num_kv_heads;  // slices of the next tile's prefetch
    for (int64_t g = 0; g < a.num_kv_heads; ++g) {
      const int64_t h0 = g * group;
      if (next_n > 0) prefetch_rows(a, next, next_n, 2 * g, parts);
      tile_group_scores<kDim>(w.qs + h0 * dim, k + g * dim, row_stride, n, dim, group,
                              w.s + h0 * kTile);
      for (int64_t h = h0; h < h0 + group; ++h) {
        w.c[h] = tile_softmax(w.s + h * kTile, n, w.m[h], w.l[h]);
      }
      if (next_n > 0) prefetch_rows(a, next, next_n, 2 * g + 1, parts);
      tile_pv(w.acc + h0 * dim, dim, v + g * dim, row_stride, w.s + h0 * kTile, w.c + h0,
              group, n);
    }
    p += n;
    first = next;
    n = next_n;
  }
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& block_tables, const at::Tensor& rows,
                     const at::Tensor& seqs, const at::Tensor& lens, at::Tensor& out,
                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(),
              "q [tokens, heads, dim], k_pool and v_pool [rows, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  v_pool.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  out.is_contiguous() && out.sizes() == q.sizes(),
              "contiguous q, pools and out of q's shape");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt &&
                  block_tables.is_contiguous(),
              "block_tables: contiguous int32 [num_seqs, max_blocks]");
  for (const at::Tensor* t : {&rows, &seqs, &lens}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->is_contiguous() &&
                    t->size(0) == rows.size(0),
                "rows, seqs, lens: contiguous int32 [num_queries]");
  }
  const int64_t dim = q.size(2), heads = q.size(1), kv_heads = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0 &&
                  heads / kv_heads <= kMaxGroup && dim % kLanes == 0 && dim <= kMaxHeadDim,
              "head_dim a multiple of 16 up to 256, heads a multiple of kv_heads (<= 16x)");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  const int64_t num_queries = rows.size(0);
  // Bounds checked here, in plain loops (a few thousand ints; tensor reductions would cost
  // more than that per layer), so that the kernel's reads stay inside q and the pools
  // whatever the caller passed.
  const int32_t* r = rows.data_ptr<int32_t>();
  const int32_t* sq = seqs.data_ptr<int32_t>();
  const int32_t* ln = lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < num_queries; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < q.size(0), "rows out of range");
    TORCH_CHECK(sq[i] >= 0 && sq[i] < block_tables.size(0), "seqs out of range");
    TORCH_CHECK(ln[i] >= 1 && ln[i] <= block_tables.size(1) * block_size,
                "lens must be in [1, max_blocks * block_size]");
  }
  const int32_t* tb = block_tables.data_ptr<int32_t>();
  const int64_t num_blocks = k_pool.size(0) / block_size;
  for (int64_t x = 0; x < block_tables.numel(); ++x) {
    TORCH_CHECK(tb[x] >= 0 && tb[x] < num_blocks, "block_tables point outside the pool");
  }
  const Args a{q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),
               tb, r, sq, ln, out.data_ptr<float>(), block_tables.size(1), block_size, heads,
               kv_heads, heads / kv_heads, dim, static_cast<float>(scale)};

  // Items: query i's chunk c covers positions [c * chunk, min(len, (c + 1) * chunk)).
  // first_item[i]: query i's first item; a query with one item writes `out` directly, the
  // others leave partials (acc [heads, dim], then m [heads], l [heads]) to merge.
  const int64_t chunk = std::max<int64_t>(1, kChunkTokens / block_size) * block_size;
  std::vector<int64_t> first_item(num_queries + 1, 0);
  for (int64_t i = 0; i < num_queries; ++i) {
    first_item[i + 1] = first_item[i] + (ln[i] + chunk - 1) / chunk;
  }
  const int64_t num_items = first_item[num_queries];
  const int64_t partial_floats = heads * (dim + 2);
  std::vector<float> partials(num_items > num_queries ? num_items * partial_floats : 0);
  // item -> query, so that a thread taking item x finds its query without a search.
  std::vector<int32_t> item_query(num_items);
  for (int64_t i = 0; i < num_queries; ++i) {
    std::fill(item_query.begin() + first_item[i], item_query.begin() + first_item[i + 1],
              static_cast<int32_t>(i));
  }

  std::atomic<int64_t> next_item{0};
  const int64_t workers = std::min<int64_t>(loragate_cpu::max_threads(), num_items);
  loragate_cpu::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(Scratch::floats(heads, dim));
    const Scratch w(buf.data(), heads, dim);
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t item; (item = next_item.fetch_add(1, std::memory_order_relaxed)) < num_items;) {
        const int64_t i = item_query[item], c = item - first_item[i];
        const int64_t p0 = c * chunk, p1 = std::min<int64_t>(ln[i], p0 + chunk);
        if (dim == 64) {
          attend<64>(a, i, p0, p1, w);
        } else if (dim == 128) {
          attend<128>(a, i, p0, p1, w);
        } else {
          attend<0>(a, i, p0, p1, w);
        }
        if (first_item[i + 1] - first_item[i] == 1) {
          float* o = a.out + r[i] * heads * dim;
          for (int64_t h = 0; h < heads; ++h) {
            const float inv = 1.0f / w.l[h];  // a non-empty range: l >= 1 (exp(0) of its max)
            for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = w.acc[h * dim + d] * inv;
          }
        } else {
          float* part = partials.data() + item * partial_floats;
          std::memcpy(part, w.acc, heads * dim * sizeof(float));
          std::memcpy(part + heads * dim, w.m, heads * sizeof(float));
          std::memcpy(part + heads * (dim + 1), w.l, heads * sizeof(float));
        }
      }
    }
  });
  if (partials.empty()) return;

  // Merge each split query's chunks: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M),
  // M the max of the m_c, in chunk order (the answer does not depend on who ran what). A NaN
  // in any chunk reaches the output through its l_c and acc_c.
  loragate_cpu::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(first_item[num_queries]);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = first_item[i], c1 = first_item[i + 1];
      if (c1 - c0 == 1) continue;
      float* o = a.out + r[i] * heads * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float mx = kNegInf;
        for (int64_t c = c0; c < c1; ++c) {
          mx = std::max(mx, partials[c * partial_floats + heads * dim + h]);
        }
        float sum = 0.0f;
        for (int64_t c = c0; c < c1; ++c) {
          const float* part = partials.data() + c * partial_floats;
          weight[c] = std::exp(part[heads * dim + h] - mx);
          sum += part[heads * (dim + 1) + h] * weight[c];
        }
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < dim; ++d) {
          float x = 0.0f;
          for (int64_t c = c0; c < c1; ++c) {
            x += partials[c * partial_floats + h * dim + d] * weight[c];
          }
          o[h * dim + d] = x * inv;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(loragate, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor rows, Tensor seqs, Tensor lens, Tensor(a!) out, int block_size, float scale) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(loragate, CPU, m) { m.impl("paged_attention", paged_attention); }
