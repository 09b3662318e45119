// Decode kernel for qcompile::mixed_gemm: few tokens (M <= 32) x int4/int8 weights, built to
// read the weight once at the memory bandwidth rather than to keep tensor cores busy.
//
//   out[m, n] = sum_k x[m, k] * W[n, k]  (* rowscale[n])  + bias[n]
//
// Why a kernel of its own: at decode the GEMM is a weight stream (14336x4096 int4 is 29 MB,
// ~10 us at 3 TB/s) and the GEMM main loops -- the Hopper CUTLASS collective and our sm_80
// pipeline alike -- stage every K tile through shared memory behind a barrier, so one CTA keeps
// only a few K tiles in flight and the per-tile latency, not the bandwidth, sets the time
// (benchmarks/NOTES.md). Here there is no shared-memory stage at all: both prepared layouts
// already put, in each lane's bytes, exactly the m16n8k16 A-fragment values that lane owns,
// so a warp loads its fragments straight from global memory into registers, many K chunks at
// once, converts them in registers and issues mma.sync with the *weights as the A operand*
// (16 output channels per MMA row block) and the tokens as the n8 B operand ("swap AB": at
// M = 1 an MMA then wastes 7 of 8 columns, not 15 of 16 rows, and tensor cores stay far from
// their limit either way).
//
// Work split: a CTA owns kR 16-row tiles of W and 8 * kNT tokens; its warps stride over the
// 64-deep K chunks (warp w takes chunks w, w + warps, ...), so a CTA reads a contiguous run of
// the weight. Each warp issues the loads of a round (kRoundLoads chunk-tiles) before
// converting any of them (4-bit sm90 builds: each tile's next load as soon as it is
// converted, kRolling). The warps' fp32 partial tiles are summed through shared memory in
// warp order (deterministic, no atomics, no workspace), then scaled, biased and stored.
//
// Layouts (QC_LAYOUT), lane l = 4g + t of a warp, a 16-row tile nt, a 16-deep K step j:
//   0  "sm90" (mixed_gemm.py reorder_weight, signed two's complement): the tile's 16x16 block
//      (nt, j) is 256 values at value offset 256 * (nt + N/16 * j); lane l's values are at
//      8l .. 8l+7 (int4: one 32-bit word, nibble p = m1 + 2 k2 + 4 k0; int8: two words,
//      byte m1 + 2 k0 + 4 k2) with row g + 8 m1, k 2t + k0 + 8 k2.
//   1  "sm80 v2" (mixed_gemm_sm80.py, biased unsigned): 512-byte blocks of 16 rows (int4) or
//      8 rows (int8) x 64 k; lane l's 16 bytes hold its fragments of the block's 4 K steps.
// Both become the A fragment {a0: row g, k 2t..2t+1; a1: row g+8; a2: row g, k 2t+8..9;
// a3: row g+8, k 2t+8..9} of biased integers h = q' + kBiasH (the magic-number conversion of
// sm80_mixed.cuh without its subtract); load_chunk says how the sm90 layout is read with
// 16-byte loads (the MMA's k slots relabelled, load_x loading the activations to match).
//
// Scales (QC_MODE): 0 "rowscale": float32 [N] applied to the fp32 sum (the sm90 rowscale
// layout); 2 "groupzero": W = q' * s + z' with s, z' [K/g, N] in the activation type (g a
// power-of-two multiple of 64, so one group per chunk), applied per chunk in fp32 after the MMAs:
// s * sum(x h) + (z' - kBiasH s) * sum(x), sum(x) from an MMA with an all-ones A. In
// rowscale mode the bias comes off once at the end (kBiasH * sum(x) over all chunks).
// Where a grid has many waves of CTAs (the `sz_smem` launch argument; groupzero only), each
// CTA first stages its rows' scales and zeros in shared memory, behind one barrier, and the
// main loop reads a lane's four values with one 8-byte shared load instead of four 2-byte
// global loads: fewer registers (62 instead of 74), so more CTAs an SM. In the GEMM sequence
// of a decode step on an H100 (int4 g128, M = 1) 28672x4096 took 28.1 us with 4-warp CTAs
// against 31.0 for the best launch without; with few CTAs (4096 or 6144 rows) the staging's
// barrier at the start cost 0.2-0.9 us instead (benchmarks/NOTES.md).
//
// Gated (the `gated` launch argument, 32-row CTAs): the weight's 16-row tiles alternate a
// gated MLP's gate and up rows (ops.interleave_gate_up), so a CTA's two row tiles are the gate
// and up rows of the same 16 outputs; its epilogue writes silu(gate) * up, [M, N/2].
//
// RMSNorm in front (`norm` given, [K] in the activation type): x is the norm's input and the
// kernel computes out = r_m * sum_k (x[m, k] * norm[k]) W[n, k] with r_m = rsqrt(mean_k x[m,
// k]^2 + eps): x * norm is rounded to the activation type for the MMA (made once, in the CTA's prologue, into shared memory: stage_norm, while the first weight loads
// are in flight), the sum of squares in fp32 in the same pass, and r_m scales the fp32 sums
// before the row scale and bias (a template flag: without a norm the kernel is the code it
// was before). Every CTA reads all of x anyway, so the norm costs no extra pass over global
// memory, and no normalized copy is written there. The staged tokens must fit the 48 KB of
// shared memory (DecodeChoice.takes_norm: 4 tokens at K = 4096).
// Residual after (`residual` given, [M, N] like out): out = Act(sum + residual), the add of a
// transformer block's skip connection, in fp32 and rounded once.
//
// Lookup-table weights (QC_MODE 3 "lut", sm90 layout, 4 bits): W = T[c] * s with a 16-value
// table T (NF4, FP4, any codebook) and float32 block scales s [K/g, N]. The codes are laid
// out as the signed int4 values c - 8 with each word's nibbles regrouped (layout
// sm90_lut_pairs: byte i holds fragment register i's two codes, low nibble first), so a raw
// nibble u indexes the CTA's copy of the table in shared memory at u (holding T[u ^ 8],
// rounded to the activation type): 16 values of 2 bytes are 8 words in 8 banks, so a warp's
// lookups never conflict. The MMA sums x * T[c]
// over a chunk's one block and s scales it in fp32. The same build exports the prefill path's
// dequantization (qc_lut_dequantize: W in the activation type, for a cuBLAS GEMM).
// With the launch argument lut_pairs (lut_gemm.PAIR_TABLE, on: faster in every cell timed),
// a table of all 256 value pairs, one 32-bit word a pair, in 32 copies so that lane l reads copy l
// (word 32 p + l: always bank l, never a conflict), 32 KB in the region the reduction uses
// after the main loop. A fragment register is then one shared load indexed by a byte of the
// weight as it is (its address a prmt and a lea), instead of two 2-byte loads and the
// packing of their values. Which table a launch reads is a template parameter (kTable), so
// a chunk's 16 lookups issue back to back ahead of its MMAs (bench lut_decode_ab: 5-11%
// faster at 1-16 tokens than one runtime branch per lookup).
//
// Configuration: -D QC_ACT_FP16, QC_WBITS, QC_LAYOUT, QC_MODE; the token tiles (1, 2, 4 x 8
// tokens), row tiles (1, 2, 4 x 16 rows; 4 with up to 16 tokens) and warps per CTA are
// launch arguments.
// Exports (extern "C", 0 = success, else a cudaError_t value): qc_mixed_gemm_decode_info, and
// qc_mixed_gemm_decode (QC_MODE 0, 2) or qc_lut_gemm_decode and qc_lut_dequantize (QC_MODE 3).

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
#include "lut_lookup.cuh"
#include "sm80_mixed.cuh"

