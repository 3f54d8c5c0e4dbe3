// CUDA kernels for the MedMAP alignment ops; semantics in
// csrc/cpu/alignment_cpu.h, launch interface in alignment_kernels.h.
//
// No torch headers here: this translation unit builds with a bare nvcc.
//
// Feature kernels (anchor_*, moments_*). The (B, C, S) index space is cut
// into logical blocks by one of three plans, chosen from the strides of every
// tensor of the launch:
//   * row plan      (stride_s == 1): a block owns a chunk of one (b, c) row,
//     so every per-channel coefficient is uniform over the block. Each thread
//     holds U groups of VEC consecutive voxels (VEC * element size = 16 bytes).
//   * channel plan  (stride_c == 1): a block owns (b, tile of channels,
//     chunk of voxels); threads are TX channel groups x TY voxels, a group
//     being VEC consecutive channels, so a warp reads whole contiguous voxels.
//   * strided plan  (anything else): the row plan's decomposition with scalar
//     strided accesses.
// A group is moved with one 128-bit access when every tensor of the launch is
// suitably aligned, element by element otherwise; the grouping, and therefore
// every summation order, is the same either way, so results never depend on
// pointer alignment. All the modalities of a sample are held in registers at
// once because the anchor couples them.
//
// Reductions over S are deterministic: a block reduces its values with
// fixed-order warp butterflies and a fixed-order sum over warps, writes one
// partial per (b, slot, c, chunk), and a second kernel combines the partials
// of each output in a fixed order (a sum, or Chan's merge of per-block
// (mean, m2) pairs for the moments). No atomics anywhere.
//
// Gaussian KL. Forward: a row is handled by L lanes (a power of two chosen
// from C) that split its channels in interleaved 16-byte groups, keep the J
// per-component sums in registers and combine them with a butterfly; the
// (nu, exp(-logtau2), logtau2) table is precomputed once per call and staged
// in shared memory when it fits. Backward: a thread owns one channel (its J
// table entries live in registers) and walks rows, so the (3, J, C) statistics
// accumulate without any cross-lane traffic; per-block partials are summed by
// the same fixed-order kernel as above.

#include "alignment_kernels.h"
#include "device_common.cuh"

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace medmap_fast {
namespace gpu {
namespace {

constexpr int kMaxM = kMaxModalities;
// Channel plan: channels per tile, which bounds the shared reduction buffers
// (every slot of a moments launch must fit in the 48 KiB static limit).
constexpr int kChanCols = 64;
// Gaussian-KL forward: shared-memory budget of the staged table.
constexpr int kKlTabBytes = 32 * 1024;
// Gaussian-KL backward: number of blocks aimed at, and a cap on the partials
// buffer (in accumulator elements) so that huge C * J stays cheap.
constexpr int64_t kKlTargetBlocks = 2048;
constexpr int64_t kKlMaxPartials = int64_t{1} << 22;

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

template <typename A>
__device__ __forceinline__ bool is_finite(A v) {
  return v - v == A(0);  // false for inf and NaN
}

// Elements per thread: 8 for 2- and 4-byte types, 4 for float64, which keeps
// eight modalities' values in registers.
template <typename S>
__host__ __device__ constexpr int units() {
  return sizeof(S) == 4 ? 2 : (sizeof(S) == 2 ? 1 : 2);
}

// ---------------------------------------------------------------------------
// Launch geometry of the feature kernels.

enum Plan : int {
  kRowPlan = 0,
  kStridedPlan = 1,
  kChanPlan = 2,
};

struct Tiling {
  int64_t B;
  int64_t M;
  int64_t C;
  int64_t S;
  int64_t chunks;     // S chunks per (b, c) row (row plans) or per (b, tile) (channel plan)
  int64_t chunk_len;  // S positions per chunk
  int64_t tiles;      // channel tiles (channel plan), 1 otherwise
  int64_t nblocks;    // logical blocks; the grid may be smaller and loop
  int tx_log2;        // channel plan: log2 of channel groups per tile; 0 otherwise
  int vec;            // nonzero: every tensor admits 16-byte accesses
};

template <int VEC, int U, int kPlan>
struct Geo {
  static constexpr bool kChan = kPlan == kChanPlan;
  int64_t b;
  int64_t chunk;
  int64_t tile;
  int64_t c0;    // row plans: the block's channel; channel plan: first channel of the thread's group
  int64_t p0;    // S position of group 0 (its first element in the row plans)
  int64_t step;  // S distance between successive groups
  int nch;       // channel plan: valid channels of the thread's group

  __device__ __forceinline__ void init(const Tiling& g, int64_t blk, int tid) {
    if constexpr (!kChan) {
      chunk = blk % g.chunks;
      const int64_t row = blk / g.chunks;
      b = row / g.C;
      c0 = row - b * g.C;
      tile = 0;
      nch = 1;
      p0 = chunk * g.chunk_len + static_cast<int64_t>(tid) * VEC;
      step = static_cast<int64_t>(kThreads) * VEC;
    } else {
      const int tx = tid & ((1 << g.tx_log2) - 1);
      const int ty = tid >> g.tx_log2;
      tile = blk % g.tiles;
      const int64_t rest = blk / g.tiles;
      chunk = rest % g.chunks;
      b = rest / g.chunks;
      c0 = ((tile << g.tx_log2) + tx) * VEC;
      const int64_t left = g.C - c0;
      nch = left <= 0 ? 0 : (left >= VEC ? VEC : static_cast<int>(left));
      p0 = chunk * g.chunk_len + ty;
      step = kThreads >> g.tx_log2;
    }
  }

  // Valid elements of group u.
  __device__ __forceinline__ int count(int u, int64_t S) const {
    const int64_t pos = p0 + u * step;
    if constexpr (!kChan) {
      const int64_t left = S - pos;
      return left <= 0 ? 0 : (left >= VEC ? VEC : static_cast<int>(left));
    } else {
      return pos < S ? nch : 0;
    }
  }

  __device__ __forceinline__ int64_t offset(const StridedTensor3& t, int u) const {
    const int64_t pos = p0 + u * step;
    return b * t.stride_b + c0 * t.stride_c + pos * t.stride_s;
  }

  __device__ __forceinline__ static int64_t inner(const StridedTensor3& t) {
    return kChan ? t.stride_c : t.stride_s;
  }
};

template <class Tr, int VEC>
__device__ __forceinline__ void load_group(const typename Tr::S* p, int64_t inner, int n,
                                           bool vec, typename Tr::A (&x)[VEC]) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  if (vec && n == VEC) {
    Pack16<S, VEC> pk;
    pk.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = Tr::to_acc(pk.e[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = e < n ? Tr::to_acc(p[e * inner]) : A(0);
  }
}

template <class Tr, int VEC>
__device__ __forceinline__ void store_group(typename Tr::S* p, int64_t inner, int n, bool vec,
                                            const typename Tr::A (&y)[VEC]) {
  using S = typename Tr::S;
  if (vec && n == VEC) {
    Pack16<S, VEC> pk;
#pragma unroll
    for (int e = 0; e < VEC; ++e) pk.e[e] = Tr::from_acc(y[e]);
    *reinterpret_cast<uint4*>(p) = pk.raw;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e < n) p[e * inner] = Tr::from_acc(y[e]);
    }
  }
}

template <class Tr, int VEC, int U, int kPlan>
__device__ __forceinline__ void load_groups(const StridedTensor3& t, const Geo<VEC, U, kPlan>& geo,
                                            int64_t S, bool vec, typename Tr::A (&x)[U][VEC]) {
  const typename Tr::S* base = static_cast<const typename Tr::S*>(t.data);
  const int64_t inner = Geo<VEC, U, kPlan>::inner(t);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int n = geo.count(u, S);
    if (n > 0) {
      load_group<Tr, VEC>(base + geo.offset(t, u), inner, n, vec, x[u]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[u][e] = typename Tr::A(0);
    }
  }
}

template <class Tr, int VEC, int U, int kPlan>
__device__ __forceinline__ void store_groups(const StridedTensor3& t,
                                             const Geo<VEC, U, kPlan>& geo, int64_t S, bool vec,
                                             const typename Tr::A (&y)[U][VEC]) {
  typename Tr::S* base = static_cast<typename Tr::S*>(t.data);
  const int64_t inner = Geo<VEC, U, kPlan>::inner(t);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int n = geo.count(u, S);
    if (n > 0) store_group<Tr, VEC>(base + geo.offset(t, u), inner, n, vec, y[u]);
  }
}

// Present modalities into x (absent ones are never addressed and read as 0).
template <class Tr, int VEC, int U, int kPlan>
__device__ __forceinline__ void load_modalities(const TensorPack& f, uint32_t mask,
                                                const Geo<VEC, U, kPlan>& geo, int64_t S,
                                                bool vec,
                                                typename Tr::A (&x)[kMaxM][U][VEC]) {
#pragma unroll
  for (int k = 0; k < kMaxM; ++k) {
    if ((mask >> k) & 1u) {
      load_groups<Tr>(f.t[k], geo, S, vec, x[k]);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[k][u][e] = typename Tr::A(0);
      }
    }
  }
}

