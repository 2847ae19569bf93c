// y[M, N] = x[M, K] . w[N, K]^T in float32 for XLA:CPU, through the XLA FFI.
//
// The weights keep Hugging Face's [out, in] layout; each w tile is read once
// from memory and reused from L1 by all the rows, the output columns are
// split over XLA's intra-op thread pool, and while a tile is in use the next
// one is prefetched into L2 (the rows sharing that out). For the few rows of
// a decode step XLA:CPU's dot runs at a fraction of the machine's arithmetic
// rate; two register tilings beat it (scripts/bench_cpu_matmul.py --native):
//
// - up to kDotMaxRows rows (`DotProduct`): K in vector lanes, a tile of 2
//   rows of x by 8 rows of w as sixteen vectors of partial dot products,
//   summed across lanes at the end: with so few rows the product is bound by
//   reading w, which this streams in whole cache lines;
// - more rows (`Product`): x is first transposed into blocks of 16 * MV rows
//   ([K][rows], the last block zero-padded) and rows sit in vector lanes: a
//   tile of one block by NR rows of w accumulates over K with one broadcast
//   element of w per row and k, every FMA's other operand a vector of x's
//   block, and nothing is summed across lanes. Ten vector loads per sixteen
//   FMAs in the first tiling, one load and eight broadcasts per sixteen
//   here: at 32 rows 115.8 -> 158.5 GFLOP/s, at 48 rows (one block of three
//   vectors) 127 -> 179. The tile is transposed back in registers and
//   stored a row at a time.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kDotMaxRows = 8;  // up to here K in lanes (DotProduct), then rows in lanes
constexpr int kNR = 8;  // rows of w (output columns) per tile
constexpr int kMR = 2;  // rows of x per tile

// cols(NR, n, end) for output columns [n, n + NR): tiles of NR, then the last
// N % NR in tiles of 4 (N is a multiple of 4), in chunks enough for every
// thread; `end` is the end of the chunk (where the next-tile prefetch stops).
template <int NR, typename F>
void ParallelColumns(ffi::ThreadPool& pool, int64_t N, F cols) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = N / NR;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, threads * 4));
  jpaged::ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t t1 = tiles * (c + 1) / chunks;
    for (int64_t t = tiles * c / chunks; t < t1; ++t)
      cols(std::integral_constant<int, NR>{}, t * NR, t1 * NR);
    if (c == chunks - 1)
      for (int64_t n = tiles * NR; n < N; n += 4) cols(std::integral_constant<int, 4>{}, n, N);
  });
}

#if defined(__AVX512F__)
// Sixteen vectors a[0..15] -> one vector whose lane l is the sum of a[l]'s
// lanes: pairs within 128-bit lanes, then across them (45 instructions where
// sixteen horizontal sums take about 160).
inline __m512 SumEach16(const __m512* a) {
  __m512 b[8], c[4];
  for (int p = 0; p < 8; ++p)
    b[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]),
                         _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  for (int q = 0; q < 4; ++q) {
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * q]),
                                          _mm512_castps_pd(b[2 * q + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * q]),
                                          _mm512_castps_pd(b[2 * q + 1]));
    c[q] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // c[q]'s 128-bit lane L holds lane L's partial sums of a[4q .. 4q + 3].
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One tile: y[m0 : m0 + MR, n0 : n0 + NR] from K-long rows (MR * NR <= 16),
// prefetching `npf` K-long rows from `pf` into L2 on the way.
template <int MR, int NR>
inline void DotTile(const float* x, const float* w, float* y, int64_t K, int64_t N,
                 const float* pf, int npf) {
  static_assert(MR * NR <= 16, "one vector of sums per tile");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int p = 0; p < npf; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(pf + p * K + k), _MM_HINT_T1);
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i * NR + j] = _mm512_fmadd_ps(xv[i], wv, acc[i * NR + j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i * NR + j] = _mm512_fmadd_ps(xv[i], wv, acc[i * NR + j]);
    }
  }
  const __m512 sums = SumEach16(acc);  // lane i * NR + j: y[i][j]
  alignas(64) float out[16];
  _mm512_store_ps(out, sums);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * N + j] = out[i * NR + j];
}
#else
template <int MR, int NR>
inline void DotTile(const float* x, const float* w, float* y, int64_t K, int64_t N,
                    const float*, int) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += x[i * K + k] * w[j * K + k];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * N + j] = acc[i][j];
}
#endif

