// Shared by the decode kernels (mixed_gemm_decode.cu, int8_gemm_decode.cu): loads that stream
// a weight read once past L1, and the end of a CTA: sum the warps' partial MMA tiles in warp
// order through shared memory (deterministic; no atomics, no workspace) and hand each output
// element to the caller's store.
//
// Tile bookkeeping both kernels share: a CTA owns kR 16-row tiles of W (output channels) and
// kNT 8-token tiles; a warp's accumulator acc[r][j][e] follows the mma.sync C fragment of
// m16n8k16 / m16n8k32 (lane l: row l / 4 + 8 (e / 2), token 2 (l % 4) + e % 2).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace qc_decode {

__device__ __forceinline__ uint32_t ld_stream32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream64(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.b32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_stream128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Shared-memory bytes the reduction needs for `warps` warps.
template <int kR, int kNT, typename Acc>
constexpr int reduce_smem_bytes(int warps) {
  return warps * kR * kNT * 4 * 32 * static_cast<int>(sizeof(Acc));
}

// Sum acc over the CTA's warps (in warp order) and call store(n, m, sum) for every output
// (n: output channel, m: token) with m < M. red: reduce_smem_bytes of dynamic shared memory.
template <int kR, int kNT, typename Acc, typename Store>
__device__ __forceinline__ void reduce_and_store(const Acc (&acc)[kR][kNT][4], Acc* red, int tile0,
                                                 int m0, int M, Store&& store) {
  constexpr int kTile = kR * kNT * 4 * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp * kTile + ((r * kNT + j) * 4 + e) * 32 + lane] = acc[r][j][e];
  __syncthreads();
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

}  // namespace qc_decode
