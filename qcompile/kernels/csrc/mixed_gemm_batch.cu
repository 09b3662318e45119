// Small-batch kernel for qcompile::mixed_gemm (sm_90): 16 to 64 tokens x int4/int8 weights.
//
//   out[m, n] = sum_k x[m, k] * W[n, k]  (* rowscale[n])  + bias[n]
//
// Why a kernel of its own between the decode kernel (mixed_gemm_decode.cu) and the CUTLASS
// GEMM: at 32-64 tokens the GEMM is still mostly a weight stream (4096x4096 at 64 tokens is
// 2 GFLOP against an 8 MB int4 weight), but the decode kernel's CTAs own only 16-32 rows and
// split K among their warps, so each CTA reads all of x: N / 32 passes over x from L2, 64 MB
// at 4096x4096 and 64 tokens against the 8 MB weight. Here the warps of a CTA each own
// 16 * kR rows and walk the *same* K chunks: the CTA copies each round's slab of x (its tokens
// x the round's chunks) into shared memory once (cp.async, double-buffered, while the warps'
// weight loads of the round are in flight) and all its warps read it there; a CTA covers
// 64-256 rows. (Read by every warp from global memory instead, through L1, x cost 2-3x the
// time of the CUTLASS GEMM at 32-64 tokens on an H100: the warps' misses each went to L2.) To give every SM a CTA even so, K is
// split over the CTAs of a thread-block cluster (grid.z, up to 8): each sums its K range and
// the cluster adds the partial tiles through distributed shared memory, in rank order
// (deterministic; no workspace, no second kernel, no atomics).
//
// The weight fragments are those of the decode kernel (mixed_fragments.cuh: the same prepared
// layouts, loaded straight into registers, several chunk-tiles in flight a warp). Unlike there
// they are turned into the weight values before the MMA: q' exactly (the biased integers
// minus their bias), and for group-wise weights W = q' * s + z' in the activation type (one
// fma a pair, as CUTLASS's mixed-input main loop does), so a warp keeps only its accumulators;
// per-channel scales multiply the fp32 sums in the epilogue.
//
// Configuration: -D QC_ACT_FP16, QC_WBITS, QC_LAYOUT, QC_MODE as for the decode kernel; the
// token tiles (2, 4, 8 x 8 tokens), row tiles a warp (1, 2 x 16 rows), warps a CTA and the
// cluster's K splits are launch arguments.
// Exports (extern "C", 0 = success, else a cudaError_t value): qc_mixed_gemm_batch_info,
// qc_mixed_gemm_batch.

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#pragma nv_diag_suppress 177  // helpers unused by some (act, bits) configurations

#ifndef QC_ACT_FP16
#define QC_ACT_FP16 0
#endif
#ifndef QC_WBITS
#define QC_WBITS 4
#endif
#ifndef QC_LAYOUT
#define QC_LAYOUT 0
#endif
#ifndef QC_MODE
#define QC_MODE 2
#endif

#include "decode_common.cuh"
#include "sm80_mixed.cuh"

namespace {

using namespace qc_sm80;
using namespace qc_decode;

#include "mixed_fragments.cuh"

namespace cg = cooperative_groups;

constexpr int kMaxWarps = 8;
constexpr int kMaxSplits = 8;  // the portable cluster size
// Chunk-tile loads a warp issues before converting any (as in the decode kernel).
constexpr int kRoundLoads = kBits == 8 ? 2 : 4;
constexpr int kPad = 8;  // activation elements after each staged token row: no bank conflicts

// The chunks a round takes (kR row tiles a warp, each a chunk-tile load), the shared memory a
// CTA stages x in (two slabs of 8 kNT tokens x the round's K) and its reduction's tiles.
template <int kR>
constexpr int round_chunks() { return kRoundLoads / kR > 0 ? kRoundLoads / kR : 1; }
template <int kNT, int kR>
constexpr int slab_pitch() { return round_chunks<kR>() * kChunkK + kPad; }
template <int kNT, int kR>
constexpr int smem_bytes(int warps) {
  const int slabs = 2 * 8 * kNT * slab_pitch<kNT, kR>() * static_cast<int>(sizeof(Act));
  const int reduce = warps * kR * kNT * 4 * 32 * static_cast<int>(sizeof(float));
  return slabs > reduce ? slabs : reduce;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src));
}