namespace {

using namespace qc_sm80;
using namespace qc_decode;

constexpr int kBits = QC_WBITS;
constexpr int kWords = kBits / 4;        // 32-bit weight words per lane per 16-deep K step
constexpr int kChunkK = 64;              // K per chunk (4 MMA steps)

// log2(group / kChunkK) for a group of kChunkK x 2^i that divides K (a chunk's group is then
// its index shifted right by it), else -1: the group sizes every group-wise launch takes.
inline int chunk_group_shift(int group, int K) {
  const int per_group = group / kChunkK;
  if (group <= 0 || group % kChunkK || (per_group & (per_group - 1)) || K % group) return -1;
  return __builtin_ctz(static_cast<unsigned>(per_group));
}
constexpr int kMaxWarps = 16;
constexpr int kLutPairWords = 256 * 32;  // lut pairs: 256 pairs x 32 copies
// Chunk-tile loads a warp issues before converting any (a round): 4 for int4, 2 for int8,
// whose chunk-tiles are twice the bytes (in the GEMM sequence of a decode step on an H100,
// bench_stream: int8 per-channel 22.6 vs 23.9 us a GEMM with 2 instead of 4, int4 17.1 vs
// 18.5 with 4; holding two rounds in registers to overlap them was slower for both).
constexpr int kRoundLoads = kBits == 8 ? 2 : 4;
// Rolling rounds (4-bit weights in the sm90 layout: int4 and lookup-table codes): a warp
// issues the next round's load of a chunk-tile as soon as it has converted this round's,
// before that tile's MMAs and scaling, so a round's loads are in flight while the rest of
// the round is worked (its scales, needed only after the MMAs, are loaded once the tile is
// scaled). In one process on the H100 (decode_rolling_ab.jsonl, outputs equal bit for bit):
// int4 3-10% faster on the 4096-row layers and at 16 tokens, within 1-3.5% either way at one
// token on the wide layers; NF4 1-5% faster but for one cell (+1.7%); int8, whose rounds are
// two chunk-tiles of twice the bytes, 8-11% slower at 16 tokens, so it keeps whole rounds.
// Group-wise and lookup-table weights only, and 16-token launches of up to 32 rows (kNT 2, kR
// <= 2): there it was 3-12% faster (decode_ab.jsonl: int4 g128 at 16 tokens, every launch
// shape of 16 or 32 rows), while at one token it lost 2-5% on the launches of 8 and 4 warps
// (wide layers; 3% faster with 16 warps) and 64-row launches spilled registers and ran
// 1.4-1.7x slower.
constexpr bool kRolling = kBits == 4 && QC_LAYOUT == 0 && QC_MODE != 0;

static_assert(kBits == 4 || kBits == 8, "QC_WBITS must be 4 or 8");
static_assert(QC_LAYOUT == 0 || QC_LAYOUT == 1, "QC_LAYOUT must be 0 (sm90) or 1 (sm80 v2)");
static_assert(QC_MODE == 0 || QC_MODE == 2 || QC_MODE == 3,
              "QC_MODE must be 0 (rowscale), 2 (groupzero) or 3 (lut)");
static_assert(QC_MODE != 3 || (QC_LAYOUT == 0 && QC_WBITS == 4),
              "lookup-table weights are 4-bit codes in the sm90 layout");
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
  int gated;              // out [M, N/2] = silu(gate) * up, gate and up in alternate 16-row tiles
  const Act* norm;        // [K] RMSNorm weight, or null
  float eps;              // RMSNorm epsilon
  const Act* residual;    // [M, N] added to the result, or null
  const float* lut_scales;  // lut: [K/g, N] block scales
  const float* lut_table;   // lut: [16] the values of codes 0..15
  const float* norm_ssq;  // [M, ssq_parts]: x is already x * norm; its squares' partial sums
  int ssq_parts;
  const Act* next_norm;   // [N]: also write normed = out * next_norm and ssq_out, or null
  Act* normed;            // [M, N]
  float* ssq_out;         // [M, N / 16]: the sums of out^2 over each 16 rows
};

// A launch's RMSNorm: none; staged (x is the norm's input, the CTA makes x * norm and the
// sums of squares itself: p.norm); given (x is already x * norm, written by the op before
// with the partial sums of squares of its input: p.norm_ssq); or out (none read, and the
// result is the next norm's input: the epilogue also writes p.normed and p.ssq_out).
constexpr int kNormNone = 0, kNormStaged = 1, kNormGiven = 2, kNormOut = 3;

// Which K a lane's MMA slots stand for is free as long as A (weights) and B (activations)
// agree: the MMA sums over its 16 k slots. So a chunk's 4 MMA steps need not be the layout's
// 4 K steps. For the sm90 layout, lane (g, t) loads with one 16-byte load the four words of
// quad g (rows g, g + 8) in K step t of the chunk -- int4: 16 k, all of one step; int8: two
// loads, steps 2q + t/2, half of a step's k each -- and MMA step s takes word s; its
// activations are then 16 contiguous k (int4) or 4 + 4 (int8), loaded wide too. The sm80 v2
// layout already gives a lane its own words of the 4 steps in one 16-byte load.
//
// Where a lane's weight bytes are: those of chunk c of 16-row tile `tile` start at
// lane + c * stride bytes into the prepared weight (`second` further for an int8 lane's second
// load). Computed once per tile, in 32 bits (the launch checks the weight is under 4 GB), so
// the loop's addresses are one multiply-add each.
struct WeightWalk {
  uint32_t lane, second, stride;
};

__device__ __forceinline__ WeightWalk weight_walk(int tile, int lane, int N, int K) {
  const int g = lane >> 2, t = lane & 3;
#if QC_LAYOUT == 0
  // block (tile, K step j), 256 values, at byte (tile + N/16 * j) * 32 * kBits; chunk c holds
  // steps 4c..4c+3
  const uint32_t tiles_n = N / 16, block = 32 * kBits;
#if QC_WBITS == 4
  return {tile * block + t * tiles_n * block + g * 16, 0, 4 * tiles_n * block};
#else
  return {tile * block + (t >> 1) * tiles_n * block + g * 32 + (t & 1) * 16,
          2 * tiles_n * block, 4 * tiles_n * block};
#endif
#else
  // 512-byte blocks (16 int4 rows, or 8 int8 rows, x 64 k), a row tile's chunks consecutive
  const uint32_t chunks = K / kChunkK, tile_bytes = chunks * 512 * (kBits / 4);
  return {tile * tile_bytes + lane * 16, chunks * 512, 512};
#endif
}

