// CUDA kernels of the fused normalisation + activation (+ residual) op;
// semantics in csrc/cpu/norm_act_cpu.h, launch interface in
// norm_act_kernels.h.
//
// No torch headers here: this translation unit builds with a bare nvcc.
//
// Passes. Forward: a statistics pass reads x once and writes per-chunk
// moments, small kernels merge them per (b, c) row and then per (b, g) group
// into mean/rstd, and a normalise pass reads x (and the residual) and writes
// y. Backward: a sums pass reads x and dy (and the residual in mode 1) and
// writes per-chunk sums of g and g * (x - mean), small kernels turn them
// into per-row sums and then into dweight, dbias and two per-group
// coefficients, and a dx pass reads x and dy again and writes dx (and dres).
// Every big pass is one streaming sweep; the small kernels touch
// O(B * C * chunks) values, the row level keeping them parallel over B * C
// blocks even when a group spans many channels.
//
// Decomposition. A launch's (B, C, S) index space is cut into items of one
// of two plans, chosen from the strides of every tensor of the pass:
//   * row plan (stride_s == 1, or the scalar fallback for layouts that fit
//     neither plan): L lanes (a power of two up to 256) share one (b, c)
//     row, and a block of 256 threads holds 256 / L rows, so long rows get a
//     whole block and short rows are packed several to a block. Per-row
//     coefficients live in registers.
//   * channel plan (stride_c == 1): a block owns (b, tile of up to 64
//     channels, chunk of S); threads are TX channel groups x TY voxels, so a
//     warp reads whole contiguous voxels. Per-channel coefficients of the
//     tile are staged in shared memory, which keeps the per-thread register
//     footprint independent of the channel count.
// A thread moves groups ("units") of VEC elements, VEC * sizeof(element) ==
// 16 bytes, contiguous in S (row plan) or in C (channel plan); U units per
// thread form a tile, and a chunk is a fixed number of whole tiles of one
// row (row plan) or one channel tile (channel plan). A unit is moved with one
// 128-bit access when every tensor of the pass is suitably aligned, element
// by element otherwise; the grouping, and so every summation order, is the
// same either way.
//
// Determinism. The chunking is a function of the shape, the dtype and the
// plan only. Within a chunk a thread folds its tiles in order, the lanes that
// share a row or channel are combined by a fixed shuffle tree and the warps
// in ascending order, and one partial per (b, c, chunk) is written; the
// merge kernels combine the partials of an output in a fixed order. No
// atomics anywhere.
//
// Statistics stay accurate for data far from zero: each thread takes exact
// two-pass moments of the few values of a tile it holds in registers, and
// everything above that (tiles, lanes, warps, chunks, channels of a group) is
// merged with Chan's formula; no sum of squares is ever formed.
//
// The element-wise passes walk their items in reverse, so that they start on
// the data the preceding reduction pass touched last, which is the part most
// likely to still be in L2.

#include "norm_act_kernels.h"
#include "device_common.cuh"

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace medmap_fast {
namespace gpu {
namespace {

// Channel plan: channels per tile, which bounds the shared buffers.
constexpr int kChanCols = 64;
// Units per thread and tile. The single-input statistics pass and the
// forward pass take four (64 bytes of x in flight per thread); the backward
// passes read two or three tensors and take two, which keeps a similar
// number of bytes in flight with half the registers.
constexpr int kStatsUnits = 4;
constexpr int kNormUnits = 4;
constexpr int kBwdUnits = 2;
// Items aimed at per launch (a few waves of resident blocks on the largest
// GPUs, for any split of the work into rows) and the most tiles one chunk may
// hold; both only shape the chunking, so they are fixed constants rather than
// properties of the device.
constexpr int64_t kTargetItems = 4096;
constexpr int64_t kMaxTilesPerChunk = 64;

enum Plan : int {
  kRowPlan = 0,
  kChanPlan = 1,
};

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// a * b + c rounded once. Spelled out wherever a product feeds a sum that
// two code paths (or the forward and the backward) must compute identically,
// so that the result never depends on how the compiler contracts each site.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// One 16-byte unit of element type S.
template <typename S>
using Pack = Pack16<S, static_cast<int>(kVecBytes / sizeof(S))>;

// ---------------------------------------------------------------------------
// Launch geometry.

struct Tiling {
  int64_t B;
  int64_t C;
  int64_t S;
  int64_t G;
  int64_t Cg;         // channels per group
  int64_t lines;      // row plan: blocks of 256 / L rows; channel plan: (b, channel tile) pairs
  int64_t ctiles;     // channel plan: channel tiles per sample; 1 otherwise
  int64_t tile_len;   // S positions per tile
  int64_t tiles;      // tiles per chunk
  int64_t chunk_len;  // S positions per chunk (tiles * tile_len)
  int64_t chunks;     // chunks per (b, c) row
  int64_t items;      // lines * chunks; the grid may be smaller and loop
  int lo_log2;        // row plan: log2 of lanes per row; channel plan: log2 of TX
  int vec;            // nonzero: every tensor of the pass admits 16-byte accesses
  int fast;           // nonzero: vec, and every tensor of the pass has the same strides
};

// Reduction slots in shared memory: one per warp (row plan), one per warp
// and channel group (channel plan).
template <int VEC, int kPlan>
__host__ __device__ constexpr int red_slots() {
  return kPlan == kChanPlan ? kWarps * (kChanCols / VEC) : kWarps;
}

// Where one thread's units are for one item. Unit u of tile t starts at S
// position pos0 + t * tile_step + u * unit_step; units of a tile are
// interleaved across the lanes of a row (row plan) or the voxel rows of the
// block (channel plan), so each warp-wide access is contiguous.
template <int VEC, int U, int kPlan>
struct Geo {
  int64_t b;
  int64_t c;  // row plan: the row's channel; channel plan: first channel of the thread's group
  int64_t chunk;
  int64_t pos0;
  int unit_step;  // at most 256 * VEC * U, so int arithmetic suffices per tile
  int tile_step;
  int ntiles;  // tiles of the chunk that start before S (uniform over the block)
  int nch;     // row plan: 1, or 0 for a row slot past B * C; channel plan: valid channels
  int col0;    // channel plan: the group's column in the tile

  __device__ __forceinline__ void init(const Tiling& g, int64_t item, int tid) {
    const int lo = g.lo_log2;
    if constexpr (kPlan == kRowPlan) {
      chunk = item % g.chunks;
      const int64_t line = item / g.chunks;
      const int lane = tid & ((1 << lo) - 1);
      const int64_t row = line * (kThreads >> lo) + (tid >> lo);
      const bool ok = row < g.B * g.C;
      b = ok ? row / g.C : 0;
      c = ok ? row - b * g.C : 0;
      nch = ok ? 1 : 0;
      col0 = 0;
      unit_step = VEC << lo;
      pos0 = chunk * g.chunk_len + static_cast<int64_t>(lane) * VEC;
    } else {
      const int64_t ctile = item % g.ctiles;
      const int64_t rest = item / g.ctiles;
      chunk = rest % g.chunks;
      b = rest / g.chunks;
      col0 = (tid & ((1 << lo) - 1)) * VEC;
      c = ctile * (static_cast<int64_t>(VEC) << lo) + col0;
      const int64_t left = g.C - c;
      nch = left <= 0 ? 0 : (left >= VEC ? VEC : static_cast<int>(left));
      unit_step = kThreads >> lo;
      pos0 = chunk * g.chunk_len + (tid >> lo);
    }
    tile_step = unit_step * U;
    const int64_t rem = g.S - chunk * g.chunk_len;
    const int64_t nt = (rem + g.tile_len - 1) / g.tile_len;
    ntiles = static_cast<int>(nt < g.tiles ? nt : g.tiles);
  }

  __device__ __forceinline__ int64_t pos(int t, int u) const {
    return pos0 + (t * tile_step + u * unit_step);
  }

  // Valid elements of unit u of tile t: a prefix of the VEC elements in the
  // row plan, all nch channels or nothing in the channel plan.
  __device__ __forceinline__ int count(int t, int u, int64_t S) const {
    const int64_t left = S - pos(t, u);
    if constexpr (kPlan == kRowPlan) {
      return (nch == 0 || left <= 0) ? 0 : (left >= VEC ? VEC : static_cast<int>(left));
    } else {
      return left > 0 ? nch : 0;
    }
  }

  // Every unit of tile t holds VEC valid elements.
  __device__ __forceinline__ bool full(int t, int64_t S) const {
    if constexpr (kPlan == kRowPlan) {
      return nch != 0 && pos(t, U - 1) + VEC <= S;
    } else {
      return nch == VEC && pos(t, U - 1) < S;
    }
  }

  __device__ __forceinline__ int64_t offset(const StridedTensor3& x, int t, int u) const {
    return b * x.stride_b + c * x.stride_c + pos(t, u) * x.stride_s;
  }

  __device__ __forceinline__ static int64_t inner(const StridedTensor3& x) {
    return kPlan == kRowPlan ? x.stride_s : x.stride_c;
  }
};

// Tiles are processed on one of two paths that perform the same arithmetic
// in the same order: full tiles of a vectorisable pass whose tensors share
// their strides load all their units with 128-bit accesses up front (the
// bytes in flight that the bandwidth needs); everything else goes unit by
// unit, so the fallback never holds a whole tile of scalars in registers.

// Full tiles of a pass whose tensors share their strides: one offset per
// unit serves every tensor, which keeps the address state of a thread small.
template <class Tr, int U>
__device__ __forceinline__ void load_full(const StridedTensor3& x, const int64_t (&off)[U],
                                          Pack<typename Tr::S> (&pk)[U]) {
  using S = typename Tr::S;
  const S* base = static_cast<const S*>(x.data);
#pragma unroll
  for (int u = 0; u < U; ++u) pk[u].raw = *reinterpret_cast<const uint4*>(base + off[u]);
}

template <class Tr>
__device__ __forceinline__ void store_full(const StridedTensor3& y, int64_t off,
                                           const Pack<typename Tr::S>& pk) {
  using S = typename Tr::S;
  *reinterpret_cast<uint4*>(static_cast<S*>(y.data) + off) = pk.raw;
}

template <int VEC, int U, int kPlan>
__device__ __forceinline__ void full_offsets(const StridedTensor3& ref,
                                             const Geo<VEC, U, kPlan>& geo, int t,
                                             int64_t (&off)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) off[u] = geo.offset(ref, t, u);
}

// n >= 1 valid elements; the rest read as zero.
template <class Tr, int VEC, int U, int kPlan>
__device__ __forceinline__ Pack<typename Tr::S> load_unit(const StridedTensor3& x,
                                                          const Geo<VEC, U, kPlan>& geo, int t,
                                                          int u, int n, bool vec) {
  using S = typename Tr::S;
  const S* p = static_cast<const S*>(x.data) + geo.offset(x, t, u);
  Pack<S> pk;
  if (vec && n == VEC) {
    pk.raw = *reinterpret_cast<const uint4*>(p);
  } else {
    const int64_t inner = Geo<VEC, U, kPlan>::inner(x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) pk.e[e] = e < n ? p[e * inner] : S(0);
  }
  return pk;
}

template <class Tr, int VEC, int U, int kPlan>
__device__ __forceinline__ void store_unit(const StridedTensor3& y, const Geo<VEC, U, kPlan>& geo,
                                           int t, int u, int n, bool vec,
                                           const Pack<typename Tr::S>& pk) {
  using S = typename Tr::S;
  S* p = static_cast<S*>(y.data) + geo.offset(y, t, u);
  if (vec && n == VEC) {
    *reinterpret_cast<uint4*>(p) = pk.raw;
  } else {
    const int64_t inner = Geo<VEC, U, kPlan>::inner(y);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e < n) p[e * inner] = pk.e[e];
    }
  }
}