// Per-channel values of row `row` (a (B, *, C) acc array at the sample's row
// for one slot) for the thread's channels: one value in the row plans, VEC
// in the channel plan (0 past C).
template <typename A, int NP, int VEC, int U, int kPlan>
__device__ __forceinline__ void load_channels(const A* row, const Geo<VEC, U, kPlan>& geo,
                                              A (&v)[NP]) {
  if constexpr (kPlan != kChanPlan) {
    v[0] = row[geo.c0];
  } else {
#pragma unroll
    for (int e = 0; e < NP; ++e) v[e] = e < geo.nch ? row[geo.c0 + e] : A(0);
  }
}

__device__ __forceinline__ uint32_t presence_mask(const uint8_t* present, int64_t b, int M) {
  uint32_t mask = 0;
  for (int k = 0; k < M; ++k) mask |= (present[b * M + k] != 0 ? 1u : 0u) << k;
  return mask;
}

// Sums v[k][.] over the threads of the block that share a channel, for every
// slot k set in kmask (uniform over the block). Threads sharing a channel
// differ in the bits of tid above tx_log2: those within a warp are folded by
// a butterfly, then the warps are added in ascending order. The total for
// column col (= channel group * NP + element) of slot k lands in
// fin[k * COLS + col]; the call ends with a barrier, so fin is readable.
template <typename A, int K, int NP, int COLS>
__device__ __forceinline__ void block_reduce(A (&v)[K][NP], uint32_t kmask, int tx_log2, A* red,
                                             A* fin) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int tx = 1 << tx_log2;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!((kmask >> k) & 1u)) continue;
    for (int off = tx; off < 32; off <<= 1) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] += __shfl_xor_sync(kFullMask, v[k][e], off);
    }
    if (lane < tx) {
#pragma unroll
      for (int e = 0; e < NP; ++e) red[(k * kWarps + warp) * COLS + lane * NP + e] = v[k][e];
    }
  }
  __syncthreads();
  const int cols = tx * NP;
  for (int i = tid; i < K * cols; i += kThreads) {
    const int k = i / cols;
    const int col = i - k * cols;
    if ((kmask >> k) & 1u) {
      A s = red[k * kWarps * COLS + col];
      for (int w = 1; w < kWarps; ++w) s += red[(k * kWarps + w) * COLS + col];
      fin[k * COLS + col] = s;
    }
  }
  __syncthreads();
}

// Writes fin (from block_reduce) as this block's partials: slot k of kmask
// goes to output slot (k == kMaxM ? M : k) of a (B, K, C, chunks) array.
template <typename A, int K, int NP, int COLS, int VEC, int U, int kPlan>
__device__ __forceinline__ void write_partials(A* part, const A* fin, uint32_t kmask,
                                               int64_t slots, const Geo<VEC, U, kPlan>& geo,
                                               const Tiling& g, A scale) {
  const int tid = static_cast<int>(threadIdx.x);
  const int cols = kPlan == kChanPlan ? (1 << g.tx_log2) * NP : 1;
  for (int i = tid; i < K * cols; i += kThreads) {
    const int k = i / cols;
    const int col = i - k * cols;
    if (!((kmask >> k) & 1u)) continue;
    const int64_t c = kPlan == kChanPlan ? geo.tile * cols + col : geo.c0;
    if (c >= g.C) continue;
    const int64_t slot = k == kMaxM ? g.M : k;
    part[((geo.b * slots + slot) * g.C + c) * g.chunks + geo.chunk] = fin[k * COLS + col] * scale;
  }
}

// ---------------------------------------------------------------------------
// Feature kernels.

struct FeatParams {
  TensorPack f;      // features
  TensorPack out;    // grad_feats (backward kernels)
  StridedTensor3 anchor;  // anchor output of anchor_fwd; data null when not wanted
  const void* coef;  // (B, M, C); null in moments kernels without an anchor
  const uint8_t* present;
  const void* G;     // anchor_bwd
  const void* mean;  // moments_bwd, (B, M + A, C)
  const void* alpha;
  const void* beta;
  void* part;        // partials; null when no reduction is wanted
  void* part2;       // moments_fwd: m2 partials
  int detach;
  Tiling g;
};

#define ALIGN_FEATURE_KERNEL_PROLOGUE                                          \
  using S = typename Tr::S;                                                    \
  using A = typename Tr::A;                                                    \
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));                 \
  constexpr int U = units<S>();                                                \
  constexpr bool kChan = kPlan == kChanPlan;                                   \
  constexpr int NP = kChan ? VEC : 1;                                          \
  constexpr int COLS = kChan ? kChanCols : 1;                                  \
  const int M = static_cast<int>(p.g.M);                                       \
  const int64_t C = p.g.C;                                                     \
  const int64_t Sn = p.g.S;                                                    \
  const bool vec = p.g.vec != 0;                                               \
  const int tid = static_cast<int>(threadIdx.x);                               \
  (void)M;                                                                     \
  (void)C

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, 2) anchor_fwd_kernel(const FeatParams p) {
  ALIGN_FEATURE_KERNEL_PROLOGUE;
  __shared__ A red[kMaxM * kWarps * COLS];
  __shared__ A fin[kMaxM * COLS];

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(p.g, blk, tid);
    const uint32_t mask = presence_mask(p.present, geo.b, M);
    const A* coef_b = static_cast<const A*>(p.coef) + geo.b * M * C;

    A x[kMaxM][U][VEC];
    load_modalities<Tr>(p.f, mask, geo, Sn, vec, x);
    A a[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) a[u][e] = A(0);
    }
#pragma unroll
    for (int k = 0; k < kMaxM; ++k) {
      if (!((mask >> k) & 1u)) continue;
      A cf[NP];
      load_channels(coef_b + k * C, geo, cf);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a[u][e] = add_rn(a[u][e], mul_rn(cf[kChan ? e : 0], x[k][u][e]));
      }
    }
    if (p.anchor.data != nullptr) store_groups<Tr>(p.anchor, geo, Sn, vec, a);

    // Padding elements hold x = a = 0 and add nothing.
    A v[kMaxM][NP];
#pragma unroll
    for (int k = 0; k < kMaxM; ++k) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] = A(0);
      if (!((mask >> k) & 1u)) continue;
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A r = x[k][u][e] - a[u][e];
          v[k][kChan ? e : 0] += r * r;
        }
      }
    }
    block_reduce<A, kMaxM, NP, COLS>(v, mask, kChan ? p.g.tx_log2 : 0, red, fin);
    write_partials<A, kMaxM, NP, COLS>(static_cast<A*>(p.part), fin, mask, M, geo, p.g, A(1));
  }
}

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, 2) anchor_bwd_kernel(const FeatParams p) {
  ALIGN_FEATURE_KERNEL_PROLOGUE;
  __shared__ A red[kMaxM * kWarps * COLS];
  __shared__ A fin[kMaxM * COLS];
  const bool want_coef = p.part != nullptr;
  const bool detach = p.detach != 0;

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(p.g, blk, tid);
    const uint32_t mask = presence_mask(p.present, geo.b, M);
    const A* coef_b = static_cast<const A*>(p.coef) + geo.b * M * C;
    const A* G_b = static_cast<const A*>(p.G) + geo.b * M * C;

    A x[kMaxM][U][VEC];
    load_modalities<Tr>(p.f, mask, geo, Sn, vec, x);
    A a[U][VEC];
    A da[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        a[u][e] = A(0);
        da[u][e] = A(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxM; ++k) {
      if (!((mask >> k) & 1u)) continue;
      A cf[NP];
      load_channels(coef_b + k * C, geo, cf);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a[u][e] = add_rn(a[u][e], mul_rn(cf[kChan ? e : 0], x[k][u][e]));
      }
    }
    if (!detach) {
#pragma unroll
      for (int k = 0; k < kMaxM; ++k) {
        if (!((mask >> k) & 1u)) continue;
        A gk[NP];
        load_channels(G_b + k * C, geo, gk);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) da[u][e] += gk[kChan ? e : 0] * (x[k][u][e] - a[u][e]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) da[u][e] *= A(-2);
      }
    }

    // Every feature of the thread is already in registers, so grad_feats may
    // share memory with feats.
    A v[kMaxM][NP];
