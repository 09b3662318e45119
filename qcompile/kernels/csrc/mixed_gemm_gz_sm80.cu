// Ampere-class (sm_80 code; also runs on sm_86/89 and, built as sm_90 SASS, on Hopper)
// mixed-input GEMM with group-wise scales and zeros applied in the main loop:
//
//   out[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   W[n, k] = q'[n, k] * s[k/g, n] + z'[k/g, n]
//
// x [M, K] bf16/fp16 row-major; q' signed int4 or int8 in the layout "sm80_mixed_v2_groupzero"
// of qcompile/kernels/mixed_gemm_sm80.py (the module docstring draws it): fragment-ordered
// 512-byte blocks, stored biased (u = q' + 2**(bits-1), unsigned); s and z' [K/g, N] in the
// activation type; bias [N] in the activation type or null; out [M, N] in the activation type.
//
// Written directly on the sm_80 primitives (no CUTLASS templates: CUTLASS 2.x has neither a
// 4:1 mixed-input warp MMA nor a fine-grained scale iterator):
//
// - Pipeline: QC_STAGES-deep cp.async ring in dynamic shared memory. One stage = the x tile
//   [TM, 64] (16-byte chunks XOR-swizzled by row so that ldmatrix is conflict-free), the weight
//   tile (TN rows x 64 k: TN/16 int4 or TN/8 int8 blocks of 512 bytes, copied verbatim), and
//   the scale and zero rows of the groups this K tile touches (1 row for g >= 64, 64/g rows for
//   g = 16 / 32; each [TN] halves). All three are cp.async'ed in the same commit group, so the
//   scales ride the same pipeline as the operands.
// - Weights never need a register shuffle: the offline reorder puts, in lane l's 16 bytes of a
//   block, exactly the values of the mma.sync.m16n8k16 B fragments lane l owns for the block's
//   4 k-steps (int4: two n8 columns, int8: one). One ld.shared.v4 per block per K tile.
// - Conversion (bias trick, no cvt per element): fp16: int4 nibbles pairs masked into the
//   mantissa of 1024.0 with one lop3 ((w >> 4i) & 0x000f000f | 0x64006400), int8 bytes with one
//   prmt into 1024.0; one sub.f16x2 removes 1024 + 2**(bits-1). bf16: int4 the same in 128.0
//   (0x4300; fma.rn.bf16x2 removes 136); int8 (8 significant bits do not fit bf16's mantissa)
//   goes through float: prmt into 2**23, one sub.f32 each, one cvt.rn.bf16x2.f32 per pair.
//   Then w = q' * s + z' with one fma (f16x2 / bf16x2) per pair, s and z' from shared memory
//   (the same for both values of a pair: they share n and a group of >= 16 k).
// - Split-K (grid.z = splits): each split writes its fp32 partial tile to the workspace; the
//   last CTA of a tile to arrive (an atomic counter per tile, zeroed by a memset on the same
//   stream) sums the partials in split order (deterministic), adds the bias and stores.
//
// Configuration by -D defines only (set by mixed_gemm_sm80.py, never edited):
//   QC_ACT_FP16            0: bf16 activations/output, 1: fp16
//   QC_WBITS               4 | 8
//   QC_TILE_M / QC_TILE_N  CTA tile (tokens x output channels; the K tile is 64)
//   QC_WARPS_M / QC_WARPS_N warp grid (each warp: TILE_M/WARPS_M x TILE_N/WARPS_N)
//   QC_STAGES              cp.async pipeline depth
// Exports (extern "C", 0 = success, else a cudaError_t value; no torch headers):
//   qc_mixed_gemm_gz_sm80_info, qc_mixed_gemm_gz_sm80_workspace_size, qc_mixed_gemm_gz_sm80
//
// ptxas -v (nvcc 13.0, sm_80 | sm_90 machine code, registers per thread, bf16/fp16), 0 bytes
// spilled everywhere: see CONFIGS in mixed_gemm_sm80.py.

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
#ifndef QC_TILE_M
#define QC_TILE_M 16
#endif
#ifndef QC_TILE_N
#define QC_TILE_N 128
#endif
#ifndef QC_WARPS_M
#define QC_WARPS_M 1
#endif
#ifndef QC_WARPS_N
#define QC_WARPS_N 4
#endif
#ifndef QC_STAGES
#define QC_STAGES 4
#endif

#include "sm80_mixed.cuh"