// Per-channel coefficients of an item: registers in the row plan (one
// channel per thread), a shared table in the channel plan.
template <typename A, int K, int kPlan>
struct Coefs {
  A r[kPlan == kRowPlan ? K : 1];
  const A* s;  // channel plan: the thread's first column; kind k at s[k * kChanCols + e]

  __device__ __forceinline__ A get(int k, int e) const {
    if constexpr (kPlan == kRowPlan) {
      return r[k];
    } else {
      return s[k * kChanCols + e];
    }
  }
};

// fn(b, c, v) fills the K coefficients of channel c of sample b. In the
// channel plan this ends with a barrier (the caller must make sure the
// previous item's readers are past their last use of the table).
template <int K, class Fn, typename A, int VEC, int U, int kPlan>
__device__ __forceinline__ void load_coefs(const Fn& fn, const Tiling& g,
                                           const Geo<VEC, U, kPlan>& geo, A* table,
                                           Coefs<A, K, kPlan>& cf) {
  if constexpr (kPlan == kChanPlan) {
    const int cols = VEC << g.lo_log2;
    const int64_t first = geo.c - geo.col0;
    for (int i = static_cast<int>(threadIdx.x); i < cols; i += kThreads) {
      A v[K];
      if (first + i < g.C) {
        fn(geo.b, first + i, v);
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] = A(0);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) table[k * kChanCols + i] = v[k];
    }
    __syncthreads();
    cf.s = table + geo.col0;
  } else {
    if (geo.nch > 0) {
      fn(geo.b, geo.c, cf.r);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) cf.r[k] = A(0);
    }
    cf.s = nullptr;
  }
}

// (mean, a = rstd * weight, bias): z = (x - mean) * a + bias, the same
// expression in the forward and the backward so that both see the same sign
// of z.
template <typename A>
struct AffineCoefs {
  const A* weight;
  const A* bias;
  const A* mean;
  const A* rstd;
  int64_t G;
  int64_t Cg;

  __device__ __forceinline__ void operator()(int64_t b, int64_t c, A (&v)[3]) const {
    const int64_t gi = b * G + c / Cg;
    v[0] = mean[gi];
    v[1] = rstd[gi] * weight[c];
    v[2] = bias[c];
  }
};

// AffineCoefs plus the per-group terms k1 = rstd * m1 and k3 = rstd^2 * m2
// (m1, m2 of the contract), which turn the input gradient
// rstd * (g * weight - m1 - xhat * m2) into dx = g * a - k1 - (x - mean) * k3.
template <typename A>
struct GradCoefs {
  AffineCoefs<A> aff;
  const A* k1;
  const A* k3;

  __device__ __forceinline__ void operator()(int64_t b, int64_t c, A (&v)[5]) const {
    A w[3];
    aff(b, c, w);
    const int64_t gi = b * aff.G + c / aff.Cg;
    v[0] = w[0];
    v[1] = w[1];
    v[2] = w[2];
    v[3] = k1[gi];
    v[4] = k3[gi];
  }
};

// ---------------------------------------------------------------------------
// Block reductions over the threads that share a row (row plan) or a channel
// group (channel plan).

