// Shared by the decode kernels (mixed_gemm_decode.cu, int8_gemm_decode.cu): the load that
// streams a weight read once past L1, and the end of a CTA: sum the warps' partial MMA tiles
// in warp order through shared memory (deterministic; no atomics, no workspace) and hand each
// output element to the caller's store.
//
// Tile bookkeeping both kernels share: a CTA owns kR 16-row tiles of W (output channels) and
// kNT 8-token tiles; a warp's accumulator acc[r][j][e] follows the mma.sync C fragment of
// m16n8k16 / m16n8k32 (lane l: row l / 4 + 8 (e / 2), token 2 (l % 4) + e % 2).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

namespace qc_decode {

// A 16-byte load of a weight read once: not kept in L1, and the L2 asked for the whole
// 128-byte line it lies in (.L2::128B). The int8 kernel's warps each read 64 bytes of a
// weight row per load and the other half of the line is the next chunk, read by another
// warp: in the GEMM sequence of a decode step (bench_stream, H100) the hint took W8A8 from
// 24.3 to 23.2 us a GEMM; the mixed kernels, whose loads are whole lines, time the same.
__device__ __forceinline__ uint4 ld_stream128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Shared-memory bytes the reduction needs for `warps` warps.
template <int kR, int kNT, typename Acc>
constexpr int reduce_smem_bytes(int warps) {
  return warps * kR * kNT * 4 * 32 * static_cast<int>(sizeof(Acc));
}

// Write each warp's partial tiles acc to red ([warps][kR][kNT][4][32], lanes fastest: no bank
// conflicts) and wait for the whole CTA; element i of a warp's tile is then (r, j, e, lane)
// with i = ((r * kNT + j) * 4 + e) * 32 + lane.
template <int kR, int kNT, typename Acc>
__device__ __forceinline__ void stage_partials(const Acc (&acc)[kR][kNT][4], Acc* red) {
  constexpr int kTile = kR * kNT * 4 * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp * kTile + ((r * kNT + j) * 4 + e) * 32 + lane] = acc[r][j][e];
  __syncthreads();
}

// Sum acc over the CTA's warps (in warp order) and call store(n, m, sum) for every output
// (n: output channel, m: token) with m < M. red: reduce_smem_bytes of dynamic shared memory.
template <int kR, int kNT, typename Acc, typename Store>
__device__ __forceinline__ void reduce_and_store(const Acc (&acc)[kR][kNT][4], Acc* red, int tile0,
                                                 int m0, int M, Store&& store) {
  constexpr int kTile = kR * kNT * 4 * 32;
  const int warps = blockDim.x >> 5;
  stage_partials<kR, kNT>(acc, red);
  for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
    Acc v = 0;
    for (int w = 0; w < warps; ++w) v += red[w * kTile + i];
    const int l = i & 31, e = (i >> 5) & 3, rj = i >> 7;
    const int j = rj % kNT, r = rj / kNT;
    const int n = (tile0 + r) * 16 + (l >> 2) + 8 * (e >> 1);
    const int m = m0 + 8 * j + 2 * (l & 3) + (e & 1);
    if (m < M) store(n, m, v);
  }
}

// reduce_and_store for CTAs of two row tiles whose rows pair up (kR = 2: tile0 holds rows
// that go with the same rows of tile0 + 1, as the gate and up projections of a gated MLP laid
// out by interleaving 16-row tiles): store(n0, n1, m, v0, v1) gets both sums of row n0 of the
// first tile and row n1 = n0 + 16 of the second, for token m < M.
template <int kNT, typename Acc, typename Store>
__device__ __forceinline__ void reduce_and_store_pairs(const Acc (&acc)[2][kNT][4], Acc* red,
                                                       int tile0, int m0, int M, Store&& store) {
  constexpr int kHalf = kNT * 4 * 32, kTile = 2 * kHalf;
  const int warps = blockDim.x >> 5;
  stage_partials<2, kNT>(acc, red);
  for (int i = threadIdx.x; i < kHalf; i += blockDim.x) {
    Acc v0 = 0, v1 = 0;
    for (int w = 0; w < warps; ++w) {
      v0 += red[w * kTile + i];
      v1 += red[w * kTile + kHalf + i];
    }
    const int l = i & 31, e = (i >> 5) & 3, j = i >> 7;
    const int n0 = tile0 * 16 + (l >> 2) + 8 * (e >> 1);
    const int m = m0 + 8 * j + 2 * (l & 3) + (e & 1);
    if (m < M) store(n0, n0 + 16, m, v0, v1);
  }
}

