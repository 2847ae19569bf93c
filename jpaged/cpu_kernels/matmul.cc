// y[M, N] = x[M, K] . w[N, K]^T in float32 for XLA:CPU, through the XLA FFI.
//
// The weights keep Hugging Face's [out, in] layout. For the few rows of a
// decode step (M up to a few dozen) XLA:CPU's dot runs at about half the
// machine's arithmetic rate; here a register tile of kMR rows of x by kNR rows
// of w accumulates kMR x kNR sixteen-wide dot products over K, each w tile
// (kNR x K) is read once from memory and reused from L1 by every row tile,
// and the output columns are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNR = 4;  // rows of w (output columns) per tile
constexpr int kMR = 6;  // rows of x per tile

#if defined(__AVX512F__)
// One tile: y[m0 : m0 + MR, n0 : n0 + kNR] from K-long rows.
template <int MR>
inline void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  __m512 acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[kNR];
    for (int j = 0; j < kNR; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[kNR];
    for (int j = 0; j < kNR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#else
template <int MR>
inline void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  float acc[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] += x[i * K + k] * w[j * K + k];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) y[i * N + j] = acc[i][j];
}
#endif

// Output columns [n0, n1) (n1 - n0 a multiple of kNR) for every row of x.
void Columns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kNR) {
    const float* wn = w + n * K;
    int64_t m = 0;
    for (; m + kMR <= M; m += kMR) Tile<kMR>(x + m * K, wn, y + m * N + n, K, N);
    const float* xm = x + m * K;
    float* ym = y + m * N + n;
    switch (M - m) {
      case 5: Tile<5>(xm, wn, ym, K, N); break;
      case 4: Tile<4>(xm, wn, ym, K, N); break;
      case 3: Tile<3>(xm, wn, ym, K, N); break;
      case 2: Tile<2>(xm, wn, ym, K, N); break;
      case 1: Tile<1>(xm, wn, ym, K, N); break;
      default: break;
    }
  }
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("expected x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (N % kNR) return ffi::Error::InvalidArgument("N must be a multiple of 4");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // Chunks of columns: enough for every thread, each a multiple of kNR.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = N / kNR;
  const int64_t chunks = std::min<int64_t>(tiles, threads * 4);
  jpaged::ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t t0 = tiles * c / chunks, t1 = tiles * (c + 1) / chunks;
    Columns(xp, wp, yp, M, K, N, t0 * kNR, t1 * kNR);
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