template <typename A, int NP>
struct Moments {
  A n;
  A mean[NP];
  A m2[NP];
};

template <typename A, int NP>
__device__ __forceinline__ void clear(Moments<A, NP>& v) {
  v.n = A(0);
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    v.mean[e] = A(0);
    v.m2[e] = A(0);
  }
}

// Channel k of merge(a, {tn, mb, m2b}) for a non-empty set of tn values,
// given wb = tn / (a.n + tn) and cross = a.n * wb; the caller then adds tn to
// a.n.
template <typename A, int NP>
__device__ __forceinline__ void absorb(Moments<A, NP>& a, int k, A mb, A m2b, A wb, A cross) {
  if (a.n == A(0)) {
    a.mean[k] = mb;
    a.m2[k] = m2b;
    return;
  }
  const A d = mb - a.mean[k];
  a.mean[k] = fma_acc(d, wb, a.mean[k]);
  a.m2[k] += fma_acc(d * d, cross, m2b);
}

// Chan's parallel update: a absorbs the disjoint set b (all NP channels
// share the count). Counts within a block stay far below 2^24, so they are
// exact in either accumulator type.
template <typename A, int NP>
__device__ __forceinline__ void merge(Moments<A, NP>& a, const Moments<A, NP>& b) {
  if (b.n == A(0)) return;
  const A tot = a.n + b.n;
  const A wb = b.n / tot;
  const A cross = a.n * wb;
#pragma unroll
  for (int e = 0; e < NP; ++e) absorb(a, e, b.mean[e], b.m2[e], wb, cross);
  a.n = tot;
}

// merge(v, the v of lane + off), one channel at a time so that only one
// channel of the other lane's moments is live.
template <typename A, int NP>
__device__ __forceinline__ void merge_down(Moments<A, NP>& v, int off) {
  const A nb = __shfl_down_sync(kFullMask, v.n, off);
  const A tot = v.n + nb;
  const A wb = nb != A(0) ? nb / tot : A(0);
  const A cross = v.n * wb;
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    const A mb = __shfl_down_sync(kFullMask, v.mean[e], off);
    const A qb = __shfl_down_sync(kFullMask, v.m2[e], off);
    if (nb != A(0)) absorb(v, e, mb, qb, wb, cross);
  }
  v.n = tot;
}

// Sums of g and of g * (x - mean); the factor rstd of g * xhat is applied
// per (b, group) when the partials are combined.
template <typename A, int NP>
struct Sums {
  A g[NP];
  A gd[NP];
};

template <typename A, int NP>
__device__ __forceinline__ void clear(Sums<A, NP>& v) {
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    v.g[e] = A(0);
    v.gd[e] = A(0);
  }
}

template <typename A, int NP>
__device__ __forceinline__ void merge(Sums<A, NP>& a, const Sums<A, NP>& b) {
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    a.g[e] += b.g[e];
    a.gd[e] += b.gd[e];
  }
}

template <typename A, int NP>
__device__ __forceinline__ void merge_down(Sums<A, NP>& v, int off) {
#pragma unroll
  for (int e = 0; e < NP; ++e) {
    v.g[e] += __shfl_down_sync(kFullMask, v.g[e], off);
    v.gd[e] += __shfl_down_sync(kFullMask, v.gd[e], off);
  }
}

// Combines v over the threads that share a row (row plan: the L lanes of a
// row slot) or a channel group (channel plan: the TY threads of one tx) and
// returns true in the one thread per row or group that then holds the total:
// lane 0 of the row, or thread tx of the block. Must be called by the whole
// block; when it contains barriers, it ends with one, so red (and any other
// shared buffer read before the call) may be rewritten afterwards.
template <int kPlan, class V>
__device__ __forceinline__ bool block_reduce(V& v, V* red, int lo_log2) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if constexpr (kPlan == kRowPlan) {
    const int L = 1 << lo_log2;
    const int top = L < 32 ? L : 32;
    for (int off = top >> 1; off > 0; off >>= 1) merge_down(v, off);
    const bool holder = (tid & (L - 1)) == 0;
    if (L <= 32) return holder;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (holder) {
      // The holder's warp is the first of its row and already holds red[warp].
      for (int w = 1; w < (L >> 5); ++w) merge(v, red[warp + w]);
    }
    __syncthreads();
    return holder;
  } else {
    const int TX = 1 << lo_log2;
    for (int off = TX; off < 32; off <<= 1) merge_down(v, off);
    if (lane < TX) red[warp * TX + lane] = v;
    __syncthreads();
    const bool holder = tid < TX;
    if (holder) {
      for (int w = 1; w < kWarps; ++w) merge(v, red[w * TX + tid]);
    }
    __syncthreads();
    return holder;
  }
}

// ---------------------------------------------------------------------------
// Forward.

struct StatsParams {
  StridedTensor3 x;
  void* part_mean;  // (B, C, chunks)
  void* part_m2;
  Tiling g;
};

template <class Tr, int kPlan>
__global__ void __launch_bounds__(kThreads, 4) stats_kernel(const StatsParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int U = kStatsUnits;
  constexpr bool kChan = kPlan == kChanPlan;
  constexpr int NP = kChan ? VEC : 1;
  // Values per channel in a full tile; a power of two, so scaling by its
  // reciprocal is exact and equals the division.
  constexpr int kFull = kChan ? U : U * VEC;
  using V = Moments<A, NP>;
  __shared__ V red[red_slots<VEC, kPlan>()];

  const Tiling& g = p.g;
  const int tid = static_cast<int>(threadIdx.x);
  const bool vec = g.vec != 0;
  const bool fast = g.fast != 0;

  for (int64_t item = blockIdx.x; item < g.items; item += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(g, item, tid);
    V run;
    clear(run);
    for (int t = 0; t < geo.ntiles; ++t) {
      // Exact two-pass moments of the thread's values of the tile, merged
      // into run channel by channel (Chan's update, as merge() computes it,
      // without holding a second set of per-channel moments).
      if (fast && geo.full(t, g.S)) {
        int64_t off[U];
        full_offsets(p.x, geo, t, off);
        Pack<S> x[U];
        load_full<Tr>(p.x, off, x);
        const A tn = A(kFull);
        const A tot = run.n + tn;
        const A wb = tn / tot;
        const A cross = run.n * wb;
#pragma unroll
        for (int k = 0; k < NP; ++k) {
          A sum = A(0);
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (kChan ? e == k : true) sum += Tr::to_acc(x[u].e[e]);
            }
          }
          const A mt = sum * (A(1) / A(kFull));
          A q = A(0);
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (kChan ? e == k : true) {
                const A d = Tr::to_acc(x[u].e[e]) - mt;
                q = fma_acc(d, d, q);
              }
            }
          }
          absorb(run, k, mt, q, wb, cross);
        }
        run.n = tot;
      } else {
        // The same sums in the same order, unit by unit; the deviations read
        // the units again (from cache) rather than holding the tile. Padding
        // reads as zero, which adds nothing to the sums but is kept out of
        // the deviations.
        int cnt = 0;
        A sum[NP];
#pragma unroll
        for (int k = 0; k < NP; ++k) sum[k] = A(0);
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(t, u, g.S);
          if (n == 0) break;
          const Pack<S> x = load_unit<Tr>(p.x, geo, t, u, n, vec);
          cnt += kChan ? 1 : n;
#pragma unroll
          for (int e = 0; e < VEC; ++e) sum[kChan ? e : 0] += Tr::to_acc(x.e[e]);
        }
        if (cnt == 0) continue;
        A q[NP];