// Output columns [n, n + NR) for every row of x: kMR rows at a time, the
// w tile (NR x K) reused from L1 by each; the row tiles share out the
// prefetch of the `next` rows of w (the next tile's, up to `end`).
template <int NR>
void DotColumns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                int64_t n, int64_t end) {
  const float* wn = w + n * K;
  const int64_t next = std::max<int64_t>(0, std::min<int64_t>(NR, end - n - NR));
  const int64_t tiles = (M + kMR - 1) / kMR, per = (next + tiles - 1) / tiles;
  int64_t m = 0, t = 0;
  auto share = [&](int64_t t) {  // the first of this row tile's prefetched rows, and how many
    const int64_t r0 = std::min(next, t * per);
    return std::pair<const float*, int>(wn + (NR + r0) * K,
                                        static_cast<int>(std::min(per, next - r0)));
  };
  for (; m + kMR <= M; m += kMR, ++t) {
    const auto [pf, npf] = share(t);
    DotTile<kMR, NR>(x + m * K, wn, y + m * N + n, K, N, pf, npf);
  }
  if (m < M) {  // kMR is 2: one row left
    const auto [pf, npf] = share(t);
    DotTile<1, NR>(x + m * K, wn, y + m * N + n, K, N, pf, npf);
  }
}

// The product with K in vector lanes, for M up to kDotMaxRows.
void DotProduct(ffi::ThreadPool& pool, const float* xp, const float* wp, float* yp, int64_t M,
                int64_t K, int64_t N) {
  ParallelColumns<kNR>(pool, N, [&](auto nr, int64_t n, int64_t end) {
    DotColumns<decltype(nr)::value>(xp, wp, yp, M, K, N, n, end);
  });
}

constexpr int kLanes = 16;
constexpr int kBlockRows = 3 * kLanes;  // rows of x per block (Product)
constexpr int kPrefetchMaxBlocks = 4;  // blocks of x up to which tiles prefetch w

