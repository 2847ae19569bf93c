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
// traffic of reading the cache once. Here each work item (a sequence, a KV
// head and a tile of up to kTile query tokens) walks its blocks in place:
// one block of K and V for one head (block_size x D floats) is read once and
// used by every query row of the tile (tile tokens x heads in the group),
// with an online softmax, in float32. Items are spread over XLA's intra-op
// thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;  // query tokens per work item
constexpr int kJ = 16;         // context positions scored at once

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

struct Item {
  int32_t seq, kv_head, first;  // first query token (absolute index)
  int32_t count;                // query tokens in this tile
};

struct Shape {
  int64_t tokens, heads, head_dim, block_size, kv_heads, max_blocks;
  float scale;
  int64_t window;  // 0: no sliding window
};

// e^x for x <= 0 (scores minus their running max), vectorizable: 2^n times
// a degree-6 polynomial on [-ln2/2, ln2/2]; relative error about 2e-7.
// Below -87 it returns 0 (masked scores are kMasked).
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

constexpr float kMasked = -1e30f;

template <typename T, int D>
void Attend(const Shape& sh, const Item& it, const T* q, const T* k_cache, const T* v_cache,
            const int32_t* block_tables, int32_t ctx, int32_t q_len, int32_t q_start,
            T* out) {
  constexpr int R = 4;  // rows handled together: each K and V row read once for all R
  const int64_t g = sh.heads / sh.kv_heads, bs = sh.block_size;
  const int64_t rows = it.count * g, padded = (rows + R - 1) / R * R;
  // Row r is query token it.first + r / g, head kv_head * g + r % g; rows past
  // `rows` are padding whose position (-2^30) sees no context.
  std::vector<float> qs(padded * D, 0.0f), acc(padded * D, 0.0f), m(padded, kMasked),
      l(padded, 0.0f);
  std::vector<int32_t> pos(padded, -(1 << 30));
  // Many rows (prefill tiles): kJ positions of K transposed once ([D][kJ]), so
  // a row's kJ scores are kJ-wide vector FMAs over d. Few rows (decodes): dot
  // products straight from the cache.
  const bool transpose = rows > 2 * R;
  std::vector<float> kt(transpose ? D * kJ : 0, 0.0f);
  const T* kp[kJ];
  const T* vp[kJ];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.first + r / g, h = it.kv_head * g + r % g;
    const T* src = q + (t * sh.heads + h) * D;
    for (int d = 0; d < D; ++d) qs[r * D + d] = Load(src + d) * sh.scale;
    pos[r] = ctx - q_len + static_cast<int32_t>(t - q_start);
  }
  const int64_t last = std::min<int64_t>(pos[rows - 1] + 1, ctx);  // causal reach
  int64_t lo = 0;
  if (sh.window > 0) lo = std::max<int64_t>(0, pos[0] - sh.window + 1);
  for (int64_t j0 = lo; j0 < last; j0 += kJ) {
    const int n = static_cast<int>(std::min<int64_t>(kJ, last - j0));
    for (int jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      const int64_t phys = block_tables[it.seq * sh.max_blocks + j / bs];
      const int64_t base = ((phys * bs + j % bs) * sh.kv_heads + it.kv_head) * D;
      kp[jj] = k_cache + base;
      vp[jj] = v_cache + base;
      if (transpose)
        for (int d = 0; d < D; ++d) kt[d * kJ + jj] = Load(kp[jj] + d);
    }
    for (int64_t r0 = 0; r0 < padded; r0 += R) {
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
      alignas(64) float sc[R][kJ] = {};
      const float* qr = qs.data() + r0 * D;
      if (transpose) {
        for (int d = 0; d < D; ++d) {  // R x kJ scores in registers
          const float* kd = kt.data() + d * kJ;
          for (int r = 0; r < R; ++r) {
            const float qd = qr[r * D + d];
#pragma omp simd
            for (int jj = 0; jj < kJ; ++jj) sc[r][jj] += qd * kd[jj];
          }
        }
      } else {
        for (int jj = 0; jj < n; ++jj) {
          alignas(64) float kr[D];
          for (int d = 0; d < D; ++d) kr[d] = Load(kp[jj] + d);
          for (int r = 0; r < R; ++r) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; ++d) dot += qr[r * D + d] * kr[d];
            sc[r][jj] = dot;
          }
        }
      }
      float* ar = acc.data() + r0 * D;
      for (int r = 0; r < R; ++r) {
        float mb = kMasked;
        for (int jj = 0; jj < kJ; ++jj) {
          sc[r][jj] = jj >= a[r] && jj < e[r] ? sc[r][jj] : kMasked;
          mb = std::max(mb, sc[r][jj]);
        }
        const float m_new = std::max(m[r0 + r], mb);
        const float corr = ExpNonPositive(m[r0 + r] - m_new);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int jj = 0; jj < kJ; ++jj) {
          sc[r][jj] = ExpNonPositive(sc[r][jj] - m_new);
          sum += sc[r][jj];
        }
        for (int d = 0; d < D; ++d) ar[r * D + d] *= corr;
        l[r0 + r] = l[r0 + r] * corr + sum;
        m[r0 + r] = m_new;
      }
      // acc += P V, 16 columns at a time: an R x 16 tile in registers over the chunk.
      alignas(64) float vc[kJ][D];
      for (int jj = 0; jj < n; ++jj)
        for (int d = 0; d < D; ++d) vc[jj][d] = Load(vp[jj] + d);
      for (int d0 = 0; d0 < D; d0 += 16) {
        alignas(64) float o[R][16];
        for (int r = 0; r < R; ++r)
          for (int x = 0; x < 16; ++x) o[r][x] = ar[r * D + d0 + x];
        for (int jj = 0; jj < n; ++jj)
          for (int r = 0; r < R; ++r) {
            const float w = sc[r][jj];
#pragma omp simd
            for (int x = 0; x < 16; ++x) o[r][x] += w * vc[jj][d0 + x];
          }
        for (int r = 0; r < R; ++r)
          for (int x = 0; x < 16; ++x) ar[r * D + d0 + x] = o[r][x];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.first + r / g, h = it.kv_head * g + r % g;
    T* dst = out + (t * sh.heads + h) * D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int d = 0; d < D; ++d) Store(dst + d, acc[r * D + d] * inv);
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
    for (int32_t t = first; t < end; t += kTile)
      for (int32_t h = 0; h < sh.kv_heads; ++h)
        items.push_back({static_cast<int32_t>(s), h, t,
                         static_cast<int32_t>(std::min<int64_t>(kTile, end - t))});
  }
  const T* qp = static_cast<const T*>(q.untyped_data());
  const T* kp = static_cast<const T*>(k_cache.untyped_data());
  const T* vp = static_cast<const T*>(v_cache.untyped_data());
  auto attend = sh.head_dim == 64 ? Attend<T, 64> : Attend<T, 128>;
  jpaged::ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Item& it = items[i];
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