#pragma unroll
        for (int k = 0; k < NP; ++k) {
          sum[k] = cnt == kFull ? sum[k] * (A(1) / A(kFull)) : sum[k] / A(cnt);
          q[k] = A(0);
        }
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(t, u, g.S);
          if (n == 0) break;
          const Pack<S> x = load_unit<Tr>(p.x, geo, t, u, n, vec);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A d = Tr::to_acc(x.e[e]) - sum[kChan ? e : 0];
            if (kChan || e < n) q[kChan ? e : 0] = fma_acc(d, d, q[kChan ? e : 0]);
          }
        }
        const A tn = A(cnt);
        const A tot = run.n + tn;
        const A wb = tn / tot;
        const A cross = run.n * wb;
#pragma unroll
        for (int k = 0; k < NP; ++k) absorb(run, k, sum[k], q[k], wb, cross);
        run.n = tot;
      }
    }
    if (block_reduce<kPlan>(run, red, g.lo_log2)) {
      A* pm = static_cast<A*>(p.part_mean);
      A* pq = static_cast<A*>(p.part_m2);
#pragma unroll
      for (int e = 0; e < NP; ++e) {
        if (e < geo.nch) {
          const int64_t i = (geo.b * g.C + geo.c + e) * g.chunks + geo.chunk;
          pm[i] = run.mean[e];
          pq[i] = run.m2[e];
        }
      }
    }
  }
}

// Elements of partial chunk k of a row.
__device__ __forceinline__ int64_t chunk_count(int64_t k, int64_t chunk_len, int64_t S) {
  const int64_t left = S - k * chunk_len;
  return left < chunk_len ? left : chunk_len;
}

// Chan's update with double counts, which stay exact for any group size.
template <typename A>
__device__ __forceinline__ void merge_counted(double& n, A& mean, A& m2, double nb, A mb, A m2b) {
  if (nb == 0.0) return;
  if (n == 0.0) {
    n = nb;
    mean = mb;
    m2 = m2b;
    return;
  }
  const double tot = n + nb;
  const double wbd = nb / tot;
  const A wb = static_cast<A>(wbd);
  const A cross = static_cast<A>(n * wbd);
  const A d = mb - mean;
  mean = fma_acc(d, wb, mean);
  m2 += fma_acc(d * d, cross, m2b);
  n = tot;
}

// Merges the `per` consecutive moment partials of each output o (partial j
// holding chunk_count(j % chunks) values) in a fixed order: thread t takes
// partials t, t + 256, ... in turn, then a shuffle tree and the warps in
// ascending order. Used twice: per (b, c) row over its chunks, then, when a
// group has several channels, per (b, g) over the rows of its channels
// (chunks = 1, chunk_len = S). With `final`, `second` receives rstd instead
// of m2.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    merge_moments_kernel(const A* __restrict__ pmean, const A* __restrict__ pm2,
                         A* __restrict__ mean, A* __restrict__ second, int64_t n_out, int64_t per,
                         int64_t chunks, int64_t chunk_len, int64_t S, A eps, int final) {
  __shared__ double wn[kWarps];
  __shared__ A wmean[kWarps];
  __shared__ A wm2[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    const A* pmo = pmean + o * per;
    const A* pqo = pm2 + o * per;
    double n = 0.0;
    A mu = A(0);
    A q = A(0);
    for (int64_t j = tid; j < per; j += kThreads) {
      const double nj = static_cast<double>(chunk_count(j % chunks, chunk_len, S));
      merge_counted(n, mu, q, nj, pmo[j], pqo[j]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double nb = __shfl_down_sync(kFullMask, n, off);
      const A mb = __shfl_down_sync(kFullMask, mu, off);
      const A qb = __shfl_down_sync(kFullMask, q, off);
      merge_counted(n, mu, q, nb, mb, qb);
    }
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
      for (int w = 1; w < kWarps; ++w) merge_counted(tn, tm, t2, wn[w], wmean[w], wm2[w]);
      mean[o] = tm;
      second[o] = final ? A(1) / sqrt_acc(t2 / static_cast<A>(tn) + eps) : t2;
    }
    __syncthreads();
  }
}

struct FwdParams {
  StridedTensor3 x;
  StridedTensor3 r;  // modes 1 and 2
  StridedTensor3 y;
  const void* weight;
  const void* bias;
  const void* mean;
  const void* rstd;
  double slope;
  Tiling g;
};

// Variants that also stream the residual keep more registers and take three
// blocks per SM instead of four; they have more bytes in flight per thread.
template <class Tr, int kPlan, int kMode>
__global__ void __launch_bounds__(kThreads, kMode != 0 ? 3 : 4)
    normalize_kernel(const FwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int U = kNormUnits;
  constexpr int K = 3;
  __shared__ A table[kPlan == kChanPlan ? K * kChanCols : 1];

  const Tiling& g = p.g;
  const int tid = static_cast<int>(threadIdx.x);
  const bool vec = g.vec != 0;
  const bool fast = g.fast != 0;
  const A slope = static_cast<A>(p.slope);
  const AffineCoefs<A> fn{static_cast<const A*>(p.weight), static_cast<const A*>(p.bias),
                          static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), g.G,
                          g.Cg};

  for (int64_t blk = blockIdx.x; blk < g.items; blk += gridDim.x) {
    const int64_t item = g.items - 1 - blk;
    Geo<VEC, U, kPlan> geo;
    geo.init(g, item, tid);
    Coefs<A, K, kPlan> cf;
    load_coefs<K>(fn, g, geo, table, cf);

    auto elem = [&](S xs, S rs, A m, A a, A bb) -> S {
      const A d = Tr::to_acc(xs) - m;
      A z = fma_acc(d, a, bb);
      if constexpr (kMode == 1) z += Tr::to_acc(rs);
      A yv = z > A(0) ? z : z * slope;
      if constexpr (kMode == 2) yv += Tr::to_acc(rs);
      return Tr::from_acc(yv);
    };
    auto compute = [&](const Pack<S>& x, const Pack<S>& r) {
      Pack<S> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        out.e[e] = elem(x.e[e], r.e[e], cf.get(0, e), cf.get(1, e), cf.get(2, e));
      }
      return out;
    };

    for (int t = 0; t < geo.ntiles; ++t) {
      if (fast && geo.full(t, g.S)) {
        int64_t off[U];
        full_offsets(p.x, geo, t, off);
        Pack<S> x[U];
        Pack<S> r[U];
        load_full<Tr>(p.x, off, x);
        if constexpr (kMode != 0) load_full<Tr>(p.r, off, r);
        if constexpr (kPlan == kChanPlan) {
          // Channel-major, so that only one channel's coefficients are live.
          Pack<S> out[U];
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A m = cf.get(0, e);
            const A a = cf.get(1, e);
            const A bb = cf.get(2, e);
#pragma unroll
            for (int u = 0; u < U; ++u) {
              out[u].e[e] = elem(x[u].e[e], kMode != 0 ? r[u].e[e] : x[u].e[e], m, a, bb);
            }
          }
#pragma unroll
          for (int u = 0; u < U; ++u) store_full<Tr>(p.y, off[u], out[u]);
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            store_full<Tr>(p.y, off[u], compute(x[u], kMode != 0 ? r[u] : x[u]));
          }
        }
      } else {
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(t, u, g.S);
          if (n == 0) break;
          const Pack<S> x = load_unit<Tr>(p.x, geo, t, u, n, vec);
          const Pack<S> r = kMode != 0 ? load_unit<Tr>(p.r, geo, t, u, n, vec) : x;
          store_unit<Tr>(p.y, geo, t, u, n, vec, compute(x, r));
        }
      }
    }
    if constexpr (kPlan == kChanPlan) __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Backward.