#if defined(__AVX512F__)
// Sixteen rows r[0..15] of sixteen values -> c[j] = column j (the rows'
// element j), by unpacks within 128-bit lanes, then 128-bit lane shuffles.
inline void Transpose16(const __m512* r, __m512* c) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + j.
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d e = _mm512_castps_pd(t[4 * i + 2]), f = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, e));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, e));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, f));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, f));
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);  // columns j, 8 + j; rows 0-7
    t[4 + j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);  // columns 4 + j, 12 + j
    t[8 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);  // the same, rows 8-15
    t[12 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    c[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    c[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    c[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// acc[i][j] = the sum over k of vector i of a transposed block xt [K][MV * 16]
// times element k of w's row j: row j starts at w + j * K, and for kSplit
// (the fused MLP's gate/up tiles) the second half of the rows `gap` further
// on. Prefetches rows [p0, p0 + np) of the next tile (based at `pf`,
// addressed the same way) into L2, once per 16 steps of k.
template <int MV, int NR, bool kSplit>
inline void Accumulate(const float* xt, const float* w, int64_t K, int64_t gap, const float* pf,
                       int p0, int np, __m512 (&acc)[MV][NR]) {
  constexpr int kMB = MV * kLanes;
  auto row = [&](int j) { return j * K + (kSplit && j >= NR / 2 ? gap : 0); };
  for (int i = 0; i < MV; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K; kb += kLanes) {
    for (int p = p0; p < p0 + np; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(pf + row(p) + kb), _MM_HINT_T1);
    const int64_t ke = std::min<int64_t>(K, kb + kLanes);
    const float* xk = xt + kb * kMB;
    for (int64_t k = kb; k < ke; ++k, xk += kMB) {
      __m512 xv[MV];
      for (int i = 0; i < MV; ++i) xv[i] = _mm512_load_ps(xk + kLanes * i);
      for (int j = 0; j < NR; ++j) {
        const __m512 b = _mm512_set1_ps(w[row(j) + k]);
        for (int i = 0; i < MV; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], b, acc[i][j]);
      }
    }
  }
}

// One tile: y[0 : rows, 0 : NR] (row stride N) from a transposed block xt
// [K][MV * 16] and NR K-long rows of w.
template <int MV, int NR>
inline void Tile(const float* xt, const float* w, float* y, int64_t K, int64_t N, int64_t rows,
                 const float* pf, int p0, int np) {
  __m512 acc[MV][NR];
  Accumulate<MV, NR, false>(xt, w, K, 0, pf, p0, np, acc);
  // Each vector of sixteen rows is transposed in registers and stored a row
  // (NR contiguous columns) at a time: sixteen stores where element by
  // element took 16 * NR, each to another row (at 512 rows and 3072 columns
  // 158 -> 213 GFLOP/s).
  for (int i = 0; i < MV; ++i) {
    const int64_t n = std::min<int64_t>(kLanes, rows - kLanes * i);
    __m512 r[kLanes], c[kLanes];
    for (int j = 0; j < kLanes; ++j) r[j] = j < NR ? acc[i][j] : _mm512_setzero_ps();
    Transpose16(r, c);
    float* yi = y + kLanes * i * N;
    for (int64_t l = 0; l < n; ++l) {
      if constexpr (NR == 16) _mm512_storeu_ps(yi + l * N, c[l]);
      else if constexpr (NR == 8) _mm256_storeu_ps(yi + l * N, _mm512_castps512_ps256(c[l]));
      else if constexpr (NR == 4) _mm_storeu_ps(yi + l * N, _mm512_castps512_ps128(c[l]));
      else static_assert(NR == 4 || NR == 8 || NR == 16, "a tile is 4, 8 or 16 columns");
    }
  }
}

// e^x on every lane, x clamped to [-87, 88]: 2^n times a degree-6 polynomial
// on [-ln2/2, ln2/2]; relative error about 2e-7.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// One gate/up tile of the fused MLP: intermediate columns [c, c + C) of a
// block, silu(x . gate) * (x . up), stored transposed ([C][MV * 16] at h):
// the layout in which the down projection reads its rows. w is gate row c;
// up row c is `gap` + C rows further on.
template <int MV, int C>
inline void GateUpTile(const float* xt, const float* w, int64_t gap, float* h, int64_t K,
                       const float* pf, int p0, int np) {
  constexpr int kMB = MV * kLanes;
  __m512 acc[MV][2 * C];
  Accumulate<MV, 2 * C, true>(xt, w, K, gap, pf, p0, np, acc);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < MV; ++i)
    for (int q = 0; q < C; ++q) {
      const __m512 g = acc[i][q];  // silu(g) = g / (1 + e^-g)
      const __m512 e = Exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
      _mm512_store_ps(h + q * kMB + kLanes * i, _mm512_mul_ps(silu, acc[i][C + q]));
    }
}
#else
template <int MV, int NR>
inline void Tile(const float* xt, const float* w, float* y, int64_t K, int64_t N, int64_t rows,
                 const float*, int, int) {
  constexpr int kMB = MV * kLanes;
  float acc[kMB][NR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < kMB; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += xt[k * kMB + i] * w[j * K + k];
  for (int64_t i = 0; i < std::min<int64_t>(kMB, rows); ++i)
    for (int j = 0; j < NR; ++j) y[i * N + j] = acc[i][j];
}

template <int MV, int C>
inline void GateUpTile(const float* xt, const float* w, int64_t gap, float* h, int64_t K,
                       const float*, int, int) {
  constexpr int kMB = MV * kLanes;
  for (int q = 0; q < C; ++q)
    for (int i = 0; i < kMB; ++i) {
      float g = 0.0f, u = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        g += xt[k * kMB + i] * w[q * K + k];
        u += xt[k * kMB + i] * w[(C + q) * K + gap + k];
      }
      h[q * kMB + i] = g / (1.0f + std::exp(-g)) * u;
    }
}
#endif

// Calls tile(mv, b, rows, p0, np) for every block b of x: M / 48 blocks of
// three vectors of rows (mv), then one of the M % 48 left, if any, in as
// few vectors as hold them. The blocks share out the prefetch of the next
// tile's `next` rows of w: block b takes rows [p0, p0 + np).
template <typename F>
void ForBlocks(int64_t M, int64_t next, F tile) {
  const int64_t full = M / kBlockRows, rest = M % kBlockRows;
  const int64_t blocks = full + (rest > 0);
  // With many blocks a tile computes long enough for the hardware to fetch
  // the next one unaided, and prefetching costs (the fused MLP at 512 rows:
  // 208 -> 214 GFLOP/s without it; at 96 rows 206 -> 195).
  if (blocks > kPrefetchMaxBlocks) next = 0;
  const int64_t per = (next + blocks - 1) / blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    const int p0 = static_cast<int>(std::min(next, b * per));
    const int np = static_cast<int>(std::min(per, next - p0));
    const int64_t rows = b < full ? kBlockRows : rest;
    if (rows <= kLanes)
      tile(std::integral_constant<int, 1>{}, b, rows, p0, np);
    else if (rows <= 2 * kLanes)
      tile(std::integral_constant<int, 2>{}, b, rows, p0, np);
    else
      tile(std::integral_constant<int, 3>{}, b, rows, p0, np);
  }
}

// Output columns [n, n + NR) for every block of x, the w tile (NR x K)
// reused from L1 by each (16 columns only for up to 16 rows: one vector).
template <int NR>
void Columns(const float* xt, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n, int64_t end) {
  const float* wn = w + n * K;
  const int64_t next = std::max<int64_t>(0, std::min<int64_t>(NR, end - n - NR));
  ForBlocks(M, next, [&](auto mv, int64_t b, int64_t rows, int p0, int np) {
    constexpr int MV = decltype(mv)::value;
    if constexpr (MV * NR <= 24)
      Tile<MV, NR>(xt + b * K * kBlockRows, wn, y + b * kBlockRows * N + n, K, N, rows,
                   wn + NR * K, p0, np);
  });
}

// The fused MLP's intermediate columns [c, c + C) for every block of x,
// into the transposed blocks of h ([I][48] each, the last [I][its rows]).
// gate_up is [2I, K]: the gate rows, then the up rows.
template <int C>
void GateUpColumns(const float* xt, const float* gate_up, float* ht, int64_t M, int64_t K,
                   int64_t I, int64_t c, int64_t end) {
  const float* wc = gate_up + c * K;
  const int64_t gap = (I - C) * K;  // tile row j >= C: up column c + j - C
  const int64_t next = end - c >= 2 * C ? 2 * C : 0;  // the next tile's rows, if whole
  ForBlocks(M, next, [&](auto mv, int64_t b, int64_t rows, int p0, int np) {
    constexpr int MV = decltype(mv)::value;
    if constexpr (MV * 2 * C <= 24)
      GateUpTile<MV, C>(xt + b * K * kBlockRows, wc, gap,
                        ht + b * I * kBlockRows + c * MV * kLanes, K, wc + C * K, p0, np);
  });
}

// x [M, K] -> blocks of `mb` rows (a multiple of 16), each [K][mb],
// zero-padded past row M.
#if defined(__AVX512F__)
void Transpose(const float* x, float* xt, int64_t M, int64_t K, int64_t mb) {
  const int64_t padded = (M + mb - 1) / mb * mb;
  for (int64_t m0 = 0; m0 < padded; m0 += kLanes) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kLanes, M - m0));
    float* dst = xt + m0 / mb * K * mb + m0 % mb;
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t kn = std::min<int64_t>(kLanes, K - k0);
      const __mmask16 mask = static_cast<__mmask16>((1u << kn) - 1);
      __m512 r[kLanes], c[kLanes];
      for (int i = 0; i < kLanes; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, x + (m0 + i) * K + k0)
                        : _mm512_setzero_ps();
      Transpose16(r, c);
      for (int64_t j = 0; j < kn; ++j) _mm512_storeu_ps(dst + (k0 + j) * mb, c[j]);
    }
  }
}
#else
void Transpose(const float* x, float* xt, int64_t M, int64_t K, int64_t mb) {
  const int64_t blocks = (M + mb - 1) / mb;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t m0 = b * mb, rows = std::min(mb, M - m0);
    float* dst = xt + b * K * mb;
    for (int64_t k = 0; k < K; ++k, dst += mb)
      for (int64_t i = 0; i < mb; ++i) dst[i] = i < rows ? x[(m0 + i) * K + k] : 0.0f;
  }
}
#endif