// The raw words of one chunk-tile for MMA steps 0..3; `at` = this lane's first 16 bytes.
__device__ __forceinline__ void load_chunk(uint32_t (&raw)[4][kWords], const uint8_t* at,
                                           uint32_t second) {
  const uint4 v = ld_stream128(at);
#if QC_WBITS == 4
  raw[0][0] = v.x; raw[1][0] = v.y; raw[2][0] = v.z; raw[3][0] = v.w;
#elif QC_LAYOUT == 0
  // two half steps a load: steps 0, 1 from the first, 2, 3 from the second
  const uint4 u = ld_stream128(at + second);
  raw[0][0] = v.x; raw[0][1] = v.y; raw[1][0] = v.z; raw[1][1] = v.w;
  raw[2][0] = u.x; raw[2][1] = u.y; raw[3][0] = u.z; raw[3][1] = u.w;
#else
  // rows g from block 2 * tile, rows g + 8 from block 2 * tile + 1
  const uint4 u = ld_stream128(at + second);
  raw[0][0] = v.x; raw[1][0] = v.y; raw[2][0] = v.z; raw[3][0] = v.w;
  raw[0][1] = u.x; raw[1][1] = u.y; raw[2][1] = u.z; raw[3][1] = u.w;
#endif
}

// The B fragments {b0, b1} of MMA steps 0..3 of a chunk for one token row x (chunk start),
// matching load_chunk's k: b0 holds k, k + 1 and b1 k + 8, k + 9 of step s's k.
// kShared: x is the CTA's staged copy in shared memory (plain loads; __ldg is global only).
template <typename T, bool kShared>
__device__ __forceinline__ T ld_x(const T* p) {
  if constexpr (kShared) return *p;
  else return __ldg(p);
}

template <bool kShared = false>
__device__ __forceinline__ void load_x(uint32_t (&b)[4][2], const Act* x, int t, bool ok) {
  if (!ok) {
#pragma unroll
    for (int s = 0; s < 4; ++s) b[s][0] = b[s][1] = 0u;
    return;
  }
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);  // pairs of k
#if QC_LAYOUT == 0 && QC_WBITS == 4
  // step s: k 16 t + 2 s (+ 8)
  const uint4 lo = ld_x<uint4, kShared>(reinterpret_cast<const uint4*>(x32 + 8 * t));
  const uint4 hi = ld_x<uint4, kShared>(reinterpret_cast<const uint4*>(x32 + 8 * t + 4));
  b[0][0] = lo.x; b[1][0] = lo.y; b[2][0] = lo.z; b[3][0] = lo.w;
  b[0][1] = hi.x; b[1][1] = hi.y; b[2][1] = hi.z; b[3][1] = hi.w;
#elif QC_LAYOUT == 0
  // step 2q + h: k 32 q + 16 (t / 2) + 4 (t % 2) + 2 h (+ 8)
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int base = 16 * q + 8 * (t >> 1) + 2 * (t & 1);
    const uint2 lo = ld_x<uint2, kShared>(reinterpret_cast<const uint2*>(x32 + base));
    const uint2 hi = ld_x<uint2, kShared>(reinterpret_cast<const uint2*>(x32 + base + 4));
    b[2 * q][0] = lo.x; b[2 * q + 1][0] = lo.y; b[2 * q][1] = hi.x; b[2 * q + 1][1] = hi.y;
  }
#else
  // step s: k 16 s + 2 t (+ 8), the layout's own K steps
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    b[s][0] = ld_x<uint32_t, kShared>(x32 + 8 * s + t);
    b[s][1] = ld_x<uint32_t, kShared>(x32 + 8 * s + t + 4);
  }
#endif
}

// RMSNorm, the CTA's prologue: x * norm for tokens m0 .. m0 + rows - 1 into xs ([rows][K],
// shared memory, rounded to the activation type as the MMA takes it) and each warp's share of
// their sums of squares (fp32) into ss[warp][token - m0]. Once a CTA instead of once a chunk
// in every warp's loop: there, 7 of 8 lane groups of a one-token launch did the work on
// zeros, and it cost more than Inductor's norm kernel it replaced (28672x4096 gated, M = 1,
// H100: +4.0 us a GEMM in the loop; an MMA of x with itself for the squares, +7.4).
// x * norm of one 16-byte piece (8 values), its squares' sum added to part.
__device__ __forceinline__ uint4 norm_piece(const uint4 v, const uint4 w, float& part) {
  uint32_t vw[4] = {v.x, v.y, v.z, v.w};
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const Act2 a = *reinterpret_cast<const Act2*>(&vw[e]);
    const float lo = static_cast<float>(a.x), hi = static_cast<float>(a.y);
    part = fmaf(lo, lo, fmaf(hi, hi, part));
    vw[e] = as_u32(__hmul2(a, *reinterpret_cast<const Act2*>(&ww[e])));
  }
  return make_uint4(vw[0], vw[1], vw[2], vw[3]);
}

__device__ __forceinline__ void stage_norm(Act* xs, float* ss, const Act* x, const Act* norm,
                                           int rows, int K, int sum_stride) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pieces = K / 8, step = blockDim.x;
  const uint4* w16 = reinterpret_cast<const uint4*>(norm);
  for (int r = 0; r < rows; ++r) {
    const uint4* x16 = reinterpret_cast<const uint4*>(x + (size_t)r * K);
    uint4* s16 = reinterpret_cast<uint4*>(xs + (size_t)r * K);
    float part = 0.f;
    // two pieces a thread an iteration, both loads issued before either is used (K = 4096
    // with 8 warps: one iteration, one L2 round trip)
    for (int i = threadIdx.x; i < pieces; i += 2 * step) {
      const bool two = i + step < pieces;
      const uint4 v0 = __ldg(x16 + i), w0 = __ldg(w16 + i);
      uint4 v1 = v0, w1 = w0;
      if (two) {
        v1 = __ldg(x16 + i + step);
        w1 = __ldg(w16 + i + step);
      }
      s16[i] = norm_piece(v0, w0, part);
      if (two) s16[i + step] = norm_piece(v1, w1, part);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) ss[warp * sum_stride + r] = part;
  }
}

// The weights as exact integers in the activation type, h = q' + kBiasH, without the
// subtract that would make them q': the MMA sums x * h and the bias comes off once per chunk
// (kBiasH * sum(x), the sum from an MMA with an all-ones A) instead of once per weight pair.
// int4: 0x4300 | u is 128 + u in bf16, 0x6400 | u is 1024 + u in fp16 (u = q' + 8); int8:
// 1024 + u in fp16 (u = q' + 128), and q' itself in bf16 (whose 8-bit significand cannot hold
// a biased byte, so the float conversion of unpack_pair, exact, is used as is).
#if QC_MODE == 3
constexpr float kBiasH = 0.f;  // the table's values themselves, no bias
#elif QC_WBITS == 4
constexpr float kBiasH = QC_ACT_FP16 ? 1032.f : 136.f;
#else
constexpr float kBiasH = QC_ACT_FP16 ? 1152.f : 0.f;
#endif
constexpr uint32_t kOnes2 = QC_ACT_FP16 ? 0x3c003c00u : 0x3f803f80u;  // (1, 1)

template <int I>
__device__ __forceinline__ uint32_t biased_pair(uint32_t w) {
#if QC_WBITS == 4
  return and_or(w >> (4 * I), 0x000f000fu, QC_ACT_FP16 ? 0x64006400u : 0x43004300u);
#elif QC_ACT_FP16
  return prmt(w, 0x64646464u, I == 0 ? 0x5250u : 0x5351u);
#else
  return as_u32(unpack_pair<I>(w));
#endif
}