struct BwdParams {
  StridedTensor3 x;
  StridedTensor3 r;  // mode 1
  StridedTensor3 dy;
  StridedTensor3 dx;
  StridedTensor3 dres;  // data null when not wanted
  const void* weight;
  const void* bias;
  const void* mean;
  const void* rstd;
  const void* k1;  // (B, G), from finalize_bwd_kernel
  const void* k3;
  void* part_g;  // (B, C, chunks)
  void* part_gd;
  double slope;
  Tiling g;
};

template <class Tr, int kPlan, bool kRes>
__global__ void __launch_bounds__(kThreads, kRes ? 3 : 4) grad_sums_kernel(const BwdParams p) {
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int U = kBwdUnits;
  constexpr int K = 3;
  constexpr bool kChan = kPlan == kChanPlan;
  constexpr int NP = kChan ? VEC : 1;
  using V = Sums<A, NP>;
  __shared__ V red[red_slots<VEC, kPlan>()];
  __shared__ A table[kChan ? K * kChanCols : 1];

  const Tiling& g = p.g;
  const int tid = static_cast<int>(threadIdx.x);
  const bool vec = g.vec != 0;
  const bool fast = g.fast != 0;
  const A slope = static_cast<A>(p.slope);
  const AffineCoefs<A> fn{static_cast<const A*>(p.weight), static_cast<const A*>(p.bias),
                          static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), g.G,
                          g.Cg};

  for (int64_t item = blockIdx.x; item < g.items; item += gridDim.x) {
    Geo<VEC, U, kPlan> geo;
    geo.init(g, item, tid);
    Coefs<A, K, kPlan> cf;
    load_coefs<K>(fn, g, geo, table, cf);
    V acc;
    clear(acc);

    auto elem = [&](S xs, S dys, S rs, A m, A a, A bb, A& sg, A& sgd) {
      const A d = Tr::to_acc(xs) - m;
      A z = fma_acc(d, a, bb);
      if constexpr (kRes) z += Tr::to_acc(rs);
      const A gy = Tr::to_acc(dys);
      const A gg = z > A(0) ? gy : gy * slope;
      sg += gg;
      sgd = fma_acc(gg, d, sgd);
    };

    for (int t = 0; t < geo.ntiles; ++t) {
      if (fast && geo.full(t, g.S)) {
        int64_t off[U];
        full_offsets(p.x, geo, t, off);
        Pack<S> x[U];
        Pack<S> dy[U];
        Pack<S> r[U];
        load_full<Tr>(p.x, off, x);
        load_full<Tr>(p.dy, off, dy);
        if constexpr (kRes) load_full<Tr>(p.r, off, r);
        // Each channel's values are added in unit order on both paths; the
        // channel plan walks channel-major so that one channel's
        // coefficients are live at a time.
        if constexpr (kChan) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A m = cf.get(0, e);
            const A a = cf.get(1, e);
            const A bb = cf.get(2, e);
#pragma unroll
            for (int u = 0; u < U; ++u) {
              elem(x[u].e[e], dy[u].e[e], kRes ? r[u].e[e] : x[u].e[e], m, a, bb, acc.g[e],
                   acc.gd[e]);
            }
          }
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              elem(x[u].e[e], dy[u].e[e], kRes ? r[u].e[e] : x[u].e[e], cf.get(0, e),
                   cf.get(1, e), cf.get(2, e), acc.g[0], acc.gd[0]);
            }
          }
        }
      } else {
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(t, u, g.S);
          if (n == 0) break;
          const Pack<S> x = load_unit<Tr>(p.x, geo, t, u, n, vec);
          const Pack<S> dy = load_unit<Tr>(p.dy, geo, t, u, n, vec);
          const Pack<S> r = kRes ? load_unit<Tr>(p.r, geo, t, u, n, vec) : x;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            // Padding is left out explicitly: d is not 0 there.
            if (kChan || e < n) {
              elem(x.e[e], dy.e[e], r.e[e], cf.get(0, e), cf.get(1, e), cf.get(2, e),
                   acc.g[kChan ? e : 0], acc.gd[kChan ? e : 0]);
            }
          }
        }
      }
    }
    if (block_reduce<kPlan>(acc, red, g.lo_log2)) {
      A* pg = static_cast<A*>(p.part_g);
      A* pgd = static_cast<A*>(p.part_gd);
#pragma unroll
      for (int e = 0; e < NP; ++e) {
        if (e < geo.nch) {
          const int64_t i = (geo.b * g.C + geo.c + e) * g.chunks + geo.chunk;
          pg[i] = acc.g[e];
          pgd[i] = acc.gd[e];
        }
      }
    }
  }
}

// Fixed-order sum of (s1, s2) over the block; the totals are valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum2(A& s1, A& s2, A* w1, A* w2) {
  const int tid = static_cast<int>(threadIdx.x);
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if ((tid & 31) == 0) {
    w1[tid >> 5] = s1;
    w2[tid >> 5] = s2;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) {
      s1 += w1[w];
      s2 += w2[w];
    }
  }
  __syncthreads();
}

// out1[o], out2[o] = fixed-order sums of the `per` consecutive partials of
// output o, for the per-(b, c) sums over the chunks of a row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_rows_kernel(const A* __restrict__ p1, const A* __restrict__ p2, A* __restrict__ out1,
                    A* __restrict__ out2, int64_t n_out, int64_t per) {
  __shared__ A w1[kWarps];
  __shared__ A w2[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    A s1 = A(0);
    A s2 = A(0);
    for (int64_t j = tid; j < per; j += kThreads) {
      s1 += p1[o * per + j];
      s2 += p2[o * per + j];
    }
    block_sum2(s1, s2, w1, w2);
    if (tid == 0) {
      out1[o] = s1;
      out2[o] = s2;
    }
  }
}

// From the per-(b, c) sums sg (of g) and sgd (of g * (x - mean)):
// outputs 0 .. B*G-1: group o = (b, g) gets k1 = rstd * m1 and
// k3 = rstd^2 * m2 = rstd^3 * mean(g * weight * (x - mean)) over its
// channels (contiguous rows); outputs B*G .. +C: channel c gets
// dbias = sum over b of sg and dweight = sum over b of rstd[b, g(c)] * sgd.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_bwd_kernel(const A* __restrict__ sg, const A* __restrict__ sgd,
                        const A* __restrict__ weight, const A* __restrict__ rstd,
                        A* __restrict__ dweight, A* __restrict__ dbias, A* __restrict__ k1,
                        A* __restrict__ k3, int64_t B, int64_t C, int64_t G, int64_t S) {
  __shared__ A w1[kWarps];
  __shared__ A w2[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t Cg = C / G;
  const int64_t n_groups = B * G;
  const int64_t n_out = n_groups + C;
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    A s1 = A(0);
    A s2 = A(0);
    if (o < n_groups) {
      const int64_t c0 = (o % G) * Cg;
      for (int64_t j = tid; j < Cg; j += kThreads) {
        const A w = weight[c0 + j];
        s1 += w * sg[o * Cg + j];
        s2 += w * sgd[o * Cg + j];
      }
    } else {
      const int64_t c = o - n_groups;
      const int64_t gc = c / Cg;
      for (int64_t b = tid; b < B; b += kThreads) {
        s1 += sg[b * C + c];
        s2 += rstd[b * G + gc] * sgd[b * C + c];
      }
    }
    block_sum2(s1, s2, w1, w2);
    if (tid == 0) {
      if (o < n_groups) {
        const A inv_n = A(1) / static_cast<A>(static_cast<double>(Cg) * static_cast<double>(S));
        const A rs = rstd[o];
        k1[o] = rs * (s1 * inv_n);
        k3[o] = rs * (rs * (rs * (s2 * inv_n)));
      } else {
        dbias[o - n_groups] = s1;
        dweight[o - n_groups] = s2;
      }
    }
  }
}