static_assert(QC_MODE == 0 || QC_MODE == 2, "QC_MODE must be 0 (rowscale) or 2 (groupzero)");
static_assert(!(QC_LAYOUT == 1 && QC_MODE == 0), "the sm80 v2 layout is group-wise only");

struct Params {
  const Act* x;
  const uint8_t* w;
  const Act* scales;      // groupzero: [K/g, N]
  const Act* zeros;       // groupzero: [K/g, N]
  const float* rowscale;  // rowscale: [N]
  const Act* bias;        // [N] or null
  Act* out;
  int M, N, K;
  int group_shift;        // groupzero: group = kChunkK << group_shift
  int split_chunks;       // K chunks a CTA of the cluster sums
};

// The weight values of one A fragment from its biased integers h = q' + kBiasH: q' exactly,
// then (group-wise) q' * s + z' with the scales and zeros of rows g (a0, a2) and g + 8 (a1, a3).
__device__ __forceinline__ void weights(uint32_t (&a)[4], Act2 s_lo, Act2 z_lo, Act2 s_hi,
                                        Act2 z_hi) {
  // (kBiasH, kBiasH) in the activation type: 136 bf16, 1032 fp16 (int4); 1152 fp16 (int8)
  constexpr uint32_t kBias2 = kBits == 4 ? (QC_ACT_FP16 ? 0x64086408u : 0x43084308u)
                                         : (QC_ACT_FP16 ? 0x64806480u : 0u);
  if constexpr (kBias2 != 0u) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = as_u32(__hsub2(as_act2(a[i]), as_act2(kBias2)));
  }
#if QC_MODE == 2
  a[0] = as_u32(__hfma2(as_act2(a[0]), s_lo, z_lo));
  a[2] = as_u32(__hfma2(as_act2(a[2]), s_lo, z_lo));
  a[1] = as_u32(__hfma2(as_act2(a[1]), s_hi, z_hi));
  a[3] = as_u32(__hfma2(as_act2(a[3]), s_hi, z_hi));
#else
  (void)s_lo; (void)z_lo; (void)s_hi; (void)z_hi;
#endif
}