// biased_pair of two's complement int4 nibbles (the sm90 layout) in one lop3 a pair:
// (w >> 4I) & 0x000f000f picks the two nibbles, and the xor with the magic exponent or'ed with
// 0x00080008 both sets the exponent (the masked bits are zero there) and flips each nibble's
// sign bit (u = q' + 8), the xor of the whole word that took one more instruction.
template <int I>
__device__ __forceinline__ uint32_t signed_pair(uint32_t w) {
  constexpr uint32_t kMagicSigned = (QC_ACT_FP16 ? 0x64006400u : 0x43004300u) | 0x00080008u;
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;\n"  // (a & b) ^ c
      : "=r"(d) : "r"(w >> (4 * I)), "r"(0x000f000fu), "r"(kMagicSigned));
  return d;
}

#if QC_MODE == 3
// The pair table's shared load. volatile: read after the barrier that ends the table's
// staging, never moved above it (its address depends only on weights loaded before it).
__device__ __forceinline__ uint32_t load_staged_pair(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
#endif

// h of the A fragment {a0, a1, a2, a3} from one K step's raw words (lut: T[c] looked up in
// the CTA's table, indexed by raw nibble; register I from byte I of the pair-byte layout).
// kPairs (lut): the 256-pair table, a compile-time choice so that no branch stands between a
// chunk's lookups and its MMAs (the compiler issues all of a chunk's table loads first).
template <bool kPairs = false>
__device__ __forceinline__ void fragment(uint32_t (&a)[4], const uint32_t (&r)[kWords],
                                         const unsigned short* lut, const uint32_t* pairs) {
#if QC_MODE == 3
  // byte i of the word holds register i's two codes (the layout's pair bytes), low nibble
  // first: as it is, an index into the pair table. pairs is the table (word 32 p + lane of
  // pair p): register i is the word at byte 128 p + 4 lane of it, one prmt (the byte p, zero
  // extended) and one lea (p << 7 plus this lane's shared address, held in a register) a
  // register. As indexing into pairs, each lookup also took an add of the table's base (its
  // shared window address is not a link-time constant on sm_90): a shift, a lop3 and that add.
  if (kPairs) {
    uint32_t lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(lane));
    const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(pairs)) + 4 * lane;
    qc_lut::lookup8_pairs(r[0], at, load_staged_pair, a);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    a[i] = static_cast<uint32_t>(lut[(r[0] >> (8 * i)) & 0xfu]) |
           (static_cast<uint32_t>(lut[(r[0] >> (8 * i + 4)) & 0xfu]) << 16);
#elif QC_LAYOUT == 0 && QC_WBITS == 4
  a[0] = signed_pair<0>(r[0]); a[1] = signed_pair<1>(r[0]);
  a[2] = signed_pair<2>(r[0]); a[3] = signed_pair<3>(r[0]);
#elif QC_LAYOUT == 0
  const uint32_t w0 = r[0] ^ 0x80808080u, w1 = r[1] ^ 0x80808080u;
  a[0] = biased_pair<0>(w0); a[1] = biased_pair<1>(w0);
  a[2] = biased_pair<0>(w1); a[3] = biased_pair<1>(w1);
#elif QC_WBITS == 4
  a[0] = biased_pair<0>(r[0]); a[1] = biased_pair<2>(r[0]);
  a[2] = biased_pair<1>(r[0]); a[3] = biased_pair<3>(r[0]);
#else
  a[0] = biased_pair<0>(r[0]); a[1] = biased_pair<0>(r[1]);
  a[2] = biased_pair<1>(r[0]); a[3] = biased_pair<1>(r[1]);
#endif
}

#if QC_MODE == 3
// The lookup pairs, the CTA's prologue: word 32 q + c holds pair q (the values at raw nibbles
// q & 15 and q >> 4, the first in the low half), the same in every column c. Lane l takes the
// value at nibble l & 15 from the table and the others from lanes 0..15 by shuffles (two
// values a shuffle), then store (hi, r) writes pair 16 hi + (l & 15) into column (l + r) & 31:
// 32 different banks in every store, and over r = 0..15 lanes l and l + 16 fill all 32 columns
// of their pairs. 256 stores a CTA, shared by its warps, and 9 shuffles a warp, where staging
// the 16 values in shared memory first and reading two of them back for each stored word took
// 768 shared-memory operations a CTA and a barrier more.
__device__ __forceinline__ void stage_pairs(uint32_t* table, const float* values, int lane,
                                            int warp, int warps) {
  const Act own = Act(__ldg(values + ((lane & 15) ^ 8)));
  const uint32_t lo = static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&own));
  // two = (value at nibble 2i, value at nibble 2i + 1) for lanes 2i, 2i + 1
  const uint32_t mate = __shfl_xor_sync(0xffffffffu, lo, 1);
  const uint32_t two = (lane & 1) ? (mate | (lo << 16)) : (lo | (mate << 16));
  uint32_t pair[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t v = __shfl_sync(0xffffffffu, two, 2 * i);
    pair[2 * i] = lo | (v << 16);
    pair[2 * i + 1] = lo | (v & 0xffff0000u);
  }
  uint32_t* row = table + 32 * (lane & 15);
  for (int r = warp; r < 16; r += warps) {
    uint32_t* at = row + ((lane + r) & 31);
#pragma unroll
    for (int hi = 0; hi < 16; ++hi) at[512 * hi] = pair[hi];
  }
}
#endif

#if QC_MODE == 2
// The staged scales and zeros: one 8-byte word per (group, row tile, lane group g) holding the
// scales of rows g and g + 8, then their zeros, as a lane of group g reads them.
__host__ __device__ constexpr int sz_smem_bytes(int K, int group_shift, int kR) {
  return (K >> (6 + group_shift)) * kR * 8 * 8;
}

// Fill them from the [K/g, N] tensors: each item is the 16-byte run of one half (8 rows) of a
// row tile's scales or zeros in one group.
template <int kR>
__device__ __forceinline__ void stage_scales_zeros(uint2* szs, const Params& p, int tile0) {
  const int groups = p.K >> (6 + p.group_shift);
  // item i: half h (rows 8h .. 8h + 7), tensor q (0 scales, 1 zeros), row tile r, group gi
  for (int i = threadIdx.x; i < groups * kR * 4; i += blockDim.x) {
    const int h = i & 1, q = (i >> 1) & 1, r = (i >> 2) % kR, gi = (i >> 2) / kR;
    const Act* src = (q ? p.zeros : p.scales) + (size_t)gi * p.N + (tile0 + r) * 16 + 8 * h;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    const Act* vals = reinterpret_cast<const Act*>(&v);
    Act* dst = reinterpret_cast<Act*>(szs + (gi * kR + r) * 8) + 2 * q + h;
#pragma unroll
    for (int gg = 0; gg < 8; ++gg) dst[4 * gg] = vals[gg];  // lane group gg's word
  }
}
#endif

