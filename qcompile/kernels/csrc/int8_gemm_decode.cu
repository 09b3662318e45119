// Decode kernel for qcompile::int8_gemm (W8A8): few tokens (M <= 32) of int8 activations x an
// int8 weight, with the per-token x per-channel rescale and bias applied to the exact int32 sum:
//
//   out[m, n] = (sum_k xq[m, k] * wq[n, k] - azp[m | 0] * azp_adj[n]) * row_scale[m | 0]
//               * col_scale[n | 0] + bias[n]
//
// azp / azp_adj (int32, both or neither; null: no correction) are asymmetric activations' zero
// points and the weight's column sums: the correction is exact in int32, before the rescale.
//
// The weight-only decode kernel's plan (mixed_gemm_decode.cu) on the op's own operands: xq
// [M, K] and wq [N, K] are plain row-major int8, and mma.sync.m16n8k32.s8 takes the weights as
// the 16-row A operand and the tokens as the 8-column B operand. No reorder is needed because
// an MMA only pairs A and B values through their k *slots*, and lane (g, t) owns the same
// slots of both (A: 4t..4t+3 and 4t+16..4t+19 of rows g, g+8; B: the same of token g). So
// for each 64-deep K chunk lane (g, t) loads 16 contiguous bytes k = 16t .. 16t+15 of weight
// rows g and g+8 and of token g, and feeds words 0-1 to one MMA and words 2-3 to a second: in
// both, slot 4t + i holds k = 16t + 4w + i on the A and the B side alike. A warp's 8 rows x
// 64 bytes per load are whole 32-byte sectors.
//
// Work split, reduction and store as in the mixed kernel (decode_common.cuh): a CTA owns kR
// 16-row tiles and 8 * kNT tokens, its warps stride over the K chunks, int32 partial tiles are
// summed in warp order (exact), then scaled in fp32.
//
// Configuration: -D QC_OUT_BF16 (1 bf16 output, 0 fp16); token tiles (1, 2, 4 x 8 tokens),
// row tiles (1, 2, 4 x 16 rows; 4 with up to 16 tokens), warps per CTA (1..16) are launch
// arguments.
// Exports (extern "C", 0 = success, else a cudaError_t value): qc_int8_gemm_decode_info,
// qc_int8_gemm_decode.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#ifndef QC_OUT_BF16
#define QC_OUT_BF16 1
#endif

#include "decode_common.cuh"

namespace {

using namespace qc_decode;

#if QC_OUT_BF16
using Out = __nv_bfloat16;
#else
using Out = __half;
#endif

constexpr int kChunkK = 64;
constexpr int kMaxWarps = 16;

struct Params {
  const int8_t* x;
  const int8_t* w;
  const float* row_scale;  // [M] or [1]
  const float* col_scale;  // [N] or [1]
  const Out* bias;         // [N] or null
  const int* azp;          // [M] or [1], or null
  const int* azp_adj;      // [N] (with azp)
  Out* out;
  int M, N, K, row_per_token, col_per_channel;
};

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int kNT, int kR>
__global__ void __launch_bounds__(32 * kMaxWarps) int8_gemm_decode_kernel(const Params p) {
  constexpr int kUnroll = 4 / kR;  // chunks per warp per round (x kR tiles: 4 chunk-tiles)
  extern __shared__ int red[];     // [warps][kR][kNT][4][32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * kR;
  const int m0 = blockIdx.y * 8 * kNT;
  const int M = p.M, N = p.N, K = p.K;
  const int chunks = K / kChunkK;

  int acc[kR][kNT][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0;

  // this lane's 16 bytes of a chunk start at k = 16t; weight rows g and g + 8 of each tile
  const int8_t* wrow[kR][2];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[r][h] = p.w + (size_t)((tile0 + r) * 16 + g + 8 * h) * K + 16 * t;
  const int8_t* xrow[kNT];
  bool xok[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int m = m0 + 8 * j + g;
    xok[j] = m < M;
    xrow[j] = p.x + (size_t)(xok[j] ? m : 0) * K + 16 * t;
  }

  for (int c0 = warp; c0 < chunks; c0 += kUnroll * warps) {
    uint4 wv[kUnroll][kR][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * warps;
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < kR; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) wv[u][r][h] = ld_stream128(wrow[r][h] + (size_t)c * kChunkK);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * warps;
      if (c >= chunks) continue;
      uint4 xv[kNT];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        xv[j] = xok[j] ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + (size_t)c * kChunkK))
                       : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const uint4 lo = wv[u][r][0], hi = wv[u][r][1];  // rows g, g + 8
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          mma_s8(acc[r][j], lo.x, hi.x, lo.y, hi.y, xv[j].x, xv[j].y);
          mma_s8(acc[r][j], lo.z, hi.z, lo.w, hi.w, xv[j].z, xv[j].w);
        }
      }
    }
  }

  reduce_and_store<kR, kNT>(acc, red, tile0, m0, M, [&](int n, int m, int sum) {
    if (p.azp != nullptr) sum -= p.azp[p.row_per_token ? m : 0] * p.azp_adj[n];
    float v = static_cast<float>(sum) * p.row_scale[p.row_per_token ? m : 0] *
              p.col_scale[p.col_per_channel ? n : 0];
    if (p.bias != nullptr) v += static_cast<float>(p.bias[n]);
    p.out[(size_t)m * N + n] = Out(v);
  });
}

}  // namespace

extern "C" {

int qc_int8_gemm_decode_info(int* out, int n) {
  if (n > 0) out[0] = QC_OUT_BF16;
  return 1;
}

// out [M, N]; xq [M, K], wq [N, K] int8 row-major, 16-byte aligned; row_scale [M] (per
// token) or [1]; col_scale [N] or [1], float32; bias [N] in the output type or null; azp
// int32 [M] or [1] (as row_scale) and azp_adj int32 [N], or both null.
// K % 64 == 0, N % (16 * row_tiles) == 0; token_tiles in {1, 2, 4}, row_tiles in {1, 2}
// (or 4 with token_tiles <= 2), warps 1..16.
int qc_int8_gemm_decode(void* out, const void* xq, const void* wq, const void* row_scale,
                        const void* col_scale, const void* bias, const void* azp,
                        const void* azp_adj, int M, int N, int K,
                        int row_per_token, int col_per_channel, int token_tiles, int row_tiles,
                        int warps, void* stream) {
  if (!launch_shape_ok(M, N, K, kChunkK, warps, kMaxWarps, row_tiles) ||
      (azp == nullptr) != (azp_adj == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  Params p;
  p.x = static_cast<const int8_t*>(xq);
  p.w = static_cast<const int8_t*>(wq);
  p.row_scale = static_cast<const float*>(row_scale);
  p.col_scale = static_cast<const float*>(col_scale);
  p.bias = static_cast<const Out*>(bias);
  p.azp = static_cast<const int*>(azp);
  p.azp_adj = static_cast<const int*>(azp_adj);
  p.out = static_cast<Out*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.row_per_token = row_per_token;
  p.col_per_channel = col_per_channel;
  auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(dispatch_tiles(token_tiles, row_tiles, [&](auto nt, auto r) {
    constexpr int kNT = decltype(nt)::value, kR = decltype(r)::value;
    return launch_decode<kNT, kR>(int8_gemm_decode_kernel<kNT, kR>, p, warps,
                                  reduce_smem_bytes<kR, kNT, int>(warps), s);
  }));
}

}  // extern "C"