// The checks every decode launch makes: sizes, K in whole chunks, the warp count, and row
// tiles (1, 2 or 4 x 16 rows; 4 with at most two token tiles) dividing N.
inline bool launch_shape_ok(int M, int N, int K, int chunk_k, int warps, int max_warps,
                            int row_tiles) {
  return M > 0 && N > 0 && K > 0 && K % chunk_k == 0 && warps >= 1 && warps <= max_warps &&
         (row_tiles == 1 || row_tiles == 2 || row_tiles == 4) && N % (16 * row_tiles) == 0;
}

// Run f(integral_constant<int, kNT>, integral_constant<int, kR>) for a launch's run-time
// token tiles (1, 2, 4) and row tiles (1, 2; 4 with one or two token tiles: every CTA reads
// all of x, so at 16 tokens 32-row CTAs on a 14336-row weight read 57 MB of activations from
// L2 against a 29 MB weight, and 64 rows halve that; 4 x 4 tiles would not fit the
// registers); anything else is cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_tiles(int token_tiles, int row_tiles, F&& f) {
  using std::integral_constant;
  if (row_tiles == 1) {
    if (token_tiles == 1) return f(integral_constant<int, 1>{}, integral_constant<int, 1>{});
    if (token_tiles == 2) return f(integral_constant<int, 2>{}, integral_constant<int, 1>{});
    if (token_tiles == 4) return f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  } else if (row_tiles == 2) {
    if (token_tiles == 1) return f(integral_constant<int, 1>{}, integral_constant<int, 2>{});
    if (token_tiles == 2) return f(integral_constant<int, 2>{}, integral_constant<int, 2>{});
    if (token_tiles == 4) return f(integral_constant<int, 4>{}, integral_constant<int, 2>{});
  } else if (row_tiles == 4) {
    if (token_tiles == 1) return f(integral_constant<int, 1>{}, integral_constant<int, 4>{});
    if (token_tiles == 2) return f(integral_constant<int, 2>{}, integral_constant<int, 4>{});
  }
  return cudaErrorInvalidValue;
}

// Launch a decode kernel over the [p.M, p.N] output: p.N / (16 kR) CTAs of `warps` warps by
// ceil(p.M / (8 kNT)) token tiles, with `smem` bytes of dynamic shared memory (at most the
// 48 KB that need no opt-in).
template <int kNT, int kR, typename P>
cudaError_t launch_decode(void (*kernel)(const P), const P& p, int warps, int smem,
                          cudaStream_t s) {
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  const int tokens = 8 * kNT;
  dim3 grid(p.N / (16 * kR), (p.M + tokens - 1) / tokens);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  kernel<<<grid, 32 * warps, smem, s>>>(p);
  return cudaGetLastError();
}

// Dynamic shared memory for a launch that uses `smem` bytes and keeps at most
// `max_warps_per_sm` warps of `kernel` resident on an SM: where registers would let more CTAs
// in, a larger request keeps them out (only there: the carveout it takes comes out of the L1).
// `cached` (one per kernel, zeroed) keeps the answer per warp count: the process's first
// device is taken for all.
template <int kMaxWarps, typename K>
int capped_smem(K kernel, int warps, int smem, int max_warps_per_sm,
                int (&cached)[kMaxWarps + 1]) {
  if (warps < 1 || warps > kMaxWarps) return smem;
  if (cached[warps] == 0) {
    int blocks = 0, dev = 0, per_sm = 0, reserved = 0, need = smem;
    const int cap = max_warps_per_sm / warps > 1 ? max_warps_per_sm / warps : 1;
    const bool asked =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, 32 * warps, smem) ==
            cudaSuccess &&
        cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) ==
            cudaSuccess &&
        cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) ==
            cudaSuccess;
    if (!asked)
      (void)cudaGetLastError();  // no cap then, and no stale error for the launch to report
    else if (blocks > cap)
      need = per_sm / (cap + 1) - reserved + 1;  // cap + 1 CTAs no longer fit
    cached[warps] = need > 48 * 1024 ? 48 * 1024 : need;
  }
  return cached[warps] > smem ? cached[warps] : smem;
}

}  // namespace qc_decode