// kNorm: where the RMSNorm comes from (a template parameter so that the kernels without one
// are the same code as before it existed); staged launches have shared memory for x * norm
// after the reduction's tiles and the sums of squares (see qc_mixed_gemm_decode). kTable: a
// table staged in the reduction's region of shared memory, the scales and zeros (groupzero:
// kSzSmem) or the 256 value pairs (lut: kPairs).
template <int kNT, int kR, int kNorm, bool kTable>
__global__ void __launch_bounds__(32 * kMaxWarps) mixed_gemm_decode_kernel(const Params p) {
  static_assert(!kTable || QC_MODE >= 2, "only group scales and zeros or lookup pairs are staged");
  constexpr bool kSzSmem = QC_MODE == 2 && kTable, kPairs = QC_MODE == 3 && kTable;
  constexpr int kUnroll = kRoundLoads > kR ? kRoundLoads / kR : 1;  // chunks a warp a round
  constexpr bool kRoll = kRolling && kNT == 2 && kR <= 2;
  extern __shared__ float red[];   // [warps][kR][kNT][4][32]
  __shared__ unsigned short lut[QC_MODE == 3 ? 16 : 1];  // lut: T[u ^ 8] at raw nibble u
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * kR;
  const int m0 = blockIdx.y * 8 * kNT;
  const int M = p.M, N = p.N, K = p.K;
  const int chunks = K / kChunkK;

  float acc[kR][kNT][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;

  // B fragments: lane (g, t) feeds token m0 + 8j + g (load_x says which k)
  const Act* xrow[kNT];
  bool xok[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int m = m0 + 8 * j + g;
    xok[j] = m < M;
    xrow[j] = p.x + (size_t)(xok[j] ? m : 0) * K;
  }

  // rowscale: the bias comes off the final sums, sum(x) accumulates over all chunks; groupzero:
  // each chunk's sums are scaled and the zero added in fp32, sum(x) per chunk
  constexpr bool kRowBias = QC_MODE == 0 && kBiasH != 0.f;
  float sx_all[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) sx_all[j][e] = 0.f;
  const uint32_t ones[4] = {kOnes2, kOnes2, kOnes2, kOnes2};

  // RMSNorm: shared memory past the reduction's tiles holds the warps' sums of squares
  // [warps][8 kNT] and then x * norm for the CTA's tokens [rows][K]
  // the staged scales and zeros, read in the main loop only, share the reduction's region
  int region0 = reduce_smem_bytes<kR, kNT, float>(warps) / 4;
#if QC_MODE == 2
  uint2* szs = reinterpret_cast<uint2*>(red);
  if (kSzSmem) region0 = max(region0, sz_smem_bytes(K, p.group_shift, kR) / 4);
#endif
  // lut pairs: the table in the reduction's region (read in the main loop only)
  const uint32_t* pairs = nullptr;
  if (kPairs) {
    region0 = max(region0, kLutPairWords);
    pairs = reinterpret_cast<const uint32_t*>(red);
  }
  float* ss_red = red + region0;  // past the reduction's tiles (or the staged scales)
  Act* xs = reinterpret_cast<Act*>(ss_red + warps * 8 * kNT);
  const int rows = kNorm == kNormStaged ? min(8 * kNT, M - m0) : 0;
  if (kNorm == kNormStaged) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int m = m0 + 8 * j + g;
      xrow[j] = xs + (size_t)(xok[j] ? m - m0 : 0) * K;
    }
  }

  // per row tile: this lane's weight bytes and its scale/zero column (rows g, g + 8)
  WeightWalk walk[kR];
  int sz_col[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    walk[r] = weight_walk(tile0 + r, lane, N, K);
    sz_col[r] = (tile0 + r) * 16 + g;
  }

  // a round: the loads of kUnroll chunks x kR row tiles, all issued before any is used
  uint32_t raw[kUnroll][kR][4][kWords];
#if QC_MODE == 2
  Act sz[kUnroll][kR][2][2];  // [.][.][scale, zero][rows g, g + 8]
#elif QC_MODE == 3
  float ls[kUnroll][kR][2];   // [.][.][rows g, g + 8] block scales
#endif
  // chunk c's weights of row tile r into slot u, then its scales (the rolling loop issues the
  // two apart)
  const auto load_weights = [&](int u, int r, int c) {
    load_chunk(raw[u][r], p.w + (walk[r].lane + c * walk[r].stride), walk[r].second);
  };
  const auto load_scales = [&](int u, int r, int c) {
#if QC_MODE == 2
    if (kSzSmem) return;
    // chunk c's group is c >> group_shift (a shift: a division here was ~25 instructions
    // a chunk-tile). (One 2-byte load a lane for the tile's 16 scales and 16 zeros, handed
    // out by shuffles, was faster at 28672x4096 but slower over a decode step's shapes.)
    // one 64-bit address per tensor, rows g + 8 at an immediate offset from rows g
    const uint32_t off = (c >> p.group_shift) * N + sz_col[r];
    const Act* sc = p.scales + off;
    const Act* zr = p.zeros + off;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sz[u][r][0][h] = sc[8 * h];
      sz[u][r][1][h] = zr[8 * h];
    }
#elif QC_MODE == 3
    const float* sc = p.lut_scales + ((c >> p.group_shift) * N + sz_col[r]);
    ls[u][r][0] = __ldg(sc);
    ls[u][r][1] = __ldg(sc + 8);
#endif
  };
  const auto load_round = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * warps;
      if (c >= chunks) continue;
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        load_weights(u, r, c);
        load_scales(u, r, c);
      }
    }
  };
  // the first round's weights are in flight while the CTA stages x * norm and the scales
  constexpr bool kStaging = kNorm == kNormStaged || kSzSmem || QC_MODE == 3;
  if (kStaging) {
    if (warp < chunks) load_round(warp);
#if QC_MODE == 3
    if (kPairs) {
      stage_pairs(reinterpret_cast<uint32_t*>(red), p.lut_table, lane, warp, warps);
    } else if (threadIdx.x < 16) {
      const Act v = Act(__ldg(p.lut_table + (threadIdx.x ^ 8)));
      lut[threadIdx.x] = *reinterpret_cast<const unsigned short*>(&v);
    }
#endif
    if (kNorm == kNormStaged) stage_norm(xs, ss_red, p.x + (size_t)m0 * K, p.norm, rows, K, 8 * kNT);
#if QC_MODE == 2
    if (kSzSmem) stage_scales_zeros<kR>(szs, p, tile0);
#endif
    __syncthreads();
  }

  if (kNorm == kNormGiven) {
    // the partial sums this warp adds up after the main loop: into L1 now (a prefetch does
    // not wait), so that the read there is not a trip to L2 at the end of every CTA
    for (int i = warp; i < min(8 * kNT, M - m0); i += warps)
      for (int q = lane * 32; q < p.ssq_parts; q += 32 * 32)
        asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p.norm_ssq + (size_t)(m0 + i) * p.ssq_parts + q));
  }

  // rolling: every round after the first is loaded by the round before it
  if (kRoll && !kStaging && warp < chunks) load_round(warp);
  for (int c0 = warp; c0 < chunks; c0 += kUnroll * warps) {
    if (!kRoll && (!kStaging || c0 != warp)) load_round(c0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * warps;
      if (c >= chunks) continue;
#if QC_MODE >= 2
      float part[kR][kNT][4], sx[kNT][4];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sx[j][e] = 0.f;
#pragma unroll
          for (int r = 0; r < kR; ++r) part[r][j][e] = 0.f;
        }
#else
      auto& part = acc;
      auto& sx = sx_all;
#endif
      uint32_t b[kNT][4][2];
#pragma unroll
      for (int j = 0; j < kNT; ++j) load_x<kNorm == kNormStaged>(b[j], xrow[j] + c * kChunkK, t, xok[j]);
      const int next = c + kUnroll * warps;  // the chunk this slot holds next round
      if constexpr (kRoll) {
        // a tile's slot is reloaded once its last step is converted, before that step's MMAs
        // (every accumulator sums its steps in the same order as below: the same results)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int j = 0; j < kNT; ++j)
            if (QC_MODE == 2 || kRowBias) mma16816(sx[j], ones, b[j][ks][0], b[j][ks][1]);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {
            uint32_t a[4];
            fragment<kPairs>(a, raw[u][r][ks], lut, pairs);
            if (ks == 3 && next < chunks) load_weights(u, r, next);
#pragma unroll
            for (int j = 0; j < kNT; ++j) mma16816(part[r][j], a, b[j][ks][0], b[j][ks][1]);
          }
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
          for (int j = 0; j < kNT; ++j)
            if (QC_MODE == 2 || kRowBias) mma16816(sx[j], ones, b[j][ks][0], b[j][ks][1]);
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            uint32_t a[4];
            fragment<kPairs>(a, raw[u][r][ks], lut, pairs);
#pragma unroll
            for (int j = 0; j < kNT; ++j) mma16816(part[r][j], a, b[j][ks][0], b[j][ks][1]);
          }
        }
      }