// kOut: 0 no residual, 1 residual (mode 1), 2 residual and dres.
template <class Tr, int kPlan, int kOut>
__global__ void __launch_bounds__(kThreads, kOut != 0 ? 3 : 4)
    grad_input_kernel(const BwdParams p) {
  constexpr bool kRes = kOut != 0;
  constexpr bool kDres = kOut == 2;
  using S = typename Tr::S;
  using A = typename Tr::A;
  constexpr int VEC = kVecBytes / static_cast<int>(sizeof(S));
  constexpr int U = kBwdUnits;
  constexpr int K = 5;
  __shared__ A table[kPlan == kChanPlan ? K * kChanCols : 1];

  const Tiling& g = p.g;
  const int tid = static_cast<int>(threadIdx.x);
  const bool vec = g.vec != 0;
  const bool fast = g.fast != 0;
  const A slope = static_cast<A>(p.slope);
  const GradCoefs<A> fn{
      AffineCoefs<A>{static_cast<const A*>(p.weight), static_cast<const A*>(p.bias),
                     static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), g.G, g.Cg},
      static_cast<const A*>(p.k1), static_cast<const A*>(p.k3)};

  for (int64_t blk = blockIdx.x; blk < g.items; blk += gridDim.x) {
    const int64_t item = g.items - 1 - blk;
    Geo<VEC, U, kPlan> geo;
    geo.init(g, item, tid);
    Coefs<A, K, kPlan> cf;
    load_coefs<K>(fn, g, geo, table, cf);

    auto elem = [&](S xs, S dys, S rs, A m, A a, A bb, A c1, A c3, S& gx, S& gr) {
      const A d = Tr::to_acc(xs) - m;
      A z = fma_acc(d, a, bb);
      if constexpr (kRes) z += Tr::to_acc(rs);
      const A gy = Tr::to_acc(dys);
      const A gg = z > A(0) ? gy : gy * slope;
      gx = Tr::from_acc((gg * a - c1) - d * c3);
      gr = Tr::from_acc(gg);
    };
    auto compute = [&](const Pack<S>& x, const Pack<S>& dy, const Pack<S>& r, Pack<S>& gx,
                       Pack<S>& gr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        elem(x.e[e], dy.e[e], r.e[e], cf.get(0, e), cf.get(1, e), cf.get(2, e), cf.get(3, e),
             cf.get(4, e), gx.e[e], gr.e[e]);
      }
    };

    for (int t = 0; t < geo.ntiles; ++t) {
      if (fast && geo.full(t, g.S)) {
        int64_t off[U];
        full_offsets(p.x, geo, t, off);
        Pack<S> x[U];
        Pack<S> dy[U];
        Pack<S> r[U];
        load_full<Tr>(p.x, off, x);
        load_full<Tr>(p.dy, off, dy);
        if constexpr (kRes) load_full<Tr>(p.r, off, r);
        Pack<S> gx[U];
        Pack<S> gr[U];
        if constexpr (kPlan == kChanPlan) {
          // Channel-major, so that only one channel's coefficients are live.
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const A m = cf.get(0, e);
            const A a = cf.get(1, e);
            const A bb = cf.get(2, e);
            const A c1 = cf.get(3, e);
            const A c3 = cf.get(4, e);
#pragma unroll
            for (int u = 0; u < U; ++u) {
              elem(x[u].e[e], dy[u].e[e], kRes ? r[u].e[e] : x[u].e[e], m, a, bb, c1, c3,
                   gx[u].e[e], gr[u].e[e]);
            }
          }
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) compute(x[u], dy[u], kRes ? r[u] : x[u], gx[u], gr[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          store_full<Tr>(p.dx, off[u], gx[u]);
          if constexpr (kDres) store_full<Tr>(p.dres, off[u], gr[u]);
        }
      } else {
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
          const int n = geo.count(t, u, g.S);
          if (n == 0) break;
          const Pack<S> x = load_unit<Tr>(p.x, geo, t, u, n, vec);
          const Pack<S> dy = load_unit<Tr>(p.dy, geo, t, u, n, vec);
          const Pack<S> r = kRes ? load_unit<Tr>(p.r, geo, t, u, n, vec) : x;
          Pack<S> gx;
          Pack<S> gr;
          compute(x, dy, r, gx, gr);
          store_unit<Tr>(p.dx, geo, t, u, n, vec, gx);
          if constexpr (kDres) store_unit<Tr>(p.dres, geo, t, u, n, vec, gr);
        }
      }
    }
    if constexpr (kPlan == kChanPlan) __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host-side planning.

bool valid_shape(const NormActShape& sh) {
  return sh.B >= 1 && sh.C >= 1 && sh.S >= 1 && sh.G >= 1 && sh.C % sh.G == 0;
}

size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The tensors of one pass; plan and alignment are decided jointly since
// every tensor is addressed through the same units.
struct TensorSet {
  const StridedTensor3* t[5];
  int n = 0;
  void add(const StridedTensor3* x) {
    if (x != nullptr && x->data != nullptr) t[n++] = x;
  }
};

struct Layout {
  Plan plan;
  bool vec;
  bool same_strides;
};

// Strides of size-1 dimensions never influence addressing and are ignored.
Layout choose_layout(const NormActShape& sh, const TensorSet& ts, int vec_elems) {
  bool s_unit = true;
  bool c_unit = true;
  for (int i = 0; i < ts.n; ++i) {
    if (sh.S > 1 && ts.t[i]->stride_s != 1) s_unit = false;
    if (sh.C > 1 && ts.t[i]->stride_c != 1) c_unit = false;
  }
  Layout lay{kRowPlan, false, false};
  if (s_unit && sh.S > 1) {
    lay.plan = kRowPlan;
  } else if (c_unit && sh.C > 1) {
    lay.plan = kChanPlan;
  } else {
    return lay;  // scalar strided accesses through the row plan
  }
  lay.vec = true;
  lay.same_strides = true;
  const StridedTensor3& first = *ts.t[0];
  for (int i = 0; i < ts.n; ++i) {
    const StridedTensor3& x = *ts.t[i];
    if (reinterpret_cast<uintptr_t>(x.data) % kVecBytes != 0) lay.vec = false;
    if (sh.B > 1 && x.stride_b % vec_elems != 0) lay.vec = false;
    const int64_t outer_n = lay.plan == kChanPlan ? sh.S : sh.C;
    const int64_t outer_stride = lay.plan == kChanPlan ? x.stride_s : x.stride_c;
    if (outer_n > 1 && outer_stride % vec_elems != 0) lay.vec = false;
    if ((sh.B > 1 && x.stride_b != first.stride_b) || (sh.C > 1 && x.stride_c != first.stride_c) ||
        (sh.S > 1 && x.stride_s != first.stride_s)) {
      lay.same_strides = false;
    }
  }
  return lay;
}