namespace {

using namespace qc_sm80;

constexpr int kTM = QC_TILE_M, kTN = QC_TILE_N, kTK = 64;
constexpr int kWarpsM = QC_WARPS_M, kWarpsN = QC_WARPS_N;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kTM / kWarpsM, kWN = kTN / kWarpsN;
constexpr int kMI = kWM / 16;                      // m16 MMA rows per warp
constexpr int kNI = kWN / 8;                       // n8 MMA columns per warp
constexpr int kBits = QC_WBITS;
constexpr int kBlkN = kBits == 4 ? 16 : 8;         // weight rows per 512-byte block
constexpr int kNB = kWN / kBlkN;                   // blocks per warp per K tile
constexpr int kStages = QC_STAGES;
constexpr int kMaxGroupRows = 4;                   // g = 16: 4 groups per 64-deep K tile

static_assert(kTM % kWarpsM == 0 && kTN % kWarpsN == 0, "warps must divide the tile");
static_assert(kWM % 16 == 0 && kWN % kBlkN == 0, "warp tile: m16 rows, whole weight blocks");
static_assert(kBits == 4 || kBits == 8, "QC_WBITS must be 4 or 8");
static_assert(kStages >= 2, "at least double buffering");

// shared memory of one stage, in bytes
constexpr int kSmemA = kTM * kTK * 2;
constexpr int kSmemB = kTN * kTK * kBits / 8;
constexpr int kSmemS = kMaxGroupRows * kTN * 2;
constexpr int kStageBytes = kSmemA + kSmemB + 2 * kSmemS;
constexpr int kSmemBytes = kStages * kStageBytes;


__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte cp.async, L2 only; src_bytes = 0 zero-fills the destination (out-of-range rows).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

struct Params {
  const Act* x;
  const uint8_t* w;
  const Act* scales;
  const Act* zeros;
  const Act* bias;
  Act* out;
  float* partials;  // [splits, M, N] fp32 (split-K only)
  int* counters;    // [tiles] (split-K only)
  int M, N, K, group, splits, k_tiles_per_split;
};

__global__ void __launch_bounds__(kThreads, 1) mixed_gemm_gz_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int n0 = blockIdx.x * kTN, m0 = blockIdx.y * kTM;
  const int K = p.K, N = p.N, M = p.M, group = p.group;
  const int k_tiles = K / kTK;
  const int kt_begin = blockIdx.z * p.k_tiles_per_split;
  const int kt_end = min(k_tiles, kt_begin + p.k_tiles_per_split);
  const int n_tiles = max(kt_end - kt_begin, 0);
  const int group_rows = group >= kTK ? 1 : kTK / group;  // scale rows per K tile

  // --- global -> shared (one stage) ---
  auto load_stage = [&](int stage, int kt) {
    uint8_t* base = smem + stage * kStageBytes;
    const uint32_t sA = smem_u32(base);
    const uint32_t sB = sA + kSmemA;
    const uint32_t sS = sB + kSmemB;
    const uint32_t sZ = sS + kSmemS;
    // x: kTM rows of 8 chunks of 16 bytes; chunk c of row r lands at chunk c ^ (r & 7)
#pragma unroll
    for (int i = tid; i < kTM * 8; i += kThreads) {
      const int r = i >> 3, c = i & 7;
      const int gm = m0 + r;
      const bool ok = gm < M;
      const Act* src = p.x + (size_t)(ok ? gm : 0) * K + kt * kTK + c * 8;
      cp_async16(sA + (r * 64 + ((c ^ (r & 7)) * 8)) * 2, src, ok);
    }
    // weight: kTN / kBlkN blocks of 512 bytes, block (nb, kt) at (nb * k_tiles + kt) * 512
#pragma unroll
    for (int i = tid; i < (kTN / kBlkN) * 32; i += kThreads) {
      const int b = i >> 5, c = i & 31;
      const int nb = n0 / kBlkN + b;
      const bool ok = nb * kBlkN < N;
      const uint8_t* src = p.w + ((size_t)(ok ? nb : 0) * k_tiles + kt) * 512 + c * 16;
      cp_async16(sB + b * 512 + c * 16, src, ok);
    }
    // scales / zeros: the rows of the groups starting in this K tile, [kTN] halves each
    const int g0 = (kt * kTK) / group;
    for (int i = tid; i < group_rows * (kTN / 8); i += kThreads) {
      const int r = i / (kTN / 8), c = i % (kTN / 8);
      const int gn = n0 + c * 8;
      const bool ok = gn < N;
      const size_t off = (size_t)(g0 + r) * N + (ok ? gn : 0);
      cp_async16(sS + (r * kTN + c * 8) * 2, p.scales + off, ok);
      cp_async16(sZ + (r * kTN + c * 8) * 2, p.zeros + off, ok);
    }
  };

