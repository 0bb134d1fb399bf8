// Paged attention on the CPU, read through the block table (no copy of the context).
//
// One work item per (query row, kv head): the query heads that share that kv head (GQA)
// walk the sequence's blocks together, so each K/V row is loaded once for all of them, with
// an online softmax over tiles of at most kTile rows that never cross a block boundary.
// Semantics, for every listed query i, head h, kv head g = h / (num_heads / num_kv_heads):
//   ctx  = pool rows block_tables[seqs[i]][p / block_size] * block_size + p % block_size,
//          for p in [0, lens[i])
//   out[rows[i], h] = softmax(scale * q[rows[i], h] . k_pool[ctx, g]) @ v_pool[ctx, g]
// Only those rows are read: a row past lens[i] (another tenant's block, a stale or NaN row
// of the sequence's own last block) never enters the sum. Work items are spread over
// torch's intra-op pool (at::parallel_for), so no second thread pool exists.
// Built by runtime/model/paged_attention_cpu.py with -O3 (plus -mavx2 -mfma where the CPU has
// them); the inner loops are written with fixed-width lanes so that GCC vectorizes them
// without -ffast-math.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 16;       // rows scored before one softmax rescale
constexpr int64_t kLanes = 16;      // head_dim must be a multiple of this
// Scratch is sized at run time; these bounds (also in paged_attention_cpu.py) keep it small.
constexpr int64_t kMaxGroup = 16;  // query heads per kv head
constexpr int64_t kMaxHeadDim = 256;

// exp(x) for x <= 0 (every argument here is a score minus a running max), ~2 ulp: x = n ln2 + r
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

inline float dot(const float* __restrict a, const float* __restrict b, int64_t dim) {
  float lanes[kLanes] = {};
  for (int64_t d = 0; d < dim; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float s = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
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

struct Args {
  const float* q;          // [num_tokens, num_heads, head_dim]
  const float* k_pool;     // [pool_rows, num_kv_heads, head_dim]
  const float* v_pool;     // [pool_rows, num_kv_heads, head_dim]
  const int32_t* tables;   // [num_seqs, max_blocks]
  const int32_t* rows;     // [num_queries]
  const int32_t* seqs;     // [num_queries]
  const int32_t* lens;     // [num_queries]
  float* out;              // [num_tokens, num_heads, head_dim]
  int64_t max_blocks, block_size, num_heads, num_kv_heads, group;
  float scale;
};

// One query's heads of kv heads [g0, g1), into `scratch` (see `scratch_floats`). Walking all
// kv heads of a row in one item reads each block as one contiguous run (block_size rows of
// num_kv_heads * head_dim floats), which the hardware prefetcher streams; an item per kv head
// read a strided third of each row and ran at half the bandwidth (SmolLM2, 3 kv heads).
// kDim > 0: head_dim known at compile time (fully unrolled lanes); 0: `dim` at run time.
template <int64_t kDim>
void attend(const Args& a, int64_t i, int64_t g0, int64_t g1, int64_t dim_rt, float* scratch) {
  const int64_t dim = kDim > 0 ? kDim : dim_rt;
  const int64_t len = a.lens[i], group = a.group, heads = (g1 - g0) * group;
  const int32_t* table = a.tables + a.seqs[i] * a.max_blocks;
  const int64_t row_stride = a.num_kv_heads * dim;
  const float* q = a.q + (a.rows[i] * a.num_heads + g0 * group) * dim;
  float* qs = scratch;            // [heads, dim] scaled q
  float* acc = qs + heads * dim;  // [heads, dim]
  float* m = acc + heads * dim;   // [heads] running max
  float* l = m + heads;           // [heads] running sum
  float* c = l + heads;           // [heads] this tile's rescale
  float* s = c + heads;           // [heads, kTile] scores, then probabilities
  for (int64_t x = 0; x < heads * dim; ++x) {
    qs[x] = q[x] * a.scale;
    acc[x] = 0.0f;
  }
  for (int64_t h = 0; h < heads; ++h) {
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.0f;
  }
  for (int64_t p = 0; p < len;) {
    const int64_t offset = p % a.block_size;
    const int64_t n = std::min({kTile, a.block_size - offset, len - p});
    const int64_t first = static_cast<int64_t>(table[p / a.block_size]) * a.block_size + offset;
    const float* k = a.k_pool + first * row_stride + g0 * dim;
    const float* v = a.v_pool + first * row_stride + g0 * dim;
    for (int64_t h = 0; h < heads; ++h) {  // head outer: its q stays in registers
      const float* k_h = k + (h / group) * dim;
      int64_t j = 0;
      if (kDot8) {
        for (; j + 8 <= n; j += 8) {
          dot8(qs + h * dim, k_h + j * row_stride, row_stride, dim, s + h * kTile + j);
        }
      }
      for (; j < n; ++j) s[h * kTile + j] = dot(qs + h * dim, k_h + j * row_stride, dim);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* s_h = s + h * kTile;
      float mx = m[h];
      for (int64_t j = 0; j < n; ++j) mx = s_h[j] > mx ? s_h[j] : mx;
      for (int64_t j = 0; j < n; ++j) s_h[j] = exp_nonpositive(s_h[j] - mx);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += s_h[j];
      // exp(-inf - mx) would be exp(-87) here, not 0: the first tile sets c = 0 itself.
      c[h] = m[h] == -std::numeric_limits<float>::infinity() ? 0.0f : exp_nonpositive(m[h] - mx);
      l[h] = l[h] * c[h] + sum;
      m[h] = mx;
    }
    // acc_h = acc_h * c + P_h @ V.
    for (int64_t h = 0; h < heads; ++h) {
      float* acc_h = acc + h * dim;
      const float* v_h = v + (h / group) * dim;
      const float* s_h = s + h * kTile;
      int64_t d = 0;
      for (; d + 64 <= dim; d += 64) pv_chunk<64>(acc_h + d, v_h + d, s_h, c[h], n, row_stride);
      for (; d < dim; d += kLanes) pv_chunk<kLanes>(acc_h + d, v_h + d, s_h, c[h], n, row_stride);
    }
    p += n;
  }
  float* o = a.out + (a.rows[i] * a.num_heads + g0 * group) * dim;
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = 1.0f / l[h];  // len >= 1: l >= 1 (the max row contributes exp(0))
    for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = acc[h * dim + d] * inv;
  }
}

int64_t scratch_floats(int64_t heads, int64_t dim) { return heads * (2 * dim + 3 + kTile); }

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
               block_tables.data_ptr<int32_t>(), rows.data_ptr<int32_t>(),
               seqs.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<float>(),
               block_tables.size(1), block_size, heads, kv_heads, heads / kv_heads,
               static_cast<float>(scale)};
  // Items of whole rows unless there are too few queries to keep every thread busy (one
  // long sequence): then each query's kv heads are split into `parts` items.
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = (2 * threads + num_queries - 1) / std::max<int64_t>(1, num_queries);
  const int64_t parts = std::min(kv_heads, std::max<int64_t>(1, wanted));
  const int64_t per_part = (kv_heads + parts - 1) / parts;
  at::parallel_for(0, num_queries * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats(per_part * a.group, dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / parts, g0 = (item % parts) * per_part;
      const int64_t g1 = std::min(kv_heads, g0 + per_part);
      if (g0 >= g1) continue;
      if (dim == 64) {
        attend<64>(a, i, g0, g1, dim, scratch.data());
      } else if (dim == 128) {
        attend<128>(a, i, g0, g1, dim, scratch.data());
      } else {
        attend<0>(a, i, g0, g1, dim, scratch.data());
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