template <int kNT, int kR>
__global__ void __launch_bounds__(32 * kMaxWarps) mixed_gemm_batch_kernel(const Params p) {
  constexpr int kUnroll = round_chunks<kR>();
  constexpr int kPitch = slab_pitch<kNT, kR>();
  // the x slabs [2][8 kNT][kPitch] in the main loop, then the cluster's partial tiles
  // [warps][kR][kNT][4][32]
  extern __shared__ float4 smem[];
  Act* xs = reinterpret_cast<Act*>(smem);
  float* red = reinterpret_cast<float*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = (blockIdx.x * warps + warp) * kR;  // this warp's first 16-row tile
  const int m0 = blockIdx.y * 8 * kNT;
  const int M = p.M, N = p.N, K = p.K;
  const int c_begin = blockIdx.z * p.split_chunks, c_end = c_begin + p.split_chunks;

  float acc[kR][kNT][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;

  // B fragments: lane (g, t) feeds token m0 + 8j + g, row 8j + g of a slab
  bool xok[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) xok[j] = m0 + 8 * j + g < M;

  // stage the x slab of chunks c0 .. c0 + kUnroll - 1 (those before c_end) into slab `buf`:
  // the CTA's tokens below M only (the others' fragments are zeros, never read)
  const int tokens = min(8 * kNT, M - m0);
  const auto stage = [&](int buf, int c0) {
    const int pieces = min(kUnroll, c_end - c0) * (kChunkK / 8);  // 16-byte pieces a token
    for (int i = threadIdx.x; i < tokens * pieces; i += blockDim.x) {
      const int row = i / pieces, q = i % pieces;
      cp_async16(xs + (buf * 8 * kNT + row) * kPitch + 8 * q,
                 p.x + (size_t)(m0 + row) * K + c0 * kChunkK + 8 * q);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  stage(0, c_begin);

  WeightWalk walk[kR];
  int sz_col[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    walk[r] = weight_walk(tile0 + r, lane, N, K);
    sz_col[r] = (tile0 + r) * 16 + g;
  }

  for (int c0 = c_begin, buf = 0; c0 < c_end; c0 += kUnroll, buf ^= 1) {
    // a round: the loads of kUnroll chunks x kR row tiles, all issued before any is used
    uint32_t raw[kUnroll][kR][4][kWords];
    Act sz[kUnroll][kR][2][2];  // [.][.][scale, zero][rows g, g + 8]
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u;
      if (c >= c_end) continue;
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        load_chunk(raw[u][r], p.w + (walk[r].lane + c * walk[r].stride), walk[r].second);
#if QC_MODE == 2
        const uint32_t off = (c >> p.group_shift) * N + sz_col[r];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sz[u][r][0][h] = p.scales[off + 8 * h];
          sz[u][r][1][h] = p.zeros[off + 8 * h];
        }
#endif
      }
    }
    // the next round's slab into the other buffer (free: every warp passed the barrier after
    // reading it), then wait for this round's
    if (c0 + kUnroll < c_end) stage(buf ^ 1, c0 + kUnroll);
    else asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    const Act* slab = xs + (buf * 8 * kNT + g) * kPitch;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u;
      if (c >= c_end) continue;
      uint32_t b[kNT][4][2];
#pragma unroll
      for (int j = 0; j < kNT; ++j) load_x<true>(b[j], slab + 8 * j * kPitch + u * kChunkK, t, xok[j]);
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        Act2 s_lo, z_lo, s_hi, z_hi;
#if QC_MODE == 2
        s_lo = Act2(sz[u][r][0][0], sz[u][r][0][0]);
        s_hi = Act2(sz[u][r][0][1], sz[u][r][0][1]);
        z_lo = Act2(sz[u][r][1][0], sz[u][r][1][0]);
        z_hi = Act2(sz[u][r][1][1], sz[u][r][1][1]);
#endif
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t a[4];
          fragment(a, raw[u][r][ks]);
          weights(a, s_lo, z_lo, s_hi, z_hi);
#pragma unroll
          for (int j = 0; j < kNT; ++j) mma16816(acc[r][j], a, b[j][ks][0], b[j][ks][1]);
        }
      }
    }
    __syncthreads();  // every warp is done with this slab before it is refilled
  }

  // out = sum * rowscale + bias for element (r, j, e) of the warp's tile with sum v
  const auto store = [&](int n, int m, float v) {
#if QC_MODE == 0
    v *= p.rowscale[n];
#endif
    if (p.bias != nullptr) v += static_cast<float>(p.bias[n]);
    p.out[(size_t)m * N + n] = Act(v);
  };
  if (gridDim.z == 1) {
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = (tile0 + r) * 16 + g + 8 * (e >> 1);
          const int m = m0 + 8 * j + 2 * t + (e & 1);
          if (m < M) store(n, m, acc[r][j][e]);
        }
    return;
  }

  // The cluster's CTAs hold partial tiles of the same outputs (their K ranges differ): each
  // stages its own, then CTA `rank` sums a 1/splits share of the tile over all of them in
  // rank order and stores it.
  constexpr int kTile = kR * kNT * 4 * 32;  // a warp's partial tile
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp * kTile + ((r * kNT + j) * 4 + e) * 32 + lane] = acc[r][j][e];
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int total = warps * kTile, share = (total + splits - 1) / splits;
  const int end = min((rank + 1) * share, total);
  for (int i = rank * share + threadIdx.x; i < end; i += blockDim.x) {
    float v = 0.f;
    for (int q = 0; q < splits; ++q) v += cluster.map_shared_rank(red, q)[i];
    const int w = i / kTile, l = i & 31, e = (i >> 5) & 3, rj = (i % kTile) >> 7;
    const int j = rj % kNT, r = rj / kNT;
    const int n = ((blockIdx.x * warps + w) * kR + r) * 16 + (l >> 2) + 8 * (e >> 1);
    const int m = m0 + 8 * j + 2 * (l & 3) + (e & 1);
    if (m < M) store(n, m, v);
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
}