  float acc[kMI][kNI][4];
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // prologue: stages 0 .. kStages - 2
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  // which scale row each of the 4 k-steps of a tile reads (g = 16 / 32: several per tile)
  int ks_row[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) ks_row[ks] = group >= kTK ? 0 : (ks * 16) / group;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t visible to all; everyone is done with tile t - 1's stage
    {
      const int tn = t + kStages - 1;
      if (tn < n_tiles) load_stage(tn % kStages, kt_begin + tn);
      cp_async_commit();
    }
    const uint8_t* base = smem + (t % kStages) * kStageBytes;
    const uint32_t sA = smem_u32(base);
    const uint8_t* sB = base + kSmemA;
    const Act* sS = reinterpret_cast<const Act*>(base + kSmemA + kSmemB);
    const Act* sZ = sS + kMaxGroupRows * kTN;

    uint4 braw[kNB];
#pragma unroll
    for (int b = 0; b < kNB; ++b)
      braw[b] = *reinterpret_cast<const uint4*>(sB + (warp_n * kNB + b) * 512 + lane * 16);

#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t a[kMI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        const int r = warp_m * kWM + mi * 16 + (lane & 15);
        const int c = ks * 2 + (lane >> 4);
        ldmatrix_x4(a[mi], sA + (r * 64 + ((c ^ (r & 7)) * 8)) * 2);
      }
      const Act* srow = sS + ks_row[ks] * kTN + warp_n * kWN + (lane >> 2);
      const Act* zrow = sZ + ks_row[ks] * kTN + warp_n * kWN + (lane >> 2);
      uint32_t bfrag[kNI][2];
#pragma unroll
      for (int b = 0; b < kNB; ++b) {
        const uint32_t wv = reinterpret_cast<const uint32_t*>(&braw[b])[ks];
#if QC_WBITS == 4
        Act2 q[4] = {unpack_pair<0>(wv), unpack_pair<1>(wv), unpack_pair<2>(wv), unpack_pair<3>(wv)};
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the block's two n8 columns
          const int ni = b * 2 + h;
          const Act2 s2 = Act2(srow[ni * 8], srow[ni * 8]);
          const Act2 z2 = Act2(zrow[ni * 8], zrow[ni * 8]);
          bfrag[ni][0] = as_u32(__hfma2(q[2 * h], s2, z2));
          bfrag[ni][1] = as_u32(__hfma2(q[2 * h + 1], s2, z2));
        }
#else
        const Act2 s2 = Act2(srow[b * 8], srow[b * 8]);
        const Act2 z2 = Act2(zrow[b * 8], zrow[b * 8]);
        bfrag[b][0] = as_u32(__hfma2(unpack_pair<0>(wv), s2, z2));
        bfrag[b][1] = as_u32(__hfma2(unpack_pair<1>(wv), s2, z2));
#endif
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) mma16816(acc[mi][ni], a[mi], bfrag[ni][0], bfrag[ni][1]);
    }
  }
  cp_async_wait<0>();

  // --- epilogue ---
  // thread owns, per (mi, ni): rows r, r + 8 (r = lane / 4) and columns 2 (lane % 4) + {0, 1}
  const int row_base = m0 + warp_m * kWM + (lane >> 2);
  const int col_base = n0 + warp_n * kWN + (lane & 3) * 2;
  if (p.splits > 1) {
    float* part = p.partials + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_base + mi * 16 + h * 8, col = col_base + ni * 8;
          if (row < M && col < N)
            __stcg(reinterpret_cast<float2*>(part + (size_t)row * N + col),
                   make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]));
        }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (tid == 0) {
      const int tile = blockIdx.y * gridDim.x + blockIdx.x;
      last = atomicAdd(p.counters + tile, 1) == p.splits - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_base + mi * 16 + h * 8, col = col_base + ni * 8;
          float2 sum = make_float2(0.f, 0.f);
          if (row < M && col < N) {
            for (int s = 0; s < p.splits; ++s) {
              const float2 v = __ldcg(reinterpret_cast<const float2*>(p.partials + ((size_t)s * M + row) * N + col));
              sum.x += v.x;
              sum.y += v.y;
            }
          }
          acc[mi][ni][2 * h] = sum.x;
          acc[mi][ni][2 * h + 1] = sum.y;
        }
  }
