// y[M, N] = x[M, K] . w[N, K]^T in float32 for XLA:CPU, through the XLA FFI.
//
// The weights keep Hugging Face's [out, in] layout. For the few rows of a
// decode step (M up to a few dozen) XLA:CPU's dot runs at a fraction of the
// machine's arithmetic rate; here a register tile of kMR rows of x by kNR rows
// of w accumulates kMR x kNR sixteen-wide dot products over K (summed at the
// end into one vector by a transposing reduction), each w tile (kNR x K) is
// read once from memory and reused from L1 by every row tile, and the output
// columns are split over XLA's intra-op thread pool. While the row tiles work
// on one w tile they prefetch the next into L2 (each a share of its rows), so
// that reading the weights from memory overlaps the arithmetic instead of
// stalling the first row tile (scripts/bench_cpu_matmul.py --native: 1.3x at
// 8 rows on one thread, 1.08x at 32).

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNR = 8;  // rows of w (output columns) per tile
constexpr int kMR = 2;  // rows of x per tile

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
inline void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N,
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
inline void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N,
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
void Columns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
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
    Tile<kMR, NR>(x + m * K, wn, y + m * N + n, K, N, pf, npf);
  }
  if (m < M) {  // kMR is 2: one row left
    const auto [pf, npf] = share(t);
    Tile<1, NR>(x + m * K, wn, y + m * N + n, K, N, pf, npf);
  }
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
  // Tiles of kNR output columns (and one of 4 if N is not a multiple of
  // kNR), in chunks: enough for every thread.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = N / kNR, rest = N % kNR;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, threads * 4));
  jpaged::ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t t1 = tiles * (c + 1) / chunks;
    for (int64_t t = tiles * c / chunks; t < t1; ++t)
      Columns<kNR>(xp, wp, yp, M, K, N, t * kNR, t1 * kNR);
    if (rest && c == chunks - 1) Columns<4>(xp, wp, yp, M, K, N, tiles * kNR, N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedCpuMatmulNT, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>());
