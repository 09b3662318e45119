// Read-only probes of the int4 decode kernel's weight walk (benchmarks/bench_walk_probe.py):
// the CTAs, warps, rounds and 16-byte loads of qcompile/kernels/csrc/mixed_gemm_decode.cu's
// main loop, on the sm90 layout, with the conversion, MMAs and scaling replaced by an xor of
// the loaded words; kContig reads each row tile's chunks contiguously (tile-major) instead;
// ring_walk streams the same bytes through a per-warp ring of rounds in shared memory filled
// by cp.async (the decode-kernel experiment of 774a293). What they separate: the cost of the
// access pattern and of the load mechanism from the cost of the work done on the bytes.
#include <cuda_runtime.h>
#include <cstdint>

#include "decode_common.cuh"  // the decode kernels' own weight load (bench_walk_probe.py adds its folder)

using qc_decode::ld_stream128;
template <int kR, int kLoads, bool kContig>
__global__ void __launch_bounds__(512) walk(const uint8_t* w, int N, int K, unsigned* out) {
  constexpr int kUnroll = kLoads / kR;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, tile0 = blockIdx.x * kR, chunks = K / 64;
  const uint32_t tiles_n = N / 16;
  uint32_t base[kR], stride;
  for (int r = 0; r < kR; ++r)
    base[r] = kContig ? (uint32_t)(tile0 + r) * chunks * 512 + lane * 16
                      : (tile0 + r) * 128 + t * tiles_n * 128 + g * 16;
  stride = kContig ? 512 : 4 * tiles_n * 128;
  uint32_t acc = 0;
  for (int c0 = warp; c0 < chunks; c0 += kUnroll * warps) {
    uint4 v[kUnroll][kR];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * warps;
#pragma unroll
      for (int r = 0; r < kR; ++r) v[u][r] = c < chunks ? ld_stream128(w + base[r] + c * stride) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kR; ++r) acc ^= v[u][r].x ^ v[u][r].y ^ v[u][r].z ^ v[u][r].w;
  }
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) atomicXor(out + blockIdx.x % 64, acc);
}

// The same walk through a per-warp ring of kStages rounds in shared memory filled by cp.async
// (16 bytes a lane a chunk-tile, as 774a293's decode kernel did), read back with 16-byte shared loads.
template <int kR, int kLoads, int kStages>
__global__ void __launch_bounds__(512) ring_walk(const uint8_t* w, int N, int K, unsigned* out) {
  constexpr int kUnroll = kLoads / kR, kRound = kLoads * 512;
  extern __shared__ __align__(16) char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, tile0 = blockIdx.x * kR, chunks = K / 64;
  const uint32_t tiles_n = N / 16, stride = 4 * tiles_n * 128;
  uint32_t base[kR];
  for (int r = 0; r < kR; ++r) base[r] = (tile0 + r) * 128 + t * tiles_n * 128 + g * 16;
  char* ring = smem + warp * kStages * kRound;
  const uint32_t ring_at = (uint32_t)__cvta_generic_to_shared(ring);
  const int step = kUnroll * warps, rounds = warp < chunks ? (chunks - warp + step - 1) / step : 0;
  auto issue = [&](int i) {
    if (i < rounds) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = warp + i * step + u * warps;
        if (c >= chunks) continue;
#pragma unroll
        for (int r = 0; r < kR; ++r)
          asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(
              ring_at + (i % kStages) * kRound + (u * kR + r) * 512 + 16 * lane), "l"(w + base[r] + c * stride) : "memory");
      }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  for (int i = 0; i + 1 < kStages; ++i) issue(i);
  uint32_t acc = 0;
  for (int i = 0; i < rounds; ++i) {
    __syncwarp();
    issue(i + kStages - 1);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 1) : "memory");
    __syncwarp();
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      if (warp + i * step + (q / kR) * warps >= chunks) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(ring + (i % kStages) * kRound + q * 512 + 16 * lane);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) atomicXor(out + blockIdx.x % 64, acc);
}

