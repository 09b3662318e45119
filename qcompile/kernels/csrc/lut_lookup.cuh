// The lookup-table GEMM's register conversion (lut_gemm_sm90.cu): 8 stored 4-bit codes -> their
// 8 16-bit table values, by byte permutes. The table's values are held as four words of low
// bytes and four of high bytes; for 4 codes a time two prmt select each byte among entries
// 0-7 and 8-15 by a code's low three bits, a third picks between them by its fourth bit, and
// two more interleave low and high bytes into the two 16-bit pairs the MMA reads.
//
// Or (lookup8_pairs) from a table of all 256 value pairs in shared memory: a byte of two codes
// is one 32-bit load, its address one prmt (the byte, zero-extended) and one lea; the table
// holds 32 copies, word 32 b + l of copy l, so that lane l always reads bank l (no conflict).
// The decode kernel's lookup-table build (mixed_gemm_decode.cu) looks up through it too.
//
// Compiles for the host too, with prmt emulated and the shared load a callable, so that a
// CPU test checks the selector and address arithmetic against plain table indexing
// (tests/test_lookup_table.py).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QC_LUT_FN __host__ __device__ __forceinline__
#define QC_LUT_HD __host__ __device__
#else
#define QC_LUT_FN inline
#define QC_LUT_HD
#endif

namespace qc_lut {

// prmt.b32 d, a, b, sel in its default mode: byte j of d is byte (low 3 bits of nibble j of
// sel) of the 8 bytes b:a (a the low four), or, where the nibble's bit 3 is set, that byte's
// sign bit replicated (a mode the lookup must never use; the host version emulates it too).
QC_LUT_FN uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  uint64_t pool = (uint64_t(b) << 32) | a;
  uint32_t d = 0;
  for (int j = 0; j < 4; ++j) {
    uint32_t s = (sel >> (4 * j)) & 0xF;
    uint32_t byte = uint32_t(pool >> (8 * (s & 7))) & 0xFF;
    if (s & 8) byte = (byte & 0x80) ? 0xFF : 0;
    d |= byte << (8 * j);
  }
  return d;
#endif
}

// lookup8 through the pair table (Lookup::pair(b) at word 32 b + l of copy l): r[i] =
// load(lane_base + 128 * byte i of q), lane_base the table's byte address plus 4 * lane (copy
// `lane`, bank `lane`). The table's values do not enter: the decode kernel (a table given at
// run time) and the GEMM (one fixed at compile time) both look up through it, each with its
// own shared load (the decode kernel's must stay after the barrier that ends the staging).
template <class Load>
QC_LUT_FN void lookup8_pairs(uint32_t q, uint32_t lane_base, Load const& load, uint32_t (&r)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = load(lane_base + (prmt(q, 0, 0x4440u | i) << 7));
}

// A table of 16 values' 16-bit patterns, four to a word: entry c at bits 16 * (c % 4) of
// word c / 4. Stored codes are c ^ 8 (the codes as signed int4 c - 8, the layout the decode
// kernel reads too).
template <uint64_t T0, uint64_t T1, uint64_t T2, uint64_t T3>
struct Lookup {
  QC_LUT_HD static constexpr uint32_t entry(int c) {
    return uint32_t((c < 4 ? T0 : c < 8 ? T1 : c < 12 ? T2 : T3) >> (16 * (c % 4))) & 0xFFFF;
  }

  // Byte `byte` (0 low, 1 high) of the 4 entries the stored nibbles 4j .. 4j+3 select, one per
  // byte of a prmt operand: stored nibble v selects entry v ^ 8.
  QC_LUT_HD static constexpr uint32_t bytes(int j, int byte) {
    uint32_t w = 0;
    for (int e = 0; e < 4; ++e) w |= ((entry((4 * j + e) ^ 8) >> (8 * byte)) & 0xFF) << (8 * e);
    return w;
  }

  // The pair table's word for a byte b of two stored nibbles: the low nibble's value in the
  // low half, as lookup8 packs values 2i and 2i + 1 into r[i].
  QC_LUT_HD static constexpr uint32_t pair(uint32_t b) {
    return entry(int(b & 15) ^ 8) | (entry(int(b >> 4) ^ 8) << 16);
  }

  // 8 stored nibbles (value j in nibble j) -> 8 table values, value 2i in the low half of r[i].
  QC_LUT_FN static void lookup8(uint32_t q, uint32_t (&r)[4]) {
    // idx: the low 3 bits of each nibble pick a byte among 8 (bit 3 cleared); sel picks, per
    // output byte j, byte j of the first (nibble bit 3 clear) or of the second lookup (set):
    // nibble j of sel = j + 4 * bit3. prmt reads only a selector's low 16 bits (4 nibbles).
    uint32_t idx = q & 0x77777777u;
    uint32_t sel = ((q & 0x88888888u) | 0x64206420u) >> 1;
#pragma unroll
    for (int h = 0; h < 2; ++h, idx >>= 16, sel >>= 16) {
      uint32_t lo = prmt(prmt(bytes(0, 0), bytes(1, 0), idx), prmt(bytes(2, 0), bytes(3, 0), idx), sel);
      uint32_t hi = prmt(prmt(bytes(0, 1), bytes(1, 1), idx), prmt(bytes(2, 1), bytes(3, 1), idx), sel);
      r[2 * h] = prmt(lo, hi, 0x5140);      // values 4h, 4h+1: lo0 hi0 lo1 hi1
      r[2 * h + 1] = prmt(lo, hi, 0x7362);  // values 4h+2, 4h+3
    }
  }
};

}  // namespace qc_lut