#pragma unroll
    for (int k = 0; k < kMaxM; ++k) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] = A(0);
      if (k >= M) continue;
      A y[U][VEC];
      if ((mask >> k) & 1u) {
        A cf[NP];
        A gk[NP];
        load_channels(coef_b + k * C, geo, cf);
        load_channels(G_b + k * C, geo, gk);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int ce = kChan ? e : 0;
            y[u][e] = A(2) * gk[ce] * (x[k][u][e] - a[u][e]) + cf[ce] * da[u][e];
            v[k][ce] += x[k][u][e] * da[u][e];
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) y[u][e] = A(0);
        }
      }
      store_groups<Tr>(p.out.t[k], geo, Sn, vec, y);
    }
    if (want_coef) {
      block_reduce<A, kMaxM, NP, COLS>(v, mask, kChan ? p.g.tx_log2 : 0, red, fin);
      write_partials<A, kMaxM, NP, COLS>(static_cast<A*>(p.part), fin, mask, M, geo, p.g, A(1));
    }
  }
}

// Slots 0..M-1 are the modalities, slot kMaxM the anchor (output slot M).
template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, 2) moments_fwd_kernel(const FeatParams p) {
  ALIGN_FEATURE_KERNEL_PROLOGUE;
  constexpr int K = kMaxM + 1;
  __shared__ A red[K * kWarps * COLS];
  __shared__ A fin[K * COLS];
  __shared__ A fin2[K * COLS];
  const bool with_anchor = p.coef != nullptr;
  const int64_t slots = p.g.M + (with_anchor ? 1 : 0);

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(p.g, blk, tid);
    const uint32_t pmask = presence_mask(p.present, geo.b, M);
    const uint32_t mask = pmask | (with_anchor ? (1u << kMaxM) : 0u);

    A x[kMaxM][U][VEC];
    load_modalities<Tr>(p.f, pmask, geo, Sn, vec, x);
    A a[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) a[u][e] = A(0);
    }
    if (with_anchor) {
      const A* coef_b = static_cast<const A*>(p.coef) + geo.b * M * C;
#pragma unroll
      for (int k = 0; k < kMaxM; ++k) {
        if (!((pmask >> k) & 1u)) continue;
        A cf[NP];
        load_channels(coef_b + k * C, geo, cf);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            a[u][e] = add_rn(a[u][e], mul_rn(cf[kChan ? e : 0], x[k][u][e]));
          }
        }
      }
    }

    // Exact two-pass moments of the block's own values (all in registers):
    // the block mean first, then squared deviations from it. Padding holds
    // zeros, which add nothing to the sums but must be left out of the
    // deviations.
    A v[K][NP];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] = A(0);
      if (!((mask >> k) & 1u)) continue;
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[k][kChan ? e : 0] += k < kMaxM ? x[k < kMaxM ? k : 0][u][e] : a[u][e];
      }
    }
    block_reduce<A, K, NP, COLS>(v, mask, kChan ? p.g.tx_log2 : 0, red, fin);

    const int64_t first = geo.chunk * p.g.chunk_len;
    const int64_t left = Sn - first;
    const A inv_n = A(1) / static_cast<A>(left < p.g.chunk_len ? left : p.g.chunk_len);
    const int col0 = kChan ? (tid & ((1 << p.g.tx_log2) - 1)) * NP : 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] = A(0);
      if (!((mask >> k) & 1u)) continue;
      A mb[NP];
#pragma unroll
      for (int e = 0; e < NP; ++e) mb[e] = fin[k * COLS + col0 + e] * inv_n;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int n = geo.count(u, Sn);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int ce = kChan ? e : 0;
          const bool valid = kChan ? n > 0 : e < n;
          const A val = k < kMaxM ? x[k < kMaxM ? k : 0][u][e] : a[u][e];
          const A d = val - mb[ce];
          if (valid) v[k][ce] += d * d;
        }
      }
    }
    block_reduce<A, K, NP, COLS>(v, mask, kChan ? p.g.tx_log2 : 0, red, fin2);
    write_partials<A, K, NP, COLS>(static_cast<A*>(p.part), fin, mask, slots, geo, p.g, inv_n);
    write_partials<A, K, NP, COLS>(static_cast<A*>(p.part2), fin2, mask, slots, geo, p.g, A(1));
  }
}

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, 2) moments_bwd_kernel(const FeatParams p) {
  ALIGN_FEATURE_KERNEL_PROLOGUE;
  __shared__ A red[kMaxM * kWarps * COLS];
  __shared__ A fin[kMaxM * COLS];
  const bool with_anchor = p.coef != nullptr;
  const bool want_coef = p.part != nullptr;
  const int64_t slots = p.g.M + (with_anchor ? 1 : 0);

  for (int64_t blk = blockIdx.x; blk < p.g.nblocks; blk += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(p.g, blk, tid);
    const uint32_t mask = presence_mask(p.present, geo.b, M);
    const A* mean_b = static_cast<const A*>(p.mean) + geo.b * slots * C;
    const A* alpha_b = static_cast<const A*>(p.alpha) + geo.b * slots * C;
    const A* beta_b = static_cast<const A*>(p.beta) + geo.b * slots * C;

    A x[kMaxM][U][VEC];
    load_modalities<Tr>(p.f, mask, geo, Sn, vec, x);
    A da[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) da[u][e] = A(0);
    }
    const A* coef_b = with_anchor ? static_cast<const A*>(p.coef) + geo.b * M * C : nullptr;
    if (with_anchor) {
      A a[U][VEC];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a[u][e] = A(0);
      }
#pragma unroll
      for (int k = 0; k < kMaxM; ++k) {
        if (!((mask >> k) & 1u)) continue;
        A cf[NP];
        load_channels(coef_b + k * C, geo, cf);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            a[u][e] = add_rn(a[u][e], mul_rn(cf[kChan ? e : 0], x[k][u][e]));
          }
        }
      }
      A al[NP];
      A be[NP];
      A mu[NP];
      load_channels(alpha_b + M * C, geo, al);
      load_channels(beta_b + M * C, geo, be);
      load_channels(mean_b + M * C, geo, mu);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int ce = kChan ? e : 0;
          da[u][e] = al[ce] + be[ce] * (a[u][e] - mu[ce]);
        }
      }
    }

    A v[kMaxM][NP];
#pragma unroll
    for (int k = 0; k < kMaxM; ++k) {
#pragma unroll
      for (int e = 0; e < NP; ++e) v[k][e] = A(0);
      if (k >= M) continue;
      A y[U][VEC];
      if ((mask >> k) & 1u) {
        A al[NP];
        A be[NP];
        A mu[NP];
        A cf[NP];
        load_channels(alpha_b + k * C, geo, al);
        load_channels(beta_b + k * C, geo, be);
        load_channels(mean_b + k * C, geo, mu);
        if (with_anchor) {
          load_channels(coef_b + k * C, geo, cf);
        } else {
#pragma unroll
          for (int e = 0; e < NP; ++e) cf[e] = A(0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(u, Sn);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int ce = kChan ? e : 0;
            A g = al[ce] + be[ce] * (x[k][u][e] - mu[ce]);
            if (with_anchor) g += cf[ce] * da[u][e];
            y[u][e] = g;
            // da is not 0 on padding, so padding is left out explicitly.
            const bool valid = kChan ? n > 0 : e < n;
            if (valid) v[k][ce] += x[k][u][e] * da[u][e];
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) y[u][e] = A(0);
        }
      }
      store_groups<Tr>(p.out.t[k], geo, Sn, vec, y);
    }
    if (want_coef) {
      block_reduce<A, kMaxM, NP, COLS>(v, mask, kChan ? p.g.tx_log2 : 0, red, fin);
      write_partials<A, kMaxM, NP, COLS>(static_cast<A*>(p.part), fin, mask, M, geo, p.g, A(1));
    }
  }
}