#if QC_MODE == 3
      // W = T[c] s over the chunk's one block: s sum(x T[c])
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[r][j][e] = fmaf(ls[u][r][e >> 1], part[r][j][e], acc[r][j][e]);
        if (kRoll && next < chunks) load_scales(u, r, next);
      }
#elif QC_MODE == 2
      // W = (h - kBiasH) s + z' over the chunk's one group: s sum(x h) + (z' - kBiasH s) sum(x)
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        float s[2], zz[2];
        if (kSzSmem) {
          const uint2 v = szs[((c >> p.group_shift) * kR + r) * 8 + g];
          const Act* w = reinterpret_cast<const Act*>(&v);  // scales g, g + 8, zeros g, g + 8
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[h] = static_cast<float>(w[h]);
            zz[h] = fmaf(-kBiasH, s[h], static_cast<float>(w[2 + h]));
          }
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // rows g, g + 8
            s[h] = static_cast<float>(sz[u][r][0][h]);
            zz[h] = fmaf(-kBiasH, s[h], static_cast<float>(sz[u][r][1][h]));
          }
        }
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[r][j][e] = fmaf(s[e >> 1], part[r][j][e], fmaf(zz[e >> 1], sx[j][e], acc[r][j][e]));
        if (kRoll && next < chunks) load_scales(u, r, next);
      }
#endif
    }
  }
  if (kRowBias) {
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][j][e] = fmaf(-kBiasH, sx_all[j][e], acc[r][j][e]);
  }

  // --- sum the warps' partial tiles in warp order, then scale, bias, store ---
  // every warp is done with the staged scales (or the pair table) the reduction overwrites
  if (kTable) __syncthreads();
  if (kNorm == kNormGiven) {
    // a warp a token: the op before's partial sums of squares, in a fixed order (the
    // reduction's barrier orders these writes before the reads in finish)
    const int tokens = min(8 * kNT, M - m0);
    for (int i = warp; i < tokens; i += warps) {
      const float* part = p.norm_ssq + (size_t)(m0 + i) * p.ssq_parts;
      float v = 0.f;
      for (int q = lane; q < p.ssq_parts; q += 32) v += part[q];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) ss_red[i] = v;
    }
  }
  const float inv_k = 1.f / static_cast<float>(K);
  const auto rms = [&](int m) {  // r_m for token m of this CTA
    float v = 0.f;
    if (kNorm == kNormGiven) {
      v = ss_red[m - m0];
    } else {
      for (int w = 0; w < warps; ++w) v += ss_red[w * 8 * kNT + (m - m0)];
    }
    return rsqrtf(fmaf(v, inv_k, p.eps));
  };
  const auto finish = [&](int n, int m, float v) {
    if (kNorm == kNormStaged || kNorm == kNormGiven) v *= rms(m);
#if QC_MODE == 0
    v *= p.rowscale[n];
#endif
    if (p.bias != nullptr) v += static_cast<float>(p.bias[n]);
    return v;
  };
  if constexpr (kR == 2) {
    if (p.gated) {
      // the gated-MLP epilogue: rows n0 (gate) and n0 + 16 (up) of this CTA's tile pair give
      // output column tile0 / 2 * 16 + (n0 % 16) of the N/2-wide result, silu(gate) * up in fp32
      reduce_and_store_pairs<kNT>(acc, red, tile0, m0, M, [&](int n0, int n1, int m, float g,
                                                             float u) {
        g = finish(n0, m, g);
        u = finish(n1, m, u);
        p.out[(size_t)m * (N / 2) + tile0 * 8 + (n0 - tile0 * 16)] = Act(g / (1.f + __expf(-g)) * u);
      });
      return;
    }
  }
  // next_norm: the result is the input of the next op's RMSNorm: also out * next_norm, and
  // each 16-row tile's sums of out^2 a token (from the rounded out, as the norm reads it),
  // through shared memory after the staged x (sq [kR * 16 rows][8 kNT tokens])
  constexpr bool norm_out = kNorm == kNormOut;
  float* sq = reinterpret_cast<float*>(
      xs + (kNorm == kNormStaged ? (size_t)min(8 * kNT, M) * K : 0));
  reduce_and_store<kR, kNT>(acc, red, tile0, m0, M, [&](int n, int m, float v) {
    v = finish(n, m, v);
    if (p.residual != nullptr) v += static_cast<float>(p.residual[(size_t)m * N + n]);
    const Act o = Act(v);
    p.out[(size_t)m * N + n] = o;
    if (norm_out) {
      const float of = static_cast<float>(o);
      p.normed[(size_t)m * N + n] = Act(of * static_cast<float>(p.next_norm[n]));
      sq[(n - tile0 * 16) * 8 * kNT + (m - m0)] = of * of;
    }
  });
  if (norm_out) {
    __syncthreads();
    for (int i = threadIdx.x; i < kR * 8 * kNT; i += blockDim.x) {
      const int r = i / (8 * kNT), tk = i % (8 * kNT);
      if (m0 + tk >= M) continue;
      float v = 0.f;
      for (int row = 0; row < 16; ++row) v += sq[(r * 16 + row) * 8 * kNT + tk];  // row order
      p.ssq_out[(size_t)(m0 + tk) * (N / 16) + tile0 + r] = v;
    }
  }
}

}  // namespace

// The compiled configuration, so Python can check it loaded what it asked for.
extern "C" int qc_mixed_gemm_decode_info(int* out, int n) {
  int v[4] = {QC_ACT_FP16, QC_WBITS, QC_LAYOUT, QC_MODE};
  for (int i = 0; i < n && i < 4; ++i) out[i] = v[i];
  return 4;
}

