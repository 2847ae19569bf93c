// Paged attention for XLA:CPU, called through the XLA FFI (jax.ffi.ffi_call).
//
// The contract is that of jpaged.pallas_kernels.attention.reference: q is
// [T, H, D]; the caches are [num_blocks, block_size, KVH, D]; sequence s owns
// query tokens [query_start_loc[s], query_start_loc[s + 1]) and a context of
// context_lens[s] tokens whose last q_len are its own query tokens (causal).
// Tokens past query_start_loc[S], and sequences with no context, give zeros.
//
// Why a native kernel: XLA cannot fuse a gather into a dot, so attention in
// XLA copies every context chunk out of the cache (with a transpose to put
// the head axis first) before multiplying it, about three times the memory
// traffic of reading the cache once. Here each work item walks its
// sequence's blocks in place, with an online softmax in float32; items are
// spread over XLA's intra-op thread pool, the costliest first. Two kinds:
//
// - a prefill tile (`AttendTile`): one KV head and up to kTileRows rows
//   (query tokens x the heads of its group), kept in vector lanes: Q is
//   transposed once per item to [D][rows], so a score is a broadcast K
//   element times a vector of rows, the softmax runs on vectors of rows,
//   and P.V is a broadcast V element times a vector of P; nothing of the
//   cache is transposed;
// - a few rows (`AttendRows`: decodes, short chunks), for every KV head of
//   the sequence at once, so each cache block is read whole; scores are
//   dot products straight from the cache, two
//   rows x eight positions summed at once.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kJ = 16;        // context positions scored at once (AttendRows)
constexpr int kL = 16;        // float lanes of a vector
constexpr int kTileRows = 64; // rows (query tokens x heads of a group) per work item
constexpr int kTileJ = 32;    // context positions scored at once (AttendTile)

typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));

inline float Load(const float* p) { return *p; }
inline float Load(const uint16_t* p) {  // bfloat16
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void Store(float* p, float x) { *p = x; }
inline void Store(uint16_t* p, float x) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) {
    *p = 0x7fc0;
    return;
  }
  bits += 0x7fff + ((bits >> 16) & 1);
  *p = static_cast<uint16_t>(bits >> 16);
}

// Sixteen vectors -> one whose lane i is the sum of a[i]'s lanes: four
// rounds of pairwise sums of neighbouring lanes across two vectors (45
// instructions, where sixteen separate horizontal sums take about 160).
inline VF Sum16(const VF* a) {
  const VI even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const VI odd = even + 1;
  VF b[8];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) +
           __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
  for (int n = 4; n >= 1; n /= 2)
    for (int i = 0; i < n; ++i)
      b[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], even) +
             __builtin_shuffle(b[2 * i], b[2 * i + 1], odd);
  return b[0];
}