// A function of the shape, the element size, the units per tile and the plan
// only (never of alignment or of the device), so every reduction order is too.
Tiling make_tiling(const NormActShape& sh, Plan plan, int elem_bytes, int units) {
  const int vec_elems = kVecBytes / elem_bytes;
  Tiling g{};
  g.B = sh.B;
  g.C = sh.C;
  g.S = sh.S;
  g.G = sh.G;
  g.Cg = sh.C / sh.G;
  if (plan == kRowPlan) {
    // Lanes per row: the fewest that cover the row in one tile, at most 256.
    const int64_t per_lane = static_cast<int64_t>(vec_elems) * units;
    const int64_t need = ceil_div(sh.S, per_lane);
    int lg = 0;
    while ((1 << lg) < kThreads && (int64_t{1} << lg) < need) ++lg;
    g.lo_log2 = lg;
    g.ctiles = 1;
    g.tile_len = per_lane << lg;
    g.lines = ceil_div(sh.B * sh.C, static_cast<int64_t>(kThreads >> lg));
  } else {
    const int64_t groups = ceil_div(sh.C, vec_elems);
    const int max_tx = kChanCols / vec_elems;
    int lg = 0;
    while ((1 << lg) < max_tx && (int64_t{1} << lg) < groups) ++lg;
    g.lo_log2 = lg;
    g.ctiles = ceil_div(groups, int64_t{1} << lg);
    g.tile_len = static_cast<int64_t>(kThreads >> lg) * units;
    g.lines = sh.B * g.ctiles;
  }
  // Enough chunks per row for about kTargetItems items, but at most one per
  // tile and at least enough to keep chunks within kMaxTilesPerChunk tiles.
  const int64_t per_row = ceil_div(sh.S, g.tile_len);
  int64_t want = ceil_div(kTargetItems, g.lines);
  const int64_t least = ceil_div(per_row, kMaxTilesPerChunk);
  if (want < least) want = least;
  if (want > per_row) want = per_row;
  g.tiles = ceil_div(per_row, want);
  g.chunks = ceil_div(per_row, g.tiles);
  g.chunk_len = g.tiles * g.tile_len;
  g.items = g.lines * g.chunks;
  return g;
}

struct PassPlan {
  Plan plan;
  Tiling g;
};

PassPlan plan_pass(DType dtype, const NormActShape& sh, const TensorSet& ts, int units) {
  const int eb = element_size(dtype);
  const Layout lay = choose_layout(sh, ts, kVecBytes / eb);
  PassPlan pp{};
  pp.plan = lay.plan;
  pp.g = make_tiling(sh, lay.plan, eb, units);
  pp.g.vec = lay.vec ? 1 : 0;
  pp.g.fast = lay.vec && lay.same_strides ? 1 : 0;
  return pp;
}

PassPlan plan_stats(DType dtype, const NormActShape& sh, const StridedTensor3& x) {
  TensorSet ts;
  ts.add(&x);
  return plan_pass(dtype, sh, ts, kStatsUnits);
}

PassPlan plan_sums(DType dtype, const NormActShape& sh, const StridedTensor3& x,
                   const StridedTensor3& dy, const StridedTensor3* residual) {
  TensorSet ts;
  ts.add(&x);
  ts.add(&dy);
  ts.add(residual);
  return plan_pass(dtype, sh, ts, kBwdUnits);
}

size_t partial_bytes(DType dtype, const NormActShape& sh, const Tiling& g) {
  return round16(static_cast<size_t>(sh.B * sh.C * g.chunks) * acc_size(dtype));
}

size_t row_bytes(DType dtype, const NormActShape& sh) {
  return round16(static_cast<size_t>(sh.B * sh.C) * acc_size(dtype));
}

size_t group_bytes(DType dtype, const NormActShape& sh) {
  return round16(static_cast<size_t>(sh.B * sh.G) * acc_size(dtype));
}

bool workspace_ok(const void* ws, size_t have, size_t need) {
  return ws != nullptr && have >= need && reinterpret_cast<uintptr_t>(ws) % 16 == 0;
}

// ---- dispatch ------------------------------------------------------------------