template <int kNT, int kR>
cudaError_t launch(const Params& p, int warps, int splits, cudaStream_t s) {
  const auto kernel = mixed_gemm_batch_kernel<kNT, kR>;
  const int smem = smem_bytes<kNT, kR>(warps);
  static bool opted = false;  // a benign race: every writer sets the same attribute
  if (!opted) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<kNT, kR>(kMaxWarps));
    if (err != cudaSuccess) return err;
    opted = true;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.N / (16 * kR * warps), (p.M + 8 * kNT - 1) / (8 * kNT), splits);
  config.blockDim = dim3(32 * warps);
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = splits;
  config.attrs = attr;
  config.numAttrs = splits > 1 ? 1 : 0;
  if (config.gridDim.y > 65535) return cudaErrorInvalidValue;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, p);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace

extern "C" {

// The compiled configuration, so Python can check it loaded what it asked for.
int qc_mixed_gemm_batch_info(int* out, int n) {
  int v[4] = {QC_ACT_FP16, QC_WBITS, QC_LAYOUT, QC_MODE};
  for (int i = 0; i < n && i < 4; ++i) out[i] = v[i];
  return 4;
}

// x [M, K]; w the prepared weight (layout QC_LAYOUT); groupzero: scales / zeros [K/group, N]
// (activation type), rowscale: rowscale [N] float32; bias [N] or null; out [M, N]. All 16-byte
// aligned. token_tiles in {2, 4, 8} (8 tokens each), row_tiles in {1, 2} (16 rows each, a
// warp), warps 1..8 a CTA, splits 1..8 (the cluster's CTAs along K): N % (16 row_tiles warps)
// == 0, K % (64 splits) == 0, group 64 x 2^i dividing K (groupzero). No host syncs.
int qc_mixed_gemm_batch(const void* x, const void* w, const void* scales, const void* zeros,
                        const void* rowscale, const void* bias, void* out, int M, int N, int K,
                        int group, int token_tiles, int row_tiles, int warps, int splits,
                        void* stream) {
  if (M <= 0 || N <= 0 || K <= 0 || warps < 1 || warps > kMaxWarps || splits < 1 ||
      splits > kMaxSplits || (row_tiles != 1 && row_tiles != 2) ||
      N % (16 * row_tiles * warps) != 0 || K % (kChunkK * splits) != 0 ||
      (uint64_t)N * K >= (1ull << 32))  // byte offsets in 32 bits (WeightWalk)
    return static_cast<int>(cudaErrorInvalidValue);
  Params p;
#if QC_MODE == 2
  const int per_group = group / kChunkK;
  if (group <= 0 || group % kChunkK || (per_group & (per_group - 1)) || K % group ||
      scales == nullptr || zeros == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  p.group_shift = __builtin_ctz(static_cast<unsigned>(per_group));
#else
  if (rowscale == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  p.group_shift = 0;
#endif
  p.x = static_cast<const Act*>(x);
  p.w = static_cast<const uint8_t*>(w);
  p.scales = static_cast<const Act*>(scales);
  p.zeros = static_cast<const Act*>(zeros);
  p.rowscale = static_cast<const float*>(rowscale);
  p.bias = static_cast<const Act*>(bias);
  p.out = static_cast<Act*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.split_chunks = K / kChunkK / splits;
  auto s = static_cast<cudaStream_t>(stream);
  const auto go = [&](auto nt, auto r) {
    return launch<decltype(nt)::value, decltype(r)::value>(p, warps, splits, s);
  };
  using std::integral_constant;
  cudaError_t err = cudaErrorInvalidValue;
  if (row_tiles == 1) {
    if (token_tiles == 2) err = go(integral_constant<int, 2>{}, integral_constant<int, 1>{});
    if (token_tiles == 4) err = go(integral_constant<int, 4>{}, integral_constant<int, 1>{});
    if (token_tiles == 8) err = go(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  } else {
    if (token_tiles == 2) err = go(integral_constant<int, 2>{}, integral_constant<int, 2>{});
    if (token_tiles == 4) err = go(integral_constant<int, 4>{}, integral_constant<int, 2>{});
    if (token_tiles == 8) err = go(integral_constant<int, 8>{}, integral_constant<int, 2>{});
  }
  return static_cast<int>(err);
}

}  // extern "C"