// x transposed into blocks (full 48-row blocks, then the M % 48 rows left in
// as few vectors as hold them), in a buffer of the calling thread, reused by
// its later calls (no allocation, nor page faults, per step) and aligned to
// a cache line: each step of k loads whole lines of it. `slot` picks one of
// two buffers (the fused MLP holds x's and h's at once).
float* TransposedBlocks(const float* x, int64_t M, int64_t K, int slot) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& buffer = buffers[slot];
  const int64_t full = M / kBlockRows, rest = M % kBlockRows;
  const int64_t tail = (rest + kLanes - 1) / kLanes * kLanes;  // rows of the last block
  const int64_t need = (full * kBlockRows + tail) * K + kLanes;
  if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
  float* xt = buffer.data();
  xt += (kLanes - reinterpret_cast<uintptr_t>(xt) / sizeof(float) % kLanes) % kLanes;
  if (x != nullptr) {
    Transpose(x, xt, full * kBlockRows, K, kBlockRows);
    if (rest) Transpose(x + full * kBlockRows * K, xt + full * kBlockRows * K, rest, K, tail);
  }
  return xt;
}

// ParallelColumns in tiles of kOne columns for up to 16 rows (one vector of
// them: a tile may be wider), else of kMore.
template <int kOne, int kMore, typename F>
void ParallelColumnsFor(ffi::ThreadPool& pool, int64_t M, int64_t N, F cols) {
  if (M <= kLanes)
    ParallelColumns<kOne>(pool, N, cols);
  else
    ParallelColumns<kMore>(pool, N, cols);
}