namespace {
// The fusions' argument checks, shared by both entry points (see qc_mixed_gemm_decode).
bool fusions_ok(int row_tiles, int gated, const void* norm, const void* residual,
                const void* norm_ssq, int ssq_parts, const void* next_norm, const void* normed,
                const void* ssq_out, float eps) {
  return !((gated && row_tiles != 2) ||  // a CTA must hold a gate tile and its up tile
           (gated && (residual != nullptr || next_norm != nullptr)) || !(eps >= 0.f) ||
           (norm != nullptr && norm_ssq != nullptr) || (norm_ssq != nullptr && ssq_parts <= 0) ||
           (next_norm != nullptr && (norm != nullptr || norm_ssq != nullptr)) ||
           (next_norm != nullptr && (normed == nullptr || ssq_out == nullptr)));
}

void set_fusions(Params& p, int gated, const void* norm, float eps, const void* residual,
                 const void* norm_ssq, int ssq_parts, const void* next_norm, void* normed,
                 void* ssq_out) {
  p.gated = gated;
  p.norm = static_cast<const Act*>(norm);
  p.eps = eps;
  p.residual = static_cast<const Act*>(residual);
  p.norm_ssq = static_cast<const float*>(norm_ssq);
  p.ssq_parts = ssq_parts;
  p.next_norm = static_cast<const Act*>(next_norm);
  p.normed = static_cast<Act*>(normed);
  p.ssq_out = static_cast<float*>(ssq_out);
}

int norm_mode(const Params& p) {
  return p.norm != nullptr        ? kNormStaged
         : p.norm_ssq != nullptr  ? kNormGiven
         : p.next_norm != nullptr ? kNormOut
                                  : kNormNone;
}

template <int kNT, int kR, bool kTable>
auto decode_kernel(int mode) {
  return mode == kNormStaged  ? mixed_gemm_decode_kernel<kNT, kR, kNormStaged, kTable>
         : mode == kNormGiven ? mixed_gemm_decode_kernel<kNT, kR, kNormGiven, kTable>
         : mode == kNormOut   ? mixed_gemm_decode_kernel<kNT, kR, kNormOut, kTable>
                              : mixed_gemm_decode_kernel<kNT, kR, kNormNone, kTable>;
}

// Shared memory past the reduction's region (or what takes its place: staged scales and
// zeros, the pair table): the sums of squares (a norm), x * norm of the CTA's tokens
// (staged), the squares of a tile's results (next_norm, after the sums' region, so it keeps
// that region too); launch_decode refuses more than 48 KB in all.
template <int kNT, int kR>
int fusion_smem_bytes(int mode, int M, int K, int warps) {
  const int tile_rows = 8 * kNT < M ? 8 * kNT : M;
  const int sums = mode != kNormNone ? warps * 8 * kNT * static_cast<int>(sizeof(float)) : 0;
  const int staged = mode == kNormStaged ? tile_rows * K * static_cast<int>(sizeof(Act)) : 0;
  const int squares = mode == kNormOut ? kR * 16 * 8 * kNT * static_cast<int>(sizeof(float)) : 0;
  return sums + staged + squares;
}
}  // namespace

#if QC_MODE == 3
namespace {
// The prefill path's dequantization: W [N, K] in the activation type from the prepared codes,
// for a cuBLAS GEMM. A CTA (128 threads) takes one 16-row tile and kDequantChunks chunks of 64
// k: thread i converts lane i % 32's word of K step i / 32 (8 values) into a shared tile,
// then each thread stores 16 bytes of it (16 rows x 128 bytes a chunk, whole lines).
// kInAct: round T[c] and s to the activation type and their product again (a graph that
// dequantized in that type), else the float32 product rounded once.
constexpr int kDequantChunks = 4;

template <bool kInAct>
__global__ void __launch_bounds__(128) lut_dequant_kernel(const uint8_t* w, const float* scales,
                                                          const float* table, Act* out, int N,
                                                          int K, int group_shift) {
  __shared__ float tab[16];
  __shared__ __align__(16) Act tile[16][kChunkK + 8];  // rows padded by 16 bytes
  const int tid = threadIdx.x, nt = blockIdx.x;
  if (tid < 16) tab[tid] = table[tid ^ 8];  // raw nibble u holds code u ^ 8
  __syncthreads();
  const int chunks = K / kChunkK, lane = tid & 31, step = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t tiles_n = N / 16;
  const int c_end = min(chunks, (static_cast<int>(blockIdx.y) + 1) * kDequantChunks);
  for (int c = blockIdx.y * kDequantChunks; c < c_end; ++c) {
    const int j = 4 * c + step;  // the layout's K step
    const uint32_t word =
        __ldg(reinterpret_cast<const uint32_t*>(w + (size_t)(nt + tiles_n * j) * 128) + lane);
    const float* sc = scales + (size_t)(c >> group_shift) * N + nt * 16 + g;
    const float s2[2] = {__ldg(sc), __ldg(sc + 8)};
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // nibble q: row g + 8 m1, k 2t + k0 + 8 k2 of the step
      const int m1 = (q >> 1) & 1, k2 = q >> 2, k0 = q & 1;  // (pair bytes: register q / 2)
      const float tv = tab[(word >> (4 * q)) & 0xfu];
      const float v = kInAct ? static_cast<float>(Act(tv)) * static_cast<float>(Act(s2[m1]))
                             : tv * s2[m1];
      tile[g + 8 * m1][16 * step + 2 * t + k0 + 8 * k2] = Act(v);
    }
    __syncthreads();
    const int row = tid >> 3, piece = tid & 7;
    *reinterpret_cast<uint4*>(out + (size_t)(nt * 16 + row) * K + c * kChunkK + piece * 8) =
        *reinterpret_cast<const uint4*>(&tile[row][piece * 8]);
    __syncthreads();
  }
}
}  // namespace