// The same walk through a per-warp ring of kStages rounds filled by the Hopper bulk copy
// (cp.async.bulk, the TMA unit: one instruction a 128-byte line, issued by lanes 0-15, no
// load-pipe work a byte), each slot's arrival counted by an mbarrier. A chunk-tile's 4 lines
// sit 160 bytes apart so that lane (g, t) reading 16 bytes at line t, byte 16 g, meets no bank
// conflict. sm_90 only.
template <int kR, int kLoads, int kStages>
__global__ void __launch_bounds__(512) bulk_walk(const uint8_t* w, int N, int K, unsigned* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kUnroll = kLoads / kR, kTile = 4 * 160, kRound = kLoads * kTile;
  extern __shared__ __align__(16) char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, tile0 = blockIdx.x * kR, chunks = K / 64;
  const uint32_t tiles_n = N / 16, stride = 4 * tiles_n * 128;
  char* ring = smem + warp * (kStages * kRound + 16 * kStages);  // 16-byte aligned rings
  uint64_t* bars = reinterpret_cast<uint64_t*>(ring + kStages * kRound);  // 16 bytes a stage
  const uint32_t ring_at = (uint32_t)__cvta_generic_to_shared(ring);
  const uint32_t bar_at = (uint32_t)__cvta_generic_to_shared(bars);
  if (lane < kStages) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar_at + 16 * lane));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncwarp();
  const int step = kUnroll * warps, rounds = warp < chunks ? (chunks - warp + step - 1) / step : 0;
  auto issue = [&](int i) {
    if (i >= rounds) return;
    const int slot = i % kStages;
    const int q = lane >> 2, u = q / kR, r = q % kR, c = warp + i * step + u * warps;
    int lines = 0;  // lines of this round (chunks past the end are not copied)
#pragma unroll
    for (int uu = 0; uu < kUnroll; ++uu) lines += (warp + i * step + uu * warps < chunks) ? 4 * kR : 0;
    __syncwarp();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // this slot's last reads first
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar_at + 16 * slot), "r"(lines * 128) : "memory");
    __syncwarp();
    if (lane < 4 * kLoads && c < chunks) {
      const uint8_t* src = w + (tile0 + r) * 128 + t * tiles_n * 128 + c * stride;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 128, [%2];\n"
                   ::"r"(ring_at + slot * kRound + q * kTile + t * 160), "l"(src), "r"(bar_at + 16 * slot) : "memory");
    }
  };
  for (int i = 0; i + 1 < kStages; ++i) issue(i);
  uint32_t acc = 0;
  for (int i = 0; i < rounds; ++i) {
    issue(i + kStages - 1);
    const int slot = i % kStages;
    const uint32_t phase = (i / kStages) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(bar_at + 16 * slot), "r"(phase) : "memory");
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      if (warp + i * step + (q / kR) * warps >= chunks) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(ring + slot * kRound + q * kTile + t * 160 + g * 16);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) atomicXor(out + blockIdx.x % 64, acc);
#endif
}

template <typename Kern>
int launch(Kern k, dim3 grid, int threads, int smem, cudaStream_t s, const uint8_t* w, int N, int K, unsigned* out) {
  if (smem > 48 * 1024 && cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return 2;
  k<<<grid, threads, smem, s>>>(w, N, K, out);
  return (int)cudaGetLastError();
}
// smem: dynamic shared memory requested (unused) to hold the CTAs an SM to the decode kernel's count
extern "C" int qc_walk_probe(const void* w, int N, int K, void* out, int loads, int contig, int warps, int smem, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  dim3 grid(N / 32);
  const auto* wp = static_cast<const uint8_t*>(w);
  auto* op = static_cast<unsigned*>(out);
  if (loads == 4 && contig == 0) return launch(walk<2, 4, false>, grid, 32 * warps, smem, s, wp, N, K, op);
  else if (loads == 8 && contig == 0) return launch(walk<2, 8, false>, grid, 32 * warps, smem, s, wp, N, K, op);
  else if (loads == 4 && contig == 1) return launch(walk<2, 4, true>, grid, 32 * warps, smem, s, wp, N, K, op);
  else if (loads == 8 && contig == 1) return launch(walk<2, 8, true>, grid, 32 * warps, smem, s, wp, N, K, op);
  // contig 2 / 3: the cp.async ring of that many rounds (the smem argument is added to it)
  const int ring = warps * (contig == 2 ? 2 : 3) * loads * 512;
  if (loads == 4 && contig == 2) return launch(ring_walk<2, 4, 2>, grid, 32 * warps, smem + ring, s, wp, N, K, op);
  if (loads == 4 && contig == 3) return launch(ring_walk<2, 4, 3>, grid, 32 * warps, smem + ring, s, wp, N, K, op);
  // contig 4 / 5: the bulk-copy ring of 2 / 3 rounds (160-byte lines, an mbarrier a round)
  const int bulk = warps * (contig == 4 ? 2 : 3) * (loads * 640 + 16);
  if (loads == 4 && contig == 4) return launch(bulk_walk<2, 4, 2>, grid, 32 * warps, smem + bulk, s, wp, N, K, op);
  if (loads == 4 && contig == 5) return launch(bulk_walk<2, 4, 3>, grid, 32 * warps, smem + bulk, s, wp, N, K, op);
  return 1;
}