// y = x . w^T from x's transposed blocks.
void ProductOfBlocks(ffi::ThreadPool& pool, const float* xt, const float* w, float* y,
                     int64_t M, int64_t K, int64_t N) {
  ParallelColumnsFor<16, 8>(pool, M, N, [&](auto nr, int64_t n, int64_t end) {
    Columns<decltype(nr)::value>(xt, w, y, M, K, N, n, end);
  });
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("expected x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (N % 4) return ffi::Error::InvalidArgument("N must be a multiple of 4");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (M <= kDotMaxRows)
    DotProduct(pool, xp, wp, yp, M, K, N);
  else
    ProductOfBlocks(pool, TransposedBlocks(xp, M, K, 0), wp, yp, M, K, N);
  return ffi::Error::Success();
}

// The MLP of Llama-family models, y = (silu(x . gate^T) * (x . up^T)) . down^T,
// in two passes over x's transposed blocks: the gate/up tiles leave h in
// the transposed blocks the down projection reads, so h is never written
// row by row, transposed again, nor passed through a separate silu * up.
ffi::Error Mlp(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gate_up,
               ffi::Buffer<ffi::F32> down, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), gd = gate_up.dimensions(), dd = down.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || dd.size() != 2 || gd[1] != xd[1] || gd[0] % 2 ||
      dd[1] != gd[0] / 2)
    return ffi::Error::InvalidArgument("expected x [M, K], gate_up [2I, K] and down [N, I]");
  const int64_t M = xd[0], K = xd[1], I = gd[0] / 2, N = dd[0];
  if (I % 4 || N % 4) return ffi::Error::InvalidArgument("I and N must be multiples of 4");
  if (M == 0) return ffi::Error::Success();
  const float* xt = TransposedBlocks(x.typed_data(), M, K, 0);
  float* ht = TransposedBlocks(nullptr, M, I, 1);
  const float* gu = gate_up.typed_data();
  ParallelColumnsFor<8, 4>(pool, M, I, [&](auto cc, int64_t c, int64_t end) {
    GateUpColumns<decltype(cc)::value>(xt, gu, ht, M, K, I, c, end);
  });
  ProductOfBlocks(pool, ht, down.typed_data(), y->typed_data(), M, I, N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedCpuMatmulNT, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedCpuMlp, Mlp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate_up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // down
                                  .Ret<ffi::Buffer<ffi::F32>>());