extern "C" {

// Lookup-table decode: out [M, N] = x [M, K] W^T (+ bias [N]) with W[n, k] = table[c] *
// scales[k / group, n]; w the codes c - 8 in the sm90_lut_pairs layout, scales float32 [K/group, N],
// table float32 [16]. K % 64 == 0, group 64 x 2^i dividing K, N % (16 * row_tiles) == 0.
// lut_pairs: look value pairs up in the 256-pair table (see the header); where its 32 KB and
// what a fusion stages exceed 48 KB, the 16-value table instead. gated, norm, eps, residual,
// norm_ssq, ssq_parts, next_norm, normed, ssq_out: the fusions, as qc_mixed_gemm_decode
// takes them.
int qc_lut_gemm_decode(const void* x, const void* w, const void* scales, const void* table,
                       const void* bias, void* out, const void* norm, const void* residual,
                       const void* norm_ssq, const void* next_norm, void* normed,
                       void* ssq_out, int M, int N, int K, int group, int token_tiles,
                       int row_tiles, int warps, int lut_pairs, int gated, int ssq_parts,
                       float eps, void* stream) {
  const int shift = chunk_group_shift(group, K);
  if (!launch_shape_ok(M, N, K, kChunkK, warps, kMaxWarps, row_tiles) ||
      (uint64_t)N * K >= (1ull << 32) || shift < 0 || scales == nullptr || table == nullptr ||
      !fusions_ok(row_tiles, gated, norm, residual, norm_ssq, ssq_parts, next_norm, normed,
                  ssq_out, eps))
    return static_cast<int>(cudaErrorInvalidValue);
  Params p = {};
  p.x = static_cast<const Act*>(x);
  p.w = static_cast<const uint8_t*>(w);
  p.lut_scales = static_cast<const float*>(scales);
  p.lut_table = static_cast<const float*>(table);
  p.bias = static_cast<const Act*>(bias);
  p.out = static_cast<Act*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group_shift = shift;
  set_fusions(p, gated, norm, eps, residual, norm_ssq, ssq_parts, next_norm, normed, ssq_out);
  auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(dispatch_tiles(token_tiles, row_tiles, [&](auto nt, auto r) {
    constexpr int kNT = decltype(nt)::value, kR = decltype(r)::value;
    const int mode = norm_mode(p);
    const int extra = fusion_smem_bytes<kNT, kR>(mode, M, K, warps);
    const int reduce = reduce_smem_bytes<kR, kNT, float>(warps);
    const bool pairs = lut_pairs != 0 && max(reduce, kLutPairWords * 4) + extra <= 48 * 1024;
    const auto kernel = pairs ? decode_kernel<kNT, kR, true>(mode) : decode_kernel<kNT, kR, false>(mode);
    static int cached[4][2][kMaxWarps + 1] = {};  // a benign race, every writer writes the same
    const int region = max(reduce, pairs ? kLutPairWords * 4 : 0);
    const int smem =
        capped_smem<kMaxWarps>(kernel, warps, region + extra, 32, cached[mode][pairs]);
    return launch_decode<kNT, kR>(kernel, p, warps, smem, s);
  }));
}

// The prefill path's weight: out [N, K] (activation type) = table[c] * scales, operands as
// qc_lut_gemm_decode's; in_act: the product in the activation type (see lut_dequant_kernel).
int qc_lut_dequantize(const void* w, const void* scales, const void* table, void* out, int N,
                      int K, int group, int in_act, void* stream) {
  const int shift = chunk_group_shift(group, K);
  if (N <= 0 || K <= 0 || N % 16 || K % kChunkK || shift < 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const int chunks = K / kChunkK;
  dim3 grid(N / 16, (chunks + kDequantChunks - 1) / kDequantChunks);
  if (grid.y > 65535) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  const auto* wp = static_cast<const uint8_t*>(w);
  const auto* sp = static_cast<const float*>(scales);
  const auto* tp = static_cast<const float*>(table);
  auto* op = static_cast<Act*>(out);
  if (in_act)
    lut_dequant_kernel<true><<<grid, 128, 0, s>>>(wp, sp, tp, op, N, K, shift);
  else
    lut_dequant_kernel<false><<<grid, 128, 0, s>>>(wp, sp, tp, op, N, K, shift);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
#else  // QC_MODE != 3

// f(integral_constant<bool, staged>): the staged kernels exist in groupzero builds only.
template <typename F>
cudaError_t launch_sz(bool staged, F&& f) {
#if QC_MODE == 2
  if (staged) return f(std::integral_constant<bool, true>{});
#endif
  (void)staged;
  return f(std::integral_constant<bool, false>{});
}

extern "C" {

// x [M, K]; w the prepared weight (layout QC_LAYOUT); groupzero: scales / zeros [K/group, N]
// (activation type), rowscale: rowscale [N] float32; bias [N] or null; out [M, N], or with
// gated (row_tiles 2: even 16-row tiles the gate, odd ones the up rows) [M, N/2]. All
// 16-byte aligned. K % 64 == 0, N % (16 * row_tiles) == 0, group 64 x 2^i dividing K
// (groupzero). token_tiles in {1, 2, 4} (8 tokens each), row_tiles in {1, 2} (or 4 with
// token_tiles <= 2), warps 1..16.
// norm ([K], activation type) or null: x is an RMSNorm's input, eps its epsilon; or norm_ssq
// ([M, ssq_parts] float32) or null: x is already the norm's input times its weight and
// norm_ssq the partial sums of squares of that input (summed in order). residual ([M, N] like
// out, not with gated) or null: added to the result. next_norm ([N]) or null, not with
// gated, norm or norm_ssq: also normed [M, N] = out * next_norm and ssq_out [M, N / 16]
// float32, the sums of out^2 over each 16 rows (the next op's norm_ssq). sz_smem (groupzero):
// stage the CTA's scales and zeros in shared memory first.
int qc_mixed_gemm_decode(const void* x, const void* w, const void* scales, const void* zeros,
                         const void* rowscale, const void* bias, void* out, const void* norm,
                         const void* residual, const void* norm_ssq, const void* next_norm,
                         void* normed, void* ssq_out, int M, int N, int K, int group,
                         int token_tiles, int row_tiles, int warps, int gated, int ssq_parts,
                         int sz_smem, float eps, void* stream) {
  if (!launch_shape_ok(M, N, K, kChunkK, warps, kMaxWarps, row_tiles) ||
      (uint64_t)N * K >= (1ull << 32) ||  // byte offsets in 32 bits (WeightWalk)
      !fusions_ok(row_tiles, gated, norm, residual, norm_ssq, ssq_parts, next_norm, normed,
                  ssq_out, eps) ||
      (sz_smem && QC_MODE != 2))
    return static_cast<int>(cudaErrorInvalidValue);
#if QC_MODE == 2
  const int shift = chunk_group_shift(group, K);
  if (shift < 0 || scales == nullptr || zeros == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
#else
  if (rowscale == nullptr) return static_cast<int>(cudaErrorInvalidValue);
#endif
  Params p;
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
  set_fusions(p, gated, norm, eps, residual, norm_ssq, ssq_parts, next_norm, normed, ssq_out);
#if QC_MODE == 2
  p.group_shift = shift;
#else
  p.group_shift = 0;
#endif
  auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(dispatch_tiles(token_tiles, row_tiles, [&](auto nt, auto r) {
    constexpr int kNT = decltype(nt)::value, kR = decltype(r)::value;
    const int mode = norm_mode(p);
    return launch_sz(sz_smem != 0, [&](auto staged) {
      constexpr bool kSz = decltype(staged)::value;
      const auto kernel = decode_kernel<kNT, kR, kSz>(mode);
      // one cache per kernel: a benign race, every writer writes the same
      static int cached[4][kMaxWarps + 1] = {};
      int region0_bytes = reduce_smem_bytes<kR, kNT, float>(warps);
#if QC_MODE == 2
      if (kSz) region0_bytes = max(region0_bytes, sz_smem_bytes(K, p.group_shift, kR));
#endif
      // At most 32 resident warps an SM: int8 per-channel weights need few registers, and 5
      // CTAs of 8 warps an SM streamed 28672x4096 slower than 4 (decode-step sequence, H100:
      // 48.8 vs 45.0 us)
      const int smem = capped_smem<kMaxWarps>(
          kernel, warps, region0_bytes + fusion_smem_bytes<kNT, kR>(mode, M, K, warps), 32,
          cached[mode]);
      return launch_decode<kNT, kR>(kernel, p, warps, smem, s);
    });
  }));
}

}  // extern "C"
#endif  // QC_MODE