// out[o] = sum over chunks of part[o * chunks + i] in a fixed order, or 0 for
// an absent modality: o indexes a (B, K, C) array whose slot k < M belongs to
// modality k (present may be null: every output kept).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const A* __restrict__ part, const uint8_t* __restrict__ present,
                        A* __restrict__ out, int64_t n_out, int64_t C, int64_t K, int64_t M,
                        int64_t chunks) {
  __shared__ A warp_sums[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    bool on = true;
    if (present != nullptr) {
      const int64_t k = (o / C) % K;
      const int64_t b = o / (C * K);
      on = k >= M || present[b * M + k] != 0;
    }
    A s = A(0);
    if (on) {
      for (int64_t i = tid; i < chunks; i += kThreads) s += part[o * chunks + i];
    }
    s = warp_sum(s);
    if ((tid & 31) == 0) warp_sums[tid >> 5] = s;
    __syncthreads();
    if (tid == 0) {
      A t = warp_sums[0];
      for (int w = 1; w < kWarps; ++w) t += warp_sums[w];
      out[o] = on ? t : A(0);
    }
    __syncthreads();
  }
}

// Chan's parallel update: (n, mean, m2) absorbs a disjoint set (nb, mb, m2b).
// Counts are carried in double, exact far beyond any realistic S.
template <typename A>
__device__ __forceinline__ void chan_merge(double& n, A& mean, A& m2, double nb, A mb, A m2b) {
  if (nb == 0.0) return;
  if (n == 0.0) {
    n = nb;
    mean = mb;
    m2 = m2b;
    return;
  }
  const double tot = n + nb;
  const A delta = mb - mean;
  mean = mean + delta * static_cast<A>(nb / tot);
  m2 = (m2 + m2b) + delta * delta * static_cast<A>(n * nb / tot);
  n = tot;
}

template <typename A>
__device__ __forceinline__ void chan_merge_down(double& n, A& mean, A& m2, int off) {
  const double nb = __shfl_down_sync(kFullMask, n, off);
  const A mb = __shfl_down_sync(kFullMask, mean, off);
  const A m2b = __shfl_down_sync(kFullMask, m2, off);
  chan_merge(n, mean, m2, nb, mb, m2b);
}

// Merges the per-chunk (mean, m2) partials of each (b, slot, c) in a fixed
// order: thread t takes chunks t, t + 256, ... in turn, then a shuffle tree
// and the warps in ascending order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    merge_moments_kernel(const A* __restrict__ pmean, const A* __restrict__ pm2,
                         const uint8_t* __restrict__ present, A* __restrict__ mean,
                         A* __restrict__ m2, int64_t n_out, int64_t C, int64_t K, int64_t M,
                         int64_t chunks, int64_t chunk_len, int64_t S) {
  __shared__ double wn[kWarps];
  __shared__ A wmean[kWarps];
  __shared__ A wm2[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    const int64_t k = (o / C) % K;
    const int64_t b = o / (C * K);
    const bool on = k >= M || present[b * M + k] != 0;
    double n = 0.0;
    A mu = A(0);
    A q = A(0);
    if (on) {
      for (int64_t i = tid; i < chunks; i += kThreads) {
        const int64_t left = S - i * chunk_len;
        const double ni = static_cast<double>(left < chunk_len ? left : chunk_len);
        chan_merge(n, mu, q, ni, pmean[o * chunks + i], pm2[o * chunks + i]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) chan_merge_down(n, mu, q, off);
    if ((tid & 31) == 0) {
      wn[tid >> 5] = n;
      wmean[tid >> 5] = mu;
      wm2[tid >> 5] = q;
    }
    __syncthreads();
    if (tid == 0) {
      double tn = wn[0];
      A tm = wmean[0];
      A t2 = wm2[0];
      for (int w = 1; w < kWarps; ++w) chan_merge(tn, tm, t2, wn[w], wmean[w], wm2[w]);
      mean[o] = on ? tm : A(0);
      m2[o] = on ? t2 : A(0);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Gaussian KL.

template <typename A>
struct alignas(4 * sizeof(A)) KlEntry {
  A nu;
  A inv;  // exp(-logtau2)
  A lt;   // logtau2
  A pad;
};

template <typename A>
__global__ void __launch_bounds__(kThreads)
    kl_table_kernel(const A* __restrict__ nu, const A* __restrict__ logtau2,
                    KlEntry<A>* __restrict__ tab, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const A lt = logtau2[i];
    tab[i] = KlEntry<A>{nu[i], exp_acc(-lt), lt, A(0)};
  }
}

struct KlFwdParams {
  StridedTensor3 mu;      // strides read as (g, r, c)
  StridedTensor3 logvar;
  const uint8_t* present;  // (G,) or null
  const void* tab;         // (J, C) KlEntry
  const void* logpi;
  void* loss;
  void* resp;              // (G, R, J) or null
  int64_t R;
  int64_t C;
  int64_t N;
  int64_t ntiles;
  int J;
  int l_log2;  // lanes per row
  int vec_mu;
  int vec_lv;
};

template <class Tr, int JB, bool kSmem>
__global__ void __launch_bounds__(kThreads) gkl_fwd_kernel(const KlFwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  using E = KlEntry<A>;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int kTab = kSmem ? kKlTabBytes / static_cast<int>(sizeof(E)) : 1;
  __shared__ E stab[kTab];

  const int tid = static_cast<int>(threadIdx.x);
  const int J = p.J;
  const int64_t C = p.C;
  const E* tab = static_cast<const E*>(p.tab);
  if constexpr (kSmem) {
    for (int64_t i = tid; i < J * C; i += kThreads) stab[i] = tab[i];
    __syncthreads();
    tab = stab;
  }
  A lp[JB];
#pragma unroll
  for (int j = 0; j < JB; ++j) lp[j] = j < J ? static_cast<const A*>(p.logpi)[j] : A(0);

  const int L = 1 << p.l_log2;
  const int lane = tid & (L - 1);
  const int rows_per_tile = kThreads >> p.l_log2;
  const S* mu = static_cast<const S*>(p.mu.data);
  const S* lv = static_cast<const S*>(p.logvar.data);
  const bool vmu = p.vec_mu != 0;
  const bool vlv = p.vec_lv != 0;

  for (int64_t tile = blockIdx.x; tile < p.ntiles; tile += gridDim.x) {
    const int64_t row = tile * rows_per_tile + (tid >> p.l_log2);
    const bool valid = row < p.N;
    const int64_t g = valid ? row / p.R : 0;
    const int64_t r = valid ? row - g * p.R : 0;
    const bool keep = valid && (p.present == nullptr || p.present[g] != 0);

    A kl[JB];
#pragma unroll
    for (int j = 0; j < JB; ++j) kl[j] = A(0);
    if (keep) {
      const S* mrow = mu + g * p.mu.stride_b + r * p.mu.stride_c;
      const S* lrow = lv + g * p.logvar.stride_b + r * p.logvar.stride_c;
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += static_cast<int64_t>(L) * VEC) {
        const int n = C - c0 >= VEC ? VEC : static_cast<int>(C - c0);
        A m[VEC];
        A l[VEC];
        load_group<Tr, VEC>(mrow + c0 * p.mu.stride_s, p.mu.stride_s, n, vmu, m);
        load_group<Tr, VEC>(lrow + c0 * p.logvar.stride_s, p.logvar.stride_s, n, vlv, l);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (e >= n) break;
          const A var = exp_acc(l[e]);
          const E* col = tab + c0 + e;
#pragma unroll
          for (int j = 0; j < JB; ++j) {
            if (j < J) {
              const E t = col[j * C];
              const A d = m[e] - t.nu;
              kl[j] += (var + d * d) * t.inv - A(1) - l[e] + t.lt;
            }
          }
        }
      }
    }
    // Every lane takes part: the lanes of one row are contiguous, so the
    // offsets below L never mix rows.
    for (int off = 1; off < L; off <<= 1) {
#pragma unroll
      for (int j = 0; j < JB; ++j) kl[j] += __shfl_xor_sync(kFullMask, kl[j], off);
    }
    if (!valid) continue;

    A z[JB];
    A mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      if (j < J) {
        z[j] = lp[j] - A(0.5) * kl[j];
        // A NaN must win the max, or the shift would hide it.
        if (z[j] > mx || z[j] != z[j]) mx = z[j];
      }
    }
    // A non-finite max (all -inf, an inf, or NaN) is not subtracted: the
    // plain sums then yield what logsumexp and softmax give (inf, NaN).
    const A shift = is_finite(mx) ? mx : A(0);
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      if (j < J) {
        z[j] = exp_acc(z[j] - shift);
        sum += z[j];
      }
    }
    A* loss = static_cast<A*>(p.loss);
    if (lane == 0) loss[row] = keep ? -(shift + log_acc(sum)) : A(0);
    if (p.resp != nullptr) {
      A* resp = static_cast<A*>(p.resp) + row * J;
      const A inv_sum = A(1) / sum;
#pragma unroll
      for (int j = 0; j < JB; ++j) {
        if (j < J && (j & (L - 1)) == lane) resp[j] = keep ? z[j] * inv_sum : A(0);
      }
    }
  }
}