template <class Tr, int kPlan, int kVar>
struct StatsLaunch {
  static cudaError_t run(const StatsParams& p, cudaStream_t stream) {
    stats_kernel<Tr, kPlan><<<grid_for(p.g.items), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <class Tr, int kPlan, int kVar>
struct NormalizeLaunch {
  static cudaError_t run(const FwdParams& p, cudaStream_t stream) {
    normalize_kernel<Tr, kPlan, kVar><<<grid_for(p.g.items), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

// kVar is the residual mode; only mode 1 reads the residual backwards.
template <class Tr, int kPlan, int kVar>
struct GradSumsLaunch {
  static cudaError_t run(const BwdParams& p, cudaStream_t stream) {
    grad_sums_kernel<Tr, kPlan, kVar == 1><<<grid_for(p.g.items), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

// kVar: 0 no residual, 1 residual, 2 residual and dres.
template <class Tr, int kPlan, int kVar>
struct GradInputLaunch {
  static cudaError_t run(const BwdParams& p, cudaStream_t stream) {
    grad_input_kernel<Tr, kPlan, kVar><<<grid_for(p.g.items), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <template <class, int, int> class Launch, class Tr, int kPlan, class P>
cudaError_t dispatch_var(int var, const P& p, cudaStream_t stream) {
  switch (var) {
    case 0: return Launch<Tr, kPlan, 0>::run(p, stream);
    case 1: return Launch<Tr, kPlan, 1>::run(p, stream);
    case 2: return Launch<Tr, kPlan, 2>::run(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <template <class, int, int> class Launch, class Tr, class P>
cudaError_t dispatch_plan(Plan plan, int var, const P& p, cudaStream_t stream) {
  return plan == kChanPlan ? dispatch_var<Launch, Tr, kChanPlan>(var, p, stream)
                           : dispatch_var<Launch, Tr, kRowPlan>(var, p, stream);
}

template <template <class, int, int> class Launch, class P>
cudaError_t dispatch(DType dtype, Plan plan, int var, const P& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dispatch_plan<Launch, TraitsF32>(plan, var, p, stream);
    case DType::kFloat16: return dispatch_plan<Launch, TraitsF16>(plan, var, p, stream);
    case DType::kBFloat16: return dispatch_plan<Launch, TraitsBF16>(plan, var, p, stream);
    case DType::kFloat64: return dispatch_plan<Launch, TraitsF64>(plan, var, p, stream);
  }
  return cudaErrorInvalidValue;
}

// Per-row merge of the chunk partials, then (groups of several channels)
// per-group merge of the rows; ch_mean and ch_m2 hold B * C values.
template <typename A>
cudaError_t launch_merge_stats(const NormActShape& sh, const Tiling& g, const void* pm,
                               const void* pq, void* ch_mean, void* ch_m2, void* mean, void* rstd,
                               double eps, cudaStream_t stream) {
  const int64_t rows = sh.B * sh.C;
  const bool one = g.Cg == 1;
  merge_moments_kernel<A><<<grid_for(rows), kThreads, 0, stream>>>(
      static_cast<const A*>(pm), static_cast<const A*>(pq), static_cast<A*>(one ? mean : ch_mean),
      static_cast<A*>(one ? rstd : ch_m2), rows, g.chunks, g.chunks, g.chunk_len, sh.S,
      static_cast<A>(eps), one ? 1 : 0);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || one) return err;
  const int64_t n_groups = sh.B * sh.G;
  merge_moments_kernel<A><<<grid_for(n_groups), kThreads, 0, stream>>>(
      static_cast<const A*>(ch_mean), static_cast<const A*>(ch_m2), static_cast<A*>(mean),
      static_cast<A*>(rstd), n_groups, g.Cg, 1, sh.S, sh.S, static_cast<A>(eps), 1);
  return cudaGetLastError();
}

// Per-row sums of the chunk partials, then the per-group and per-channel
// results; sg and sgd hold B * C values.
template <typename A>
cudaError_t launch_finalize_bwd(const NormActShape& sh, const Tiling& g, const void* pg,
                                const void* pgd, void* sg, void* sgd, const void* weight,
                                const void* rstd, void* dweight, void* dbias, void* k1, void* k3,
                                cudaStream_t stream) {
  const int64_t rows = sh.B * sh.C;
  sum_rows_kernel<A><<<grid_for(rows), kThreads, 0, stream>>>(
      static_cast<const A*>(pg), static_cast<const A*>(pgd), static_cast<A*>(sg),
      static_cast<A*>(sgd), rows, g.chunks);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finalize_bwd_kernel<A><<<grid_for(sh.B * sh.G + sh.C), kThreads, 0, stream>>>(
      static_cast<const A*>(sg), static_cast<const A*>(sgd), static_cast<const A*>(weight),
      static_cast<const A*>(rstd), static_cast<A*>(dweight), static_cast<A*>(dbias),
      static_cast<A*>(k1), static_cast<A*>(k3), sh.B, sh.C, sh.G, sh.S);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public launchers.

size_t norm_act_fwd_workspace_bytes(DType dtype, const NormActShape& shape,
                                    const StridedTensor3& x) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return 0;
  const PassPlan st = plan_stats(dtype, shape, x);
  return 2 * partial_bytes(dtype, shape, st.g) + 2 * row_bytes(dtype, shape);
}

cudaError_t launch_norm_act_fwd(DType dtype, const NormActShape& shape, const StridedTensor3& x,
                                const void* weight, const void* bias,
                                const StridedTensor3* residual, const StridedTensor3& y,
                                void* mean, void* rstd, double slope, int residual_mode,
                                double eps, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (residual_mode < 0 || residual_mode > 2) return cudaErrorInvalidValue;
  if ((residual_mode != 0) != (residual != nullptr && residual->data != nullptr)) {
    return cudaErrorInvalidValue;
  }
  const PassPlan st = plan_stats(dtype, shape, x);
  const size_t one = partial_bytes(dtype, shape, st.g);
  const size_t row = row_bytes(dtype, shape);
  if (!workspace_ok(workspace, workspace_bytes, 2 * one + 2 * row)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  void* pm = ws;
  void* pq = ws + one;
  void* ch_mean = ws + 2 * one;
  void* ch_m2 = ws + 2 * one + row;

  StatsParams sp{};
  sp.x = x;
  sp.part_mean = pm;
  sp.part_m2 = pq;
  sp.g = st.g;
  cudaError_t err = dispatch<StatsLaunch>(dtype, st.plan, 0, sp, stream);
  if (err != cudaSuccess) return err;

  err = dtype == DType::kFloat64
            ? launch_merge_stats<double>(shape, st.g, pm, pq, ch_mean, ch_m2, mean, rstd, eps,
                                         stream)
            : launch_merge_stats<float>(shape, st.g, pm, pq, ch_mean, ch_m2, mean, rstd, eps,
                                        stream);
  if (err != cudaSuccess) return err;

  TensorSet ts;
  ts.add(&x);
  ts.add(residual);
  ts.add(&y);
  const PassPlan np = plan_pass(dtype, shape, ts, kNormUnits);
  FwdParams fp{};
  fp.x = x;
  if (residual != nullptr) fp.r = *residual;
  fp.y = y;
  fp.weight = weight;
  fp.bias = bias;
  fp.mean = mean;
  fp.rstd = rstd;
  fp.slope = slope;
  fp.g = np.g;
  return dispatch<NormalizeLaunch>(dtype, np.plan, residual_mode, fp, stream);
}

size_t norm_act_bwd_workspace_bytes(DType dtype, const NormActShape& shape,
                                    const StridedTensor3& x, const StridedTensor3& dy,
                                    const StridedTensor3* residual) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return 0;
  const PassPlan sp = plan_sums(dtype, shape, x, dy, residual);
  return 2 * partial_bytes(dtype, shape, sp.g) + 2 * row_bytes(dtype, shape) +
         2 * group_bytes(dtype, shape);
}

cudaError_t launch_norm_act_bwd(DType dtype, const NormActShape& shape, const StridedTensor3& x,
                                const void* weight, const void* bias,
                                const StridedTensor3* residual, const StridedTensor3& dy,
                                const void* mean, const void* rstd, const StridedTensor3& dx,
                                const StridedTensor3* dres, void* dweight, void* dbias,
                                double slope, int residual_mode, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (residual_mode < 0 || residual_mode > 2) return cudaErrorInvalidValue;
  const bool have_res = residual != nullptr && residual->data != nullptr;
  const bool have_dres = dres != nullptr && dres->data != nullptr;
  if ((residual_mode == 1) != have_res) return cudaErrorInvalidValue;
  if (have_dres && residual_mode != 1) return cudaErrorInvalidValue;
  const StridedTensor3* res = have_res ? residual : nullptr;
  const PassPlan sp = plan_sums(dtype, shape, x, dy, res);
  const size_t one = partial_bytes(dtype, shape, sp.g);
  const size_t row = row_bytes(dtype, shape);
  const size_t grp = group_bytes(dtype, shape);
  if (!workspace_ok(workspace, workspace_bytes, 2 * one + 2 * row + 2 * grp)) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(workspace);
  void* pg = ws;
  void* pgd = ws + one;
  void* sg = ws + 2 * one;
  void* sgd = ws + 2 * one + row;
  void* k1 = ws + 2 * one + 2 * row;
  void* k3 = ws + 2 * one + 2 * row + grp;

  BwdParams bp{};
  bp.x = x;
  if (have_res) bp.r = *residual;
  bp.dy = dy;
  bp.dx = dx;
  if (have_dres) bp.dres = *dres;
  bp.weight = weight;
  bp.bias = bias;
  bp.mean = mean;
  bp.rstd = rstd;
  bp.k1 = k1;
  bp.k3 = k3;
  bp.part_g = pg;
  bp.part_gd = pgd;
  bp.slope = slope;
  bp.g = sp.g;
  cudaError_t err = dispatch<GradSumsLaunch>(dtype, sp.plan, residual_mode, bp, stream);
  if (err != cudaSuccess) return err;

  err = dtype == DType::kFloat64
            ? launch_finalize_bwd<double>(shape, sp.g, pg, pgd, sg, sgd, weight, rstd, dweight,
                                          dbias, k1, k3, stream)
            : launch_finalize_bwd<float>(shape, sp.g, pg, pgd, sg, sgd, weight, rstd, dweight,
                                         dbias, k1, k3, stream);
  if (err != cudaSuccess) return err;

  TensorSet ts;
  ts.add(&x);
  ts.add(&dy);
  ts.add(res);
  ts.add(&dx);
  if (have_dres) ts.add(dres);
  const PassPlan ip = plan_pass(dtype, shape, ts, kBwdUnits);
  bp.g = ip.g;
  const int out_var = residual_mode != 1 ? 0 : (have_dres ? 2 : 1);
  return dispatch<GradInputLaunch>(dtype, ip.plan, out_var, bp, stream);
}

}  // namespace gpu
}  // namespace medmap_fast