// op over a vector's lanes (a sum or a max), by halving.
template <typename Op>
inline float Fold(VF v, Op op) {
  v = op(v, __builtin_shuffle(v, VI{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = op(v, __builtin_shuffle(v, VI{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = op(v, __builtin_shuffle(v, VI{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = op(v, __builtin_shuffle(v, VI{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}

inline VF LoadV(const float* p) {  // any alignment
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct Item {
  int32_t seq, kv_head, first;  // first query token (absolute index)
  int32_t count;                // query tokens in this tile
  int32_t num_kv;               // KV heads from kv_head on (AttendRows: all of them)
};

struct Shape {
  int64_t tokens, heads, head_dim, block_size, kv_heads, max_blocks;
  float scale;
  int64_t window;  // 0: no sliding window
};

constexpr float kMasked = -1e30f;

// (VF{} + x would add 0.0 to x first: -0.0 + 0.0 is not -0.0.)
inline VF Splat(float x) { return VF{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
// Keeps v in a register: the compiler would otherwise fold its load into every
// FMA that uses it, loading it once per use (loads, not FMAs, would bound the
// loop).
inline void InRegister(VF& v) {
#if defined(__GNUC__)
  asm("" : "+v"(v));
#endif
}
inline VF Max(VF a, VF b) { return a > b ? a : b; }

// e^x for x <= 0 (scores minus their running max), on every lane: 2^n times
// a degree-6 polynomial on [-ln2/2, ln2/2] (n rounded by adding and
// subtracting 1.5 * 2^23); relative error about 2e-7. Below -87 it returns
// about 1.6e-38 (masked scores are kMasked).
inline VF ExpV(VF x) {
  x = Max(x, Splat(-87.0f));
  const VF big = Splat(12582912.0f);
  const VF n = (x * 1.44269504088896341f + big) - big;
  const VF r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  VF p = Splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * reinterpret_cast<const VF&>(bits);
}

// A few rows (decodes, short chunks) of every KV head of a sequence, R at a
// time, each K and V row read once for all R, straight from the cache
// (bfloat16 is widened once per chunk). A decode reads each cache block
// whole (all heads, contiguous): its context was last read a step ago, so it
// comes from memory, not from a cache. Scores:
// two rows x eight positions as sixteen vectors of partial dot products over
// D, summed at once by `Sum16`.
template <typename T, int D>
void AttendRows(const Shape& sh, const Item& it, const T* q, const T* k_cache, const T* v_cache,
                const int32_t* block_tables, int32_t ctx, int32_t q_len, int32_t q_start,
                T* out) {
  constexpr int R = 4;
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t g = sh.heads / sh.kv_heads, bs = sh.block_size, nkv = it.num_kv;
  // Each KV head's rows, padded to a multiple of R: its row r is query token
  // it.first + r / g, head (kv_head + head) * g + r % g; padding rows have a
  // position (-2^30) that sees no context.
  const int64_t per_head = it.count * g, hp = (per_head + R - 1) / R * R, padded = nkv * hp;
  std::vector<float> qs(padded * D, 0.0f), acc(padded * D, 0.0f), m(padded, kMasked),
      l(padded, 0.0f);
  std::vector<int32_t> pos(padded, -(1 << 30));
  std::vector<float> widened(kF32 ? 0 : 2 * kJ * nkv * D);  // bfloat16 K and V of a chunk
  const float* kr[kJ];  // position jj's K row of the first head (head x: x * D on)
  const float* vr[kJ];
  for (int64_t x = 0; x < nkv; ++x)
    for (int64_t r = 0; r < per_head; ++r) {
      const int64_t t = it.first + r / g, h = (it.kv_head + x) * g + r % g;
      const T* src = q + (t * sh.heads + h) * D;
      for (int d = 0; d < D; ++d) qs[(x * hp + r) * D + d] = Load(src + d) * sh.scale;
      pos[x * hp + r] = ctx - q_len + static_cast<int32_t>(t - q_start);
    }
  const int64_t last = std::min<int64_t>(pos[per_head - 1] + 1, ctx);  // causal reach
  int64_t lo = 0;
  if (sh.window > 0) lo = std::max<int64_t>(0, pos[0] - sh.window + 1);
  auto row_base = [&](int64_t j) {  // the cache offset of position j, first head
    const int64_t phys = block_tables[it.seq * sh.max_blocks + j / bs];
    return ((phys * bs + j % bs) * sh.kv_heads + it.kv_head) * D;
  };
  for (int64_t j0 = lo; j0 < last; j0 += kJ) {
    const int n = static_cast<int>(std::min<int64_t>(kJ, last - j0));
    if constexpr (kF32) {
      // The next chunk's K and V rows, from memory into L2 while this one
      // computes: a block spans pages, where the hardware's prefetch stops
      // (30 layers of 32 decodes at context 160, cold: 18.8 -> 15.0 ms).
      const int64_t j1 = std::min<int64_t>(last, j0 + 2 * kJ);
      for (int64_t j = j0 + kJ; j < j1; ++j) {
        const int64_t base = row_base(j);
        for (int64_t x = 0; x < nkv * D; x += kL) {
          __builtin_prefetch(k_cache + base + x, 0, 2);
          __builtin_prefetch(v_cache + base + x, 0, 2);
        }
      }
    }
    for (int jj = 0; jj < kJ; ++jj) {  // positions past n repeat the first (masked)
      const int64_t base = row_base(j0 + (jj < n ? jj : 0));
      if constexpr (kF32) {
        kr[jj] = k_cache + base;
        vr[jj] = v_cache + base;
      } else {
        float* kw = widened.data() + jj * nkv * D;
        float* vw = widened.data() + (kJ + jj) * nkv * D;
        for (int64_t x = 0; x < nkv * D; ++x) {
          kw[x] = Load(k_cache + base + x);
          vw[x] = Load(v_cache + base + x);
        }
        kr[jj] = kw;
        vr[jj] = vw;
      }
    }
    for (int64_t r0 = 0; r0 < padded; r0 += R) {
      const int64_t off = r0 / hp * D;  // this row group's KV head
      // Position range each row sees in this chunk: [a, e).
      int a[R], e[R];
      bool any = false;
      for (int r = 0; r < R; ++r) {
        int64_t lo_r = j0, hi_r = std::min<int64_t>(j0 + n, int64_t{pos[r0 + r]} + 1);
        if (sh.window > 0) lo_r = std::max<int64_t>(lo_r, pos[r0 + r] - sh.window + 1);
        a[r] = static_cast<int>(lo_r - j0);
        e[r] = static_cast<int>(std::max(hi_r, lo_r) - j0);
        any |= e[r] > a[r];
      }
      if (!any) continue;
      alignas(64) float sc[R][kJ];
      const float* qr = qs.data() + r0 * D;
      for (int r = 0; r < R; r += 2)
        for (int j1 = 0; j1 < kJ; j1 += 8) {
          VF part[16] = {};  // [0, 8): row r, positions j1 + i; [8, 16): row r + 1
          for (int d = 0; d < D; d += kL) {
            VF q0 = LoadV(qr + r * D + d), q1 = LoadV(qr + (r + 1) * D + d);
            InRegister(q0);
            InRegister(q1);
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) {
              const VF kv = LoadV(kr[j1 + i] + off + d);
              part[i] += q0 * kv;
              part[8 + i] += q1 * kv;
            }
          }
          alignas(64) float sums[kL];
          const VF total = Sum16(part);
          std::memcpy(sums, &total, sizeof sums);
          std::memcpy(&sc[r][j1], sums, 8 * sizeof(float));
          std::memcpy(&sc[r + 1][j1], sums + 8, 8 * sizeof(float));
        }
      float* ar = acc.data() + r0 * D;
      static_assert(kJ == kL, "a row's chunk of scores is one vector");
      const VI lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      for (int r = 0; r < R; ++r) {
        VF sv = LoadV(sc[r]);
        sv = (lane >= a[r]) & (lane < e[r]) ? sv : Splat(kMasked);
        const float m_new = std::max(m[r0 + r], Fold(sv, [](VF x, VF y) { return Max(x, y); }));
        const float corr = ExpV(Splat(m[r0 + r] - m_new))[0];
        sv = ExpV(sv - m_new);
        std::memcpy(sc[r], &sv, sizeof sv);
        const float sum = Fold(sv, [](VF x, VF y) { return x + y; });
        for (int d = 0; d < D; ++d) ar[r * D + d] *= corr;
        l[r0 + r] = l[r0 + r] * corr + sum;
        m[r0 + r] = m_new;
      }
      // acc += P V, 64 columns at a time: an R x 64 tile in registers over the
      // chunk, each V row loaded and each probability broadcast once.
      constexpr int DV = (D < 64 ? D : 64) / kL;
      for (int d0 = 0; d0 < D; d0 += DV * kL) {
        VF o[R][DV];
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < DV; ++i) o[r][i] = LoadV(ar + r * D + d0 + i * kL);
        for (int jj = 0; jj < n; ++jj) {
          VF vv[DV];
          for (int i = 0; i < DV; ++i) vv[i] = LoadV(vr[jj] + off + d0 + i * kL);
          for (int r = 0; r < R; ++r) {
            const VF p = Splat(sc[r][jj]);
            for (int i = 0; i < DV; ++i) o[r][i] += p * vv[i];
          }
        }
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < DV; ++i) std::memcpy(ar + r * D + d0 + i * kL, &o[r][i], sizeof(VF));
      }
    }
  }
  for (int64_t x = 0; x < nkv; ++x)
    for (int64_t r = 0; r < per_head; ++r) {
      const int64_t t = it.first + r / g, h = (it.kv_head + x) * g + r % g, i = x * hp + r;
      T* dst = out + (t * sh.heads + h) * D;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      for (int d = 0; d < D; ++d) Store(dst + d, acc[i * D + d] * inv);
    }
}

// A tile of many rows (prefill chunks), NV vectors of kL rows each: row r is
// query token it.first + r / g, head kv_head * g + r % g. Q is held
// transposed ([D][rows], scaled), the output accumulates transposed, and
// scores are [positions][rows]: every loop is over vectors of rows, with K
// and V elements broadcast, so the cache is read in place.
template <typename T, int D, int NV>
void AttendTile(const Shape& sh, const Item& it, const T* q, const T* k_cache,
                const T* v_cache, const int32_t* block_tables, int32_t ctx, int32_t q_len,
                int32_t q_start, T* out) {
  constexpr int JB = NV <= 2 ? 8 : 4;  // positions per register block of scores
  constexpr int DB = NV <= 2 ? 8 : 4;  // head dims per register block of P.V
  const int64_t g = sh.heads / sh.kv_heads, bs = sh.block_size;
  const int rows = static_cast<int>(it.count * g);
  std::vector<VF> qt(D * NV), acc(D * NV);  // zeros: padding rows stay 0
  float* qf = reinterpret_cast<float*>(qt.data());
  alignas(64) int32_t posa[NV * kL];
  for (int r = 0; r < NV * kL; ++r) posa[r] = -(1 << 30);  // padding rows see nothing
  for (int r = 0; r < rows; ++r) {
    const int64_t t = it.first + r / g, h = it.kv_head * g + r % g;
    const T* src = q + (t * sh.heads + h) * D;
    for (int d = 0; d < D; ++d) qf[d * NV * kL + r] = Load(src + d) * sh.scale;
    posa[r] = ctx - q_len + static_cast<int32_t>(t - q_start);
  }
  VI pos[NV];
  VF m[NV], l[NV];
  for (int v = 0; v < NV; ++v) {
    std::memcpy(&pos[v], posa + v * kL, sizeof(VI));
    m[v] = Splat(kMasked);
    l[v] = VF{};
  }
  const int64_t first_pos = posa[0], last_pos = posa[rows - 1];
  const int64_t last = std::min<int64_t>(last_pos + 1, ctx);  // causal reach
  const int64_t lo = sh.window > 0 ? std::max<int64_t>(0, first_pos - sh.window + 1) : 0;
  const T* kp[kTileJ];
  const T* vp[kTileJ];
  alignas(64) VF s[kTileJ][NV];  // scores, then probabilities
  for (int64_t j0 = lo; j0 < last; j0 += kTileJ) {
    const int n = static_cast<int>(std::min<int64_t>(kTileJ, last - j0));
    for (int j = 0; j < kTileJ; ++j) {  // positions past n repeat the first (masked)
      const int64_t p = j0 + (j < n ? j : 0);
      const int64_t phys = block_tables[it.seq * sh.max_blocks + p / bs];
      const int64_t base = ((phys * bs + p % bs) * sh.kv_heads + it.kv_head) * D;
      kp[j] = k_cache + base;
      vp[j] = v_cache + base;
    }
    // Scores: JB positions x NV row vectors in registers, over d.
    for (int j1 = 0; j1 < n; j1 += JB) {
      VF a[JB][NV] = {};
      for (int d = 0; d < D; ++d) {
        VF qv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          qv[v] = qt[d * NV + v];
          InRegister(qv[v]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < JB; ++j) {
          const VF kb = Splat(Load(kp[j1 + j] + d));
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) a[j][v] += qv[v] * kb;
        }
      }
      for (int j = 0; j < JB; ++j)
        for (int v = 0; v < NV; ++v) s[j1 + j][v] = a[j][v];
    }
    // Masks only where some row does not see every position of the chunk.
    const bool edge = n < kTileJ || j0 + kTileJ - 1 > first_pos ||
                      (sh.window > 0 && j0 < last_pos - sh.window + 1);
    if (edge) {
      for (int j = 0; j < kTileJ; ++j) {
        const VI jv = VI{} + static_cast<int32_t>(j0 + j);
        for (int v = 0; v < NV; ++v) {
          VI ok = jv <= pos[v];
          if (sh.window > 0) ok &= jv > pos[v] - static_cast<int32_t>(sh.window);
          if (j >= n) ok = VI{};
          s[j][v] = ok ? s[j][v] : Splat(kMasked);
        }
      }
    }
    // Online softmax, a vector of rows at a time.
    VF corr[NV];
    for (int v = 0; v < NV; ++v) {
      VF mb = s[0][v];
      for (int j = 1; j < kTileJ; ++j) mb = Max(mb, s[j][v]);
      const VF m_new = Max(m[v], mb);
      corr[v] = ExpV(m[v] - m_new);
      VF sum = VF{};
      for (int j = 0; j < kTileJ; ++j) {
        s[j][v] = ExpV(s[j][v] - m_new);
        sum += s[j][v];
      }
      l[v] = l[v] * corr[v] + sum;
      m[v] = m_new;
    }
    // acc = acc * corr + P V: DB head dims x NV row vectors in registers, over j.
    for (int d0 = 0; d0 < D; d0 += DB) {
      VF o[DB][NV];
      for (int i = 0; i < DB; ++i)
        for (int v = 0; v < NV; ++v) o[i][v] = acc[(d0 + i) * NV + v] * corr[v];
      for (int j = 0; j < n; ++j) {
        VF p[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          p[v] = s[j][v];
          InRegister(p[v]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < DB; ++i) {
          const VF vb = Splat(Load(vp[j] + d0 + i));
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) o[i][v] += p[v] * vb;
        }
      }
      for (int i = 0; i < DB; ++i)
        for (int v = 0; v < NV; ++v) acc[(d0 + i) * NV + v] = o[i][v];
    }
  }
  alignas(64) float lf[NV * kL];
  std::memcpy(lf, l, sizeof lf);
  const float* af = reinterpret_cast<const float*>(acc.data());
  for (int r = 0; r < rows; ++r) {
    const int64_t t = it.first + r / g, h = it.kv_head * g + r % g;
    T* dst = out + (t * sh.heads + h) * D;
    const float inv = lf[r] > 0.0f ? 1.0f / lf[r] : 0.0f;
    for (int d = 0; d < D; ++d) Store(dst + d, af[d * NV * kL + r] * inv);
  }
}

template <typename T>
using AttendFn = void (*)(const Shape&, const Item&, const T*, const T*, const T*,
                          const int32_t*, int32_t, int32_t, int32_t, T*);

// Whether `rows` rows of one KV head take AttendRows (else AttendTile).
inline bool RowsPath(int64_t rows) { return rows <= 8 || rows > 4 * kL; }

template <typename T, int D>
AttendFn<T> Pick(int64_t rows) {
  if (RowsPath(rows)) return AttendRows<T, D>;
  switch ((rows + kL - 1) / kL) {
    case 1: return AttendTile<T, D, 1>;
    case 2: return AttendTile<T, D, 2>;
    case 3: return AttendTile<T, D, 3>;
    default: return AttendTile<T, D, 4>;
  }
}

template <typename T>
ffi::Error Run(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
               ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> block_tables,
               ffi::Buffer<ffi::S32> context_lens, ffi::Buffer<ffi::S32> query_start_loc,
               float scale, int64_t window, ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), bd = block_tables.dimensions();
  Shape sh{qd[0], qd[1], qd[2], kd[1], kd[2], bd[1], scale, window};
  const int64_t num_seqs = bd[0], num_blocks = kd[0];
  const int32_t* qsl = query_start_loc.typed_data();
  const int32_t* cl = context_lens.typed_data();
  const int32_t* bt = block_tables.typed_data();
  T* o = static_cast<T*>(out->untyped_data());
  std::memset(o, 0, out->size_bytes());
  std::vector<Item> items;
  // Query tokens per item: a tile of up to kTileRows rows.
  const int64_t g = sh.heads / sh.kv_heads, tile = std::max<int64_t>(1, kTileRows / g);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int32_t first = std::max(qsl[s], 0), end = std::min<int32_t>(qsl[s + 1], sh.tokens);
    if (end <= first || cl[s] <= 0) continue;
    if (end - first > cl[s])
      return ffi::Error::InvalidArgument("a sequence has more query tokens than context");
    const int64_t need = (int64_t{cl[s]} + sh.block_size - 1) / sh.block_size;
    if (need > sh.max_blocks) return ffi::Error::InvalidArgument("context exceeds block table");
    for (int64_t b = 0; b < need; ++b)
      if (bt[s * sh.max_blocks + b] < 0 || bt[s * sh.max_blocks + b] >= num_blocks)
        return ffi::Error::InvalidArgument("block id out of range");
    for (int32_t t = first; t < end; t += tile) {
      const int32_t count = static_cast<int32_t>(std::min<int64_t>(tile, end - t));
      if (RowsPath(count * g)) {  // one item for every KV head
        items.push_back({static_cast<int32_t>(s), 0, t, count,
                         static_cast<int32_t>(sh.kv_heads)});
        continue;
      }
      for (int32_t h = 0; h < sh.kv_heads; ++h)
        items.push_back({static_cast<int32_t>(s), h, t, count, 1});
    }
  }
  // The costliest items first (context reach x rows), so the last ones to
  // finish are short.
  auto cost = [&](const Item& it) {
    const int32_t s = it.seq, reach = cl[s] - (qsl[s + 1] - qsl[s]) + (it.first - qsl[s]) + it.count;
    return int64_t{reach} * it.count * it.num_kv;
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& a, const Item& b) { return cost(a) > cost(b); });
  const T* qp = static_cast<const T*>(q.untyped_data());
  const T* kp = static_cast<const T*>(k_cache.untyped_data());
  const T* vp = static_cast<const T*>(v_cache.untyped_data());
  jpaged::ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Item& it = items[i];
    const auto attend = sh.head_dim == 64 ? Pick<T, 64>(it.count * g) : Pick<T, 128>(it.count * g);
    attend(sh, it, qp, kp, vp, bt, cl[it.seq], qsl[it.seq + 1] - qsl[it.seq], qsl[it.seq], o);
  });
  return ffi::Error::Success();
}

ffi::Error Dispatch(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                    ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> block_tables,
                    ffi::Buffer<ffi::S32> context_lens, ffi::Buffer<ffi::S32> query_start_loc,
                    float scale, int64_t window, ffi::Result<ffi::AnyBuffer> out) {
  const auto dt = q.element_type();
  if (k_cache.element_type() != dt || v_cache.element_type() != dt ||
      out->element_type() != dt)
    return ffi::Error::InvalidArgument("q, the caches and out must share a dtype");
  if (q.dimensions().size() != 3 || k_cache.dimensions().size() != 4 ||
      block_tables.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("expected q [T, H, D], caches [N, B, KVH, D]");
  if (q.dimensions()[1] % k_cache.dimensions()[2] != 0 ||
      q.dimensions()[2] != k_cache.dimensions()[3])
    return ffi::Error::InvalidArgument("head counts or head_dim do not match");
  if (context_lens.dimensions()[0] != block_tables.dimensions()[0] ||
      query_start_loc.dimensions()[0] != block_tables.dimensions()[0] + 1)
    return ffi::Error::InvalidArgument("context_lens / query_start_loc do not match the seqs");
  if (q.dimensions()[2] != 64 && q.dimensions()[2] != 128)
    return ffi::Error::InvalidArgument("head_dim must be 64 or 128");
  if (dt == ffi::DataType::F32)
    return Run<float>(pool, q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                      scale, window, out);
  if (dt == ffi::DataType::BF16)
    return Run<uint16_t>(pool, q, k_cache, v_cache, block_tables, context_lens,
                         query_start_loc, scale, window, out);
  return ffi::Error::InvalidArgument("dtype must be float32 or bfloat16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedCpuPagedAttention, Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start_loc
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Ret<ffi::AnyBuffer>());
