// The weight fragments of the prepared layouts for mma.sync kernels that read the weight
// straight from global memory into registers (mixed_gemm_decode.cu, mixed_gemm_batch.cu):
// where a lane's bytes of a 16-row x 64-deep chunk-tile are, how they load, the activation
// (B) fragments that match them, and the conversion of the raw words to 16-bit A fragments.
//
// Configured by the includer's -D defines: QC_ACT_FP16, QC_WBITS, QC_LAYOUT (0 sm90, 1 sm80
// v2); the layouts themselves are described in mixed_gemm_decode.cu's header. Included inside
// the includer's anonymous namespace, after decode_common.cuh and sm80_mixed.cuh and a
// `using namespace` of both.
#pragma once

constexpr int kBits = QC_WBITS;
constexpr int kWords = kBits / 4;        // 32-bit weight words per lane per 16-deep K step
constexpr int kChunkK = 64;              // K per chunk (4 MMA steps)

static_assert(kBits == 4 || kBits == 8, "QC_WBITS must be 4 or 8");
static_assert(QC_LAYOUT == 0 || QC_LAYOUT == 1, "QC_LAYOUT must be 0 (sm90) or 1 (sm80 v2)");

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

// The weights as exact integers in the activation type, h = q' + kBiasH, without the
// subtract that would make them q': the MMA sums x * h and the bias comes off once per chunk
// (kBiasH * sum(x), the sum from an MMA with an all-ones A) instead of once per weight pair.
// int4: 0x4300 | u is 128 + u in bf16, 0x6400 | u is 1024 + u in fp16 (u = q' + 8); int8:
// 1024 + u in fp16 (u = q' + 128), and q' itself in bf16 (whose 8-bit significand cannot hold
// a biased byte, so the float conversion of unpack_pair, exact, is used as is).
#if QC_WBITS == 4
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

// h of the A fragment {a0, a1, a2, a3} from one K step's raw words.
__device__ __forceinline__ void fragment(uint32_t (&a)[4], const uint32_t (&r)[kWords]) {
#if QC_LAYOUT == 0 && QC_WBITS == 4
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