struct KlBwdParams {
  StridedTensor3 mu;
  StridedTensor3 logvar;
  StridedTensor3 gmu;  // data null when not wanted
  StridedTensor3 glv;
  const uint8_t* present;
  const void* nu;
  const void* logtau2;
  const void* resp;  // null: J == 1, resp = 1
  RowWeights w;
  void* part;        // (3, J, C, chunks) or null
  int64_t R;
  int64_t C;
  int64_t N;
  int64_t ctiles;
  int64_t chunks;
  int64_t rows_per_chunk;
  int64_t nblocks;
  int J;
  int tc_log2;
};

// Rows staged per pass of the backward kernel: at least 32 so that the
// barriers around the staging are amortised even when a row spans the block.
__host__ __device__ constexpr int kl_rows_per_pass(int tr) { return tr >= 32 ? tr : 32; }

template <class Tr, int JB>
__global__ void __launch_bounds__(kThreads) gkl_bwd_kernel(const KlBwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  // Staged rows (resp with an odd row pitch, so lanes on different rows hit
  // different banks, then w) during the row walk; the statistics reduction
  // reuses the same memory afterwards.
  constexpr int kBuf = kThreads * (kMaxKlComponents + 2);
  __shared__ A buf[kBuf];
  __shared__ uint8_t skeep[kThreads];

  const int tid = static_cast<int>(threadIdx.x);
  const int J = p.J;
  const int JP = J | 1;
  const int64_t C = p.C;
  const int TC = 1 << p.tc_log2;
  const int TR = kThreads >> p.tc_log2;
  const int RP = kl_rows_per_pass(TR);
  const int tc = tid & (TC - 1);
  const int tr = tid >> p.tc_log2;
  const A* nu_g = static_cast<const A*>(p.nu);
  const A* lt_g = static_cast<const A*>(p.logtau2);
  const A* resp_g = static_cast<const A*>(p.resp);
  const A* w_g = static_cast<const A*>(p.w.data);
  const S* mu = static_cast<const S*>(p.mu.data);
  const S* lv = static_cast<const S*>(p.logvar.data);
  const bool want_stats = p.part != nullptr;

  for (int64_t blk = blockIdx.x; blk < p.nblocks; blk += gridDim.x) {
    const int64_t ctile = blk % p.ctiles;
    const int64_t chunk = blk / p.ctiles;
    const int64_t c = ctile * TC + tc;
    const bool cvalid = c < C;

    A nu[JB];
    A inv[JB];
    A ninv[JB];
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      const bool on = j < J && cvalid;
      nu[j] = on ? nu_g[j * C + c] : A(0);
      inv[j] = on ? exp_acc(-lt_g[j * C + c]) : A(0);
      ninv[j] = nu[j] * inv[j];
    }
    A s0[JB];
    A s1[JB];
    A s2[JB];
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      s0[j] = A(0);
      s1[j] = A(0);
      s2[j] = A(0);
    }

    const int64_t r0 = chunk * p.rows_per_chunk;
    const int64_t r1 = r0 + p.rows_per_chunk < p.N ? r0 + p.rows_per_chunk : p.N;
    for (int64_t base = r0; base < r1; base += RP) {
      __syncthreads();  // the previous pass's readers are done
      for (int i = tid; i < RP; i += kThreads) {
        const int64_t row = base + i;
        bool keep = row < r1;
        A wv = A(0);
        if (keep) {
          const int64_t g = row / p.R;
          keep = p.present == nullptr || p.present[g] != 0;
          if (keep) wv = w_g[g * p.w.stride_g + (row - g * p.R) * p.w.stride_r];
        }
        skeep[i] = keep ? 1 : 0;
        buf[RP * JP + i] = wv;
      }
      for (int i = tid; i < RP * J; i += kThreads) {
        const int rl = i / J;
        const int j = i - rl * J;
        const int64_t row = base + rl;
        if (row < r1 && (p.present == nullptr || p.present[row / p.R] != 0)) {
          buf[rl * JP + j] = resp_g != nullptr ? resp_g[row * J + j] : A(1);
        }
      }
      __syncthreads();

      for (int rl = tr; rl < RP; rl += TR) {
        const int64_t row = base + rl;
        if (row >= r1 || !cvalid) continue;
        const int64_t g = row / p.R;
        const int64_t r = row - g * p.R;
        if (!skeep[rl]) {
          if (p.gmu.data != nullptr) {
            static_cast<S*>(p.gmu.data)[g * p.gmu.stride_b + r * p.gmu.stride_c + c * p.gmu.stride_s] =
                Tr::from_acc(A(0));
          }
          if (p.glv.data != nullptr) {
            static_cast<S*>(p.glv.data)[g * p.glv.stride_b + r * p.glv.stride_c + c * p.glv.stride_s] =
                Tr::from_acc(A(0));
          }
          continue;
        }
        const A m = Tr::to_acc(mu[g * p.mu.stride_b + r * p.mu.stride_c + c * p.mu.stride_s]);
        const A l =
            Tr::to_acc(lv[g * p.logvar.stride_b + r * p.logvar.stride_c + c * p.logvar.stride_s]);
        const A var = exp_acc(l);
        const A wv = buf[RP * JP + rl];
        const A* rr = buf + rl * JP;
        A Ac = A(0);
        A Bc = A(0);
#pragma unroll
        for (int j = 0; j < JB; ++j) {
          if (j < J) {
            const A rj = rr[j];
            Ac += rj * inv[j];
            Bc += rj * ninv[j];
            if (want_stats) {
              const A wr = wv * rj;
              const A d = m - nu[j];
              s0[j] += wr;
              s1[j] += wr * d;
              s2[j] += wr * (d * d + var);
            }
          }
        }
        if (p.gmu.data != nullptr) {
          static_cast<S*>(p.gmu.data)[g * p.gmu.stride_b + r * p.gmu.stride_c + c * p.gmu.stride_s] =
              Tr::from_acc(wv * (m * Ac - Bc));
        }
        if (p.glv.data != nullptr) {
          static_cast<S*>(p.glv.data)[g * p.glv.stride_b + r * p.glv.stride_c + c * p.glv.stride_s] =
              Tr::from_acc(wv * A(0.5) * (var * Ac - A(1)));
        }
      }
    }

    if (!want_stats) continue;
    // Sum over the TR threads of each channel, in ascending row order; one
    // statistic at a time so that the buffer holds J * kThreads values.
    A* part = static_cast<A*>(p.part);
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      __syncthreads();
#pragma unroll
      for (int j = 0; j < JB; ++j) {
        if (j < J) buf[j * kThreads + tid] = q == 0 ? s0[j] : (q == 1 ? s1[j] : s2[j]);
      }
      __syncthreads();
      for (int i = tid; i < J * TC; i += kThreads) {
        const int j = i / TC;
        const int t = i - j * TC;
        const int64_t cc = ctile * TC + t;
        if (cc >= C) continue;
        A s = buf[j * kThreads + t];
        for (int y = 1; y < TR; ++y) s += buf[j * kThreads + y * TC + t];
        part[((q * J + j) * C + cc) * p.chunks + chunk] = s;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host-side planning.

bool valid_shape(const AlignShape& sh) {
  return sh.M >= 1 && sh.M <= kMaxM && sh.B >= 0 && sh.C >= 0 && sh.S >= 0;
}

// The tensors of one launch; layout and alignment are decided jointly since
// every tensor is addressed through the same groups.
struct TensorSet {
  const StridedTensor3* t[2 * kMaxM + 1];
  int n = 0;
  void add(const StridedTensor3& x) { t[n++] = &x; }
};

// Strides of size-1 dimensions never influence addressing and are ignored.
Plan choose_plan(const AlignShape& sh, const TensorSet& ts) {
  bool s_unit = true;
  bool c_unit = true;
  for (int i = 0; i < ts.n; ++i) {
    if (sh.S > 1 && ts.t[i]->stride_s != 1) s_unit = false;
    if (sh.C > 1 && ts.t[i]->stride_c != 1) c_unit = false;
  }
  if (s_unit && sh.S > 1) return kRowPlan;
  if (c_unit && sh.C > 1) return kChanPlan;
  return s_unit ? kRowPlan : kStridedPlan;
}

bool vector_ok(const AlignShape& sh, const TensorSet& ts, Plan plan, int vec_elems) {
  if (plan == kStridedPlan) return false;
  for (int i = 0; i < ts.n; ++i) {
    const StridedTensor3& t = *ts.t[i];
    if (reinterpret_cast<uintptr_t>(t.data) % kVecBytes != 0) return false;
    if (sh.B > 1 && t.stride_b % vec_elems != 0) return false;
    const int64_t outer_n = plan == kChanPlan ? sh.S : sh.C;
    const int64_t outer_stride = plan == kChanPlan ? t.stride_s : t.stride_c;
    if (outer_n > 1 && outer_stride % vec_elems != 0) return false;
  }
  return true;
}

// A function of the shape, the element size and the plan only (never of
// alignment), so every reduction order is fixed by sizes and layout family.
Tiling make_tiling(const AlignShape& sh, Plan plan, int elem_bytes) {
  const int vec_elems = kVecBytes / elem_bytes;
  const int unroll = elem_bytes == 4 ? 2 : (elem_bytes == 2 ? 1 : 2);
  Tiling g{};
  g.B = sh.B;
  g.M = sh.M;
  g.C = sh.C;
  g.S = sh.S;
  if (plan != kChanPlan) {
    g.tx_log2 = 0;
    g.tiles = 1;
    g.chunk_len = static_cast<int64_t>(kThreads) * vec_elems * unroll;
    g.chunks = ceil_div(sh.S, g.chunk_len);
    g.nblocks = sh.B * sh.C * g.chunks;
  } else {
    const int64_t groups = ceil_div(sh.C, vec_elems);
    const int max_tx = kChanCols / vec_elems;
    int lg = 0;
    while ((1 << lg) < max_tx && (int64_t{1} << lg) < groups) ++lg;
    g.tx_log2 = lg;
    g.tiles = ceil_div(groups, int64_t{1} << lg);
    g.chunk_len = static_cast<int64_t>(kThreads >> lg) * unroll;
    g.chunks = ceil_div(sh.S, g.chunk_len);
    g.nblocks = sh.B * g.tiles * g.chunks;
  }
  return g;
}

struct FeatPlan {
  Plan plan;
  Tiling g;
};

FeatPlan plan_features(DType dtype, const AlignShape& sh, const TensorSet& ts) {
  const int eb = element_size(dtype);
  FeatPlan fp{};
  fp.plan = choose_plan(sh, ts);
  fp.g = make_tiling(sh, fp.plan, eb);
  fp.g.vec = vector_ok(sh, ts, fp.plan, kVecBytes / eb) ? 1 : 0;
  return fp;
}

// Partials of one reduced (B, K, C) array.
size_t partial_bytes(DType dtype, const AlignShape& sh, const Tiling& g, int64_t slots) {
  return static_cast<size_t>(sh.B * slots * sh.C * g.chunks) * acc_size(dtype);
}

template <template <class, int> class Launch, class... Args>
cudaError_t dispatch_features(DType dtype, Plan plan, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32:
      switch (plan) {
        case kRowPlan: return Launch<TraitsF32, kRowPlan>::run(args...);
        case kStridedPlan: return Launch<TraitsF32, kStridedPlan>::run(args...);
        case kChanPlan: return Launch<TraitsF32, kChanPlan>::run(args...);
      }
      break;
    case DType::kFloat16:
      switch (plan) {
        case kRowPlan: return Launch<TraitsF16, kRowPlan>::run(args...);
        case kStridedPlan: return Launch<TraitsF16, kStridedPlan>::run(args...);
        case kChanPlan: return Launch<TraitsF16, kChanPlan>::run(args...);
      }
      break;
    case DType::kBFloat16:
      switch (plan) {
        case kRowPlan: return Launch<TraitsBF16, kRowPlan>::run(args...);
        case kStridedPlan: return Launch<TraitsBF16, kStridedPlan>::run(args...);
        case kChanPlan: return Launch<TraitsBF16, kChanPlan>::run(args...);
      }
      break;
    case DType::kFloat64:
      switch (plan) {
        case kRowPlan: return Launch<TraitsF64, kRowPlan>::run(args...);
        case kStridedPlan: return Launch<TraitsF64, kStridedPlan>::run(args...);
        case kChanPlan: return Launch<TraitsF64, kChanPlan>::run(args...);
      }
      break;
  }
  return cudaErrorInvalidValue;
}