#pragma unroll
  for (int ni = 0; ni < kNI; ++ni) {
    const int col = col_base + ni * 8;
    if (col >= N) continue;
    float b0 = 0.f, b1 = 0.f;
    if (p.bias != nullptr) {
      b0 = static_cast<float>(p.bias[col]);
      b1 = static_cast<float>(p.bias[col + 1]);
    }
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row_base + mi * 16 + h * 8;
        if (row < M) {
          Act2 v;
          v.x = Act(acc[mi][ni][2 * h] + b0);
          v.y = Act(acc[mi][ni][2 * h + 1] + b1);
          *reinterpret_cast<Act2*>(p.out + (size_t)row * N + col) = v;
        }
      }
  }
}

size_t align256(size_t v) { return (v + 255) & ~size_t(255); }

int clamp_splits(int K, int splits) {
  const int k_tiles = K / kTK;
  if (splits < 1) splits = 1;
  if (splits > k_tiles) splits = k_tiles;
  if (splits < 1) splits = 1;
  return splits;
}

size_t workspace_bytes(int M, int N, int K, int splits) {
  splits = clamp_splits(K, splits);
  if (splits <= 1) return 0;
  const size_t tiles = size_t((N + kTN - 1) / kTN) * ((M + kTM - 1) / kTM);
  return align256(tiles * sizeof(int)) + size_t(splits) * M * N * sizeof(float);
}

bool group_ok(int K, int group) {
  if (group <= 0 || group % 16 || K % group) return false;
  return kTK % group == 0 || group % kTK == 0;
}

}  // namespace

extern "C" {

// The compiled configuration, so Python can check it loaded what it asked for.
int qc_mixed_gemm_gz_sm80_info(int* out, int n) {
  int v[9] = {QC_ACT_FP16, QC_WBITS, QC_TILE_M, QC_TILE_N, kTK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, kSmemBytes};
  for (int i = 0; i < n && i < 9; ++i) out[i] = v[i];
  return 9;
}

// Device workspace bytes for split-K (counters + fp32 partials); 0 without split-K.
int64_t qc_mixed_gemm_gz_sm80_workspace_size(int M, int N, int K, int splits) {
  return static_cast<int64_t>(workspace_bytes(M, N, K, splits));
}

// x [M, K], w (layout v2, N x K * bits / 8 bytes), scales / zeros [K / group, N], bias [N] or
// null, out [M, N]; all 16-byte aligned. K % 64 == 0, N % 16 (int4) / N % 8 (int8) == 0,
// group % 16 == 0 dividing K, and dividing 64 or a multiple of 64. splits >= 1 (clamped to
// the number of K tiles); split-K needs workspace_size bytes of workspace.
int qc_mixed_gemm_gz_sm80(const void* x, const void* w, const void* scales, const void* zeros,
                          const void* bias, void* out, int M, int N, int K, int group, int splits,
                          void* workspace, int64_t workspace_bytes_avail, void* stream) {
  if (M <= 0 || N <= 0 || K <= 0 || K % kTK || N % kBlkN || !group_ok(K, group))
    return static_cast<int>(cudaErrorInvalidValue);
  splits = clamp_splits(K, splits);
  const size_t need = workspace_bytes(M, N, K, splits);
  if (static_cast<int64_t>(need) > workspace_bytes_avail || (need && workspace == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  static bool configured[64] = {false};
  if (device < 0 || device >= 64) return static_cast<int>(cudaErrorInvalidDevice);
  if (!configured[device]) {
    err = cudaFuncSetAttribute(mixed_gemm_gz_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return static_cast<int>(err);
    configured[device] = true;
  }
  auto s = static_cast<cudaStream_t>(stream);
  const int tiles_n = (N + kTN - 1) / kTN, tiles_m = (M + kTM - 1) / kTM;
  const int k_tiles = K / kTK;
  if (tiles_m > 65535) return static_cast<int>(cudaErrorInvalidValue);  // grid.y limit
  Params p;
  p.x = static_cast<const Act*>(x);
  p.w = static_cast<const uint8_t*>(w);
  p.scales = static_cast<const Act*>(scales);
  p.zeros = static_cast<const Act*>(zeros);
  p.bias = static_cast<const Act*>(bias);
  p.out = static_cast<Act*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group = group;
  p.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  p.splits = (k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split;  // no empty split
  p.counters = nullptr;
  p.partials = nullptr;
  if (p.splits > 1) {
    const size_t counter_bytes = size_t(tiles_n) * tiles_m * sizeof(int);
    p.counters = static_cast<int*>(workspace);
    p.partials = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + align256(counter_bytes));
    err = cudaMemsetAsync(workspace, 0, counter_bytes, s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  dim3 grid(tiles_n, tiles_m, p.splits);
  mixed_gemm_gz_kernel<<<grid, kThreads, kSmemBytes, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