template <class Tr, int kPlan>
struct AnchorFwdLaunch {
  static cudaError_t run(const FeatParams& p, cudaStream_t stream) {
    anchor_fwd_kernel<Tr, kPlan><<<grid_for(p.g.nblocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <class Tr, int kPlan>
struct AnchorBwdLaunch {
  static cudaError_t run(const FeatParams& p, cudaStream_t stream) {
    anchor_bwd_kernel<Tr, kPlan><<<grid_for(p.g.nblocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <class Tr, int kPlan>
struct MomentsFwdLaunch {
  static cudaError_t run(const FeatParams& p, cudaStream_t stream) {
    moments_fwd_kernel<Tr, kPlan><<<grid_for(p.g.nblocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <class Tr, int kPlan>
struct MomentsBwdLaunch {
  static cudaError_t run(const FeatParams& p, cudaStream_t stream) {
    moments_bwd_kernel<Tr, kPlan><<<grid_for(p.g.nblocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

cudaError_t sum_partials(DType dtype, const void* part, const uint8_t* present, void* out,
                         int64_t n_out, int64_t C, int64_t K, int64_t M, int64_t chunks,
                         cudaStream_t stream) {
  if (n_out == 0) return cudaSuccess;
  if (dtype == DType::kFloat64) {
    sum_partials_kernel<double><<<grid_for(n_out), kThreads, 0, stream>>>(static_cast<const double*>(part), present, static_cast<double*>(out), n_out, C, K, M, chunks);
  } else {
    sum_partials_kernel<float><<<grid_for(n_out), kThreads, 0, stream>>>(static_cast<const float*>(part), present, static_cast<float*>(out), n_out, C, K, M, chunks);
  }
  return cudaGetLastError();
}

bool workspace_ok(const void* ws, size_t have, size_t need, DType dtype) {
  if (need == 0) return true;
  return ws != nullptr && have >= need &&
         reinterpret_cast<uintptr_t>(ws) % static_cast<uintptr_t>(acc_size(dtype)) == 0;
}

void add_pack(TensorSet& ts, const TensorPack& tp, int64_t M) {
  for (int64_t k = 0; k < M; ++k) ts.add(tp.t[k]);
}

// ---- Gaussian KL planning ----------------------------------------------------

bool valid_kl_shape(const KlShape& sh) {
  return sh.G >= 0 && sh.R >= 0 && sh.C >= 0 && sh.C <= kMaxKlChannels && sh.J >= 1 &&
         sh.J <= kMaxKlComponents;
}

int kl_jb(int64_t J) { return J <= 1 ? 1 : (J <= 2 ? 2 : (J <= 4 ? 4 : (J <= 8 ? 8 : 16))); }

bool kl_vec_ok(const StridedTensor3& t, const KlShape& sh, int vec_elems) {
  if (reinterpret_cast<uintptr_t>(t.data) % kVecBytes != 0) return false;
  if (sh.C > 1 && t.stride_s != 1) return false;
  if (sh.G > 1 && t.stride_b % vec_elems != 0) return false;
  if (sh.R > 1 && t.stride_c % vec_elems != 0) return false;
  return true;
}

template <class Tr, int JB>
cudaError_t gkl_fwd_jb(const KlFwdParams& p, bool smem, cudaStream_t stream) {
  const unsigned grid = grid_for(p.ntiles < 4096 ? p.ntiles : 4096);
  if (smem) {
    gkl_fwd_kernel<Tr, JB, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    gkl_fwd_kernel<Tr, JB, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public launchers.

size_t anchor_fwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                  const StridedTensor3* anchor) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return 0;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  if (anchor != nullptr) ts.add(*anchor);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  return partial_bytes(dtype, shape, fp.g, shape.M);
}

cudaError_t launch_anchor_fwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                              const void* coef, const uint8_t* present, void* sq,
                              const StridedTensor3* anchor, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  if (anchor != nullptr) ts.add(*anchor);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  const size_t need = partial_bytes(dtype, shape, fp.g, shape.M);
  if (!workspace_ok(workspace, workspace_bytes, need, dtype)) return cudaErrorInvalidValue;

  FeatParams p{};
  p.f = feats;
  if (anchor != nullptr) p.anchor = *anchor;
  p.coef = coef;
  p.present = present;
  p.part = workspace;
  p.g = fp.g;
  if (p.g.nblocks > 0) {
    const cudaError_t err = dispatch_features<AnchorFwdLaunch>(dtype, fp.plan, p, stream);
    if (err != cudaSuccess) return err;
  }
  return sum_partials(dtype, workspace, present, sq, shape.B * shape.M * shape.C, shape.C,
                      shape.M, shape.M, p.g.nblocks > 0 ? p.g.chunks : 0, stream);
}

size_t anchor_bwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                  const TensorPack& grad_feats, bool with_grad_coef) {
  if (!valid_shape(shape) || !valid_dtype(dtype) || !with_grad_coef) return 0;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  add_pack(ts, grad_feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  return partial_bytes(dtype, shape, fp.g, shape.M);
}

cudaError_t launch_anchor_bwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                              const void* coef, const uint8_t* present, const void* G,
                              bool detach, const TensorPack& grad_feats, void* grad_coef,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  add_pack(ts, grad_feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  const size_t need = grad_coef != nullptr ? partial_bytes(dtype, shape, fp.g, shape.M) : 0;
  if (!workspace_ok(workspace, workspace_bytes, need, dtype)) return cudaErrorInvalidValue;

  FeatParams p{};
  p.f = feats;
  p.out = grad_feats;
  p.coef = coef;
  p.present = present;
  p.G = G;
  p.detach = detach ? 1 : 0;
  p.part = grad_coef != nullptr ? workspace : nullptr;
  p.g = fp.g;
  if (p.g.nblocks > 0) {
    const cudaError_t err = dispatch_features<AnchorBwdLaunch>(dtype, fp.plan, p, stream);
    if (err != cudaSuccess) return err;
  }
  if (grad_coef == nullptr) return cudaSuccess;
  return sum_partials(dtype, workspace, present, grad_coef, shape.B * shape.M * shape.C, shape.C,
                      shape.M, shape.M, p.g.nblocks > 0 ? p.g.chunks : 0, stream);
}

size_t moments_fwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                   bool with_anchor) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return 0;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  // Two arrays (means, m2), each rounded up to 16 bytes.
  const size_t one = partial_bytes(dtype, shape, fp.g, shape.M + (with_anchor ? 1 : 0));
  return 2 * ((one + 15) / 16 * 16);
}

cudaError_t launch_moments_fwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                               const void* coef, const uint8_t* present, void* mean, void* m2,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  const int64_t slots = shape.M + (coef != nullptr ? 1 : 0);
  const size_t one = (partial_bytes(dtype, shape, fp.g, slots) + 15) / 16 * 16;
  if (!workspace_ok(workspace, workspace_bytes, 2 * one, dtype)) return cudaErrorInvalidValue;

  FeatParams p{};
  p.f = feats;
  p.coef = coef;
  p.present = present;
  p.part = workspace;
  p.part2 = one > 0 ? static_cast<char*>(workspace) + one : nullptr;
  p.g = fp.g;
  if (p.g.nblocks > 0) {
    const cudaError_t err = dispatch_features<MomentsFwdLaunch>(dtype, fp.plan, p, stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t n_out = shape.B * slots * shape.C;
  if (n_out == 0) return cudaSuccess;
  const int64_t chunks = p.g.nblocks > 0 ? p.g.chunks : 0;
  if (dtype == DType::kFloat64) {
    merge_moments_kernel<double><<<grid_for(n_out), kThreads, 0, stream>>>(static_cast<const double*>(p.part), static_cast<const double*>(p.part2), present, static_cast<double*>(mean), static_cast<double*>(m2), n_out, shape.C, slots, shape.M, chunks, p.g.chunk_len, shape.S);
  } else {
    merge_moments_kernel<float><<<grid_for(n_out), kThreads, 0, stream>>>(static_cast<const float*>(p.part), static_cast<const float*>(p.part2), present, static_cast<float*>(mean), static_cast<float*>(m2), n_out, shape.C, slots, shape.M, chunks, p.g.chunk_len, shape.S);
  }
  return cudaGetLastError();
}

size_t moments_bwd_workspace_bytes(DType dtype, const AlignShape& shape, const TensorPack& feats,
                                   const TensorPack& grad_feats, bool with_grad_coef) {
  if (!valid_shape(shape) || !valid_dtype(dtype) || !with_grad_coef) return 0;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  add_pack(ts, grad_feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  return partial_bytes(dtype, shape, fp.g, shape.M);
}

cudaError_t launch_moments_bwd(DType dtype, const AlignShape& shape, const TensorPack& feats,
                               const void* coef, const uint8_t* present, const void* mean,
                               const void* alpha, const void* beta, const TensorPack& grad_feats,
                               void* grad_coef, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (grad_coef != nullptr && coef == nullptr) return cudaErrorInvalidValue;
  TensorSet ts;
  add_pack(ts, feats, shape.M);
  add_pack(ts, grad_feats, shape.M);
  const FeatPlan fp = plan_features(dtype, shape, ts);
  const size_t need = grad_coef != nullptr ? partial_bytes(dtype, shape, fp.g, shape.M) : 0;
  if (!workspace_ok(workspace, workspace_bytes, need, dtype)) return cudaErrorInvalidValue;

  FeatParams p{};
  p.f = feats;
  p.out = grad_feats;
  p.coef = coef;
  p.present = present;
  p.mean = mean;
  p.alpha = alpha;
  p.beta = beta;
  p.part = grad_coef != nullptr ? workspace : nullptr;
  p.g = fp.g;
  if (p.g.nblocks > 0) {
    const cudaError_t err = dispatch_features<MomentsBwdLaunch>(dtype, fp.plan, p, stream);
    if (err != cudaSuccess) return err;
  }
  if (grad_coef == nullptr) return cudaSuccess;
  return sum_partials(dtype, workspace, present, grad_coef, shape.B * shape.M * shape.C, shape.C,
                      shape.M, shape.M, p.g.nblocks > 0 ? p.g.chunks : 0, stream);
}

size_t gkl_fwd_workspace_bytes(DType dtype, const KlShape& shape) {
  if (!valid_kl_shape(shape) || !valid_dtype(dtype)) return 0;
  return static_cast<size_t>(shape.J * shape.C) * 4 * acc_size(dtype);
}

cudaError_t launch_gkl_fwd(DType dtype, const KlShape& shape, const StridedTensor3& mu,
                           const StridedTensor3& logvar, const uint8_t* present, const void* nu,
                           const void* logtau2, const void* logpi, void* loss, void* resp,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_kl_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  const size_t need = gkl_fwd_workspace_bytes(dtype, shape);
  if (!workspace_ok(workspace, workspace_bytes, need, dtype)) return cudaErrorInvalidValue;
  const int64_t N = shape.G * shape.R;
  const int eb = element_size(dtype);
  const int vec_elems = kVecBytes / eb;

  // Table of (nu, exp(-logtau2), logtau2), computed once per call.
  const int64_t n_tab = shape.J * shape.C;
  if (n_tab > 0) {
    if (dtype == DType::kFloat64) {
      kl_table_kernel<double><<<grid_for(ceil_div(n_tab, kThreads)), kThreads, 0, stream>>>(static_cast<const double*>(nu), static_cast<const double*>(logtau2), static_cast<KlEntry<double>*>(workspace), n_tab);
    } else {
      kl_table_kernel<float><<<grid_for(ceil_div(n_tab, kThreads)), kThreads, 0, stream>>>(static_cast<const float*>(nu), static_cast<const float*>(logtau2), static_cast<KlEntry<float>*>(workspace), n_tab);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (N == 0) return cudaSuccess;

  // Lanes per row: enough that each lane handles about four 16-byte groups.
  const int64_t groups = ceil_div(shape.C, vec_elems);
  int lg = 0;
  while (lg < 5 && (int64_t{4} << lg) < groups) ++lg;

  KlFwdParams p{};
  p.mu = mu;
  p.logvar = logvar;
  p.present = present;
  p.tab = workspace;
  p.logpi = logpi;
  p.loss = loss;
  p.resp = resp;
  p.R = shape.R;
  p.C = shape.C;
  p.N = N;
  p.J = static_cast<int>(shape.J);
  p.l_log2 = lg;
  p.ntiles = ceil_div(N, kThreads >> lg);
  p.vec_mu = kl_vec_ok(mu, shape, vec_elems) ? 1 : 0;
  p.vec_lv = kl_vec_ok(logvar, shape, vec_elems) ? 1 : 0;
  const bool smem = n_tab * 4 * acc_size(dtype) <= kKlTabBytes;

#define MEDMAP_GKL_FWD_J(TR)                                   \
  switch (kl_jb(shape.J)) {                                    \
    case 1: return gkl_fwd_jb<TR, 1>(p, smem, stream);         \
    case 2: return gkl_fwd_jb<TR, 2>(p, smem, stream);         \
    case 4: return gkl_fwd_jb<TR, 4>(p, smem, stream);         \
    case 8: return gkl_fwd_jb<TR, 8>(p, smem, stream);         \
    default: return gkl_fwd_jb<TR, 16>(p, smem, stream);       \
  }
  switch (dtype) {
    case DType::kFloat32: MEDMAP_GKL_FWD_J(TraitsF32)
    case DType::kFloat16: MEDMAP_GKL_FWD_J(TraitsF16)
    case DType::kBFloat16: MEDMAP_GKL_FWD_J(TraitsBF16)
    case DType::kFloat64: MEDMAP_GKL_FWD_J(TraitsF64)
  }
#undef MEDMAP_GKL_FWD_J
  return cudaErrorInvalidValue;
}

namespace {

struct KlBwdPlan {
  int tc_log2;
  int64_t ctiles;
  int64_t chunks;
  int64_t rows_per_chunk;
};

// A function of the shape only, so the statistics' summation order is too.
KlBwdPlan plan_gkl_bwd(const KlShape& sh) {
  KlBwdPlan bp{};
  int lg = 0;
  while (lg < 8 && (int64_t{1} << lg) < sh.C) ++lg;
  bp.tc_log2 = lg;
  bp.ctiles = sh.C > 0 ? ceil_div(sh.C, int64_t{1} << lg) : 0;
  const int64_t N = sh.G * sh.R;
  const int64_t rp = kl_rows_per_pass(kThreads >> lg);
  int64_t want = bp.ctiles > 0 ? kKlTargetBlocks / bp.ctiles : 1;
  const int64_t cap = kKlMaxPartials / (3 * sh.J * (sh.C > 0 ? sh.C : 1));
  if (want > cap) want = cap;
  if (want < 1) want = 1;
  bp.rows_per_chunk = ceil_div(ceil_div(N > 0 ? N : 1, want), rp) * rp;
  bp.chunks = ceil_div(N, bp.rows_per_chunk);
  return bp;
}

template <class Tr, int JB>
cudaError_t gkl_bwd_jb(const KlBwdParams& p, cudaStream_t stream) {
  gkl_bwd_kernel<Tr, JB><<<grid_for(p.nblocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t gkl_bwd_workspace_bytes(DType dtype, const KlShape& shape, bool with_stats) {
  if (!valid_kl_shape(shape) || !valid_dtype(dtype) || !with_stats) return 0;
  const KlBwdPlan bp = plan_gkl_bwd(shape);
  return static_cast<size_t>(3 * shape.J * shape.C * bp.chunks) * acc_size(dtype);
}

cudaError_t launch_gkl_bwd(DType dtype, const KlShape& shape, const StridedTensor3& mu,
                           const StridedTensor3& logvar, const uint8_t* present, const void* nu,
                           const void* logtau2, const void* resp, const RowWeights& w,
                           const StridedTensor3* grad_mu, const StridedTensor3* grad_logvar,
                           void* stats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (!valid_kl_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (resp == nullptr && shape.J != 1) return cudaErrorInvalidValue;
  const size_t need = gkl_bwd_workspace_bytes(dtype, shape, stats != nullptr);
  if (!workspace_ok(workspace, workspace_bytes, need, dtype)) return cudaErrorInvalidValue;
  const KlBwdPlan bp = plan_gkl_bwd(shape);

  KlBwdParams p{};
  p.mu = mu;
  p.logvar = logvar;
  if (grad_mu != nullptr) p.gmu = *grad_mu;
  if (grad_logvar != nullptr) p.glv = *grad_logvar;
  p.present = present;
  p.nu = nu;
  p.logtau2 = logtau2;
  p.resp = resp;
  p.w = w;
  p.part = stats != nullptr ? workspace : nullptr;
  p.R = shape.R;
  p.C = shape.C;
  p.N = shape.G * shape.R;
  p.ctiles = bp.ctiles;
  p.chunks = bp.chunks;
  p.rows_per_chunk = bp.rows_per_chunk;
  p.nblocks = bp.ctiles * bp.chunks;
  p.J = static_cast<int>(shape.J);
  p.tc_log2 = bp.tc_log2;

  if (p.nblocks > 0 && (grad_mu != nullptr || grad_logvar != nullptr || stats != nullptr)) {
    cudaError_t err = cudaErrorInvalidValue;
#define MEDMAP_GKL_BWD_J(TR)                         \
  switch (kl_jb(shape.J)) {                          \
    case 1: err = gkl_bwd_jb<TR, 1>(p, stream); break;  \
    case 2: err = gkl_bwd_jb<TR, 2>(p, stream); break;  \
    case 4: err = gkl_bwd_jb<TR, 4>(p, stream); break;  \
    case 8: err = gkl_bwd_jb<TR, 8>(p, stream); break;  \
    default: err = gkl_bwd_jb<TR, 16>(p, stream); break; \
  }                                                  \
  break;
    switch (dtype) {
      case DType::kFloat32: MEDMAP_GKL_BWD_J(TraitsF32)
      case DType::kFloat16: MEDMAP_GKL_BWD_J(TraitsF16)
      case DType::kBFloat16: MEDMAP_GKL_BWD_J(TraitsBF16)
      case DType::kFloat64: MEDMAP_GKL_BWD_J(TraitsF64)
    }
#undef MEDMAP_GKL_BWD_J
    if (err != cudaSuccess) return err;
  }
  if (stats == nullptr) return cudaSuccess;
  return sum_partials(dtype, workspace, nullptr, stats, 3 * shape.J * shape.C, shape.C, 1, 0,
                      p.nblocks > 0 ? p.chunks : 0, stream);
}

}  // namespace gpu
}  // namespace medmap_fast
