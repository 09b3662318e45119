// sm_80 building blocks shared by the group-wise mixed GEMM (mixed_gemm_gz_sm80.cu) and the
// decode kernel (mixed_gemm_decode.cu): the 16-bit activation type, the m16n8k16 MMA, and the
// bias-trick conversion of packed int4 / int8 weights to 16-bit pairs (no cvt per element).
//
// Configured by the includer's -D defines: QC_ACT_FP16 (0 bf16, 1 fp16), QC_WBITS (4 | 8).
// Inputs of unpack_pair are *biased* (u = q' + 2**(bits-1), unsigned); a two's-complement
// word becomes biased with one xor of every sign bit (0x88888888 / 0x80808080).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace qc_sm80 {

#if QC_ACT_FP16
using Act = __half;
using Act2 = __half2;
#else
using Act = __nv_bfloat16;
using Act2 = __nv_bfloat162;
#endif

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if QC_ACT_FP16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#if QC_WBITS == 8
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
#else
// (a & b) | c in one instruction
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
#endif

__device__ __forceinline__ uint32_t as_u32(Act2 v) { return *reinterpret_cast<uint32_t*>(&v); }
__device__ __forceinline__ Act2 as_act2(uint32_t v) { return *reinterpret_cast<Act2*>(&v); }

// The signed values q' of one B-fragment register (two k of one n) from the packed word.
// int4: pair i (0..3) = nibbles (i, i + 4); int8: pair i (0..1) = bytes (i, i + 2).
template <int I>
__device__ __forceinline__ Act2 unpack_pair(uint32_t w) {
#if QC_WBITS == 4
#if QC_ACT_FP16
  uint32_t h = and_or(w >> (4 * I), 0x000f000fu, 0x64006400u);  // 1024 + u
  return __hsub2(as_act2(h), as_act2(0x64086408u));               // - 1032 = q'
#else
  uint32_t h = and_or(w >> (4 * I), 0x000f000fu, 0x43004300u);  // 128 + u
  return __hfma2(as_act2(h), as_act2(0x3f803f80u), as_act2(0xc308c308u));  // * 1 - 136 = q'
#endif
#else
#if QC_ACT_FP16
  uint32_t h = prmt(w, 0x64646464u, I == 0 ? 0x5250u : 0x5351u);  // 1024 + u
  return __hsub2(as_act2(h), as_act2(0x64806480u));                 // - 1152 = q'
#else
  constexpr float kMagic = 8388608.f + 128.f;  // 2**23 + 128
  float lo = __uint_as_float(prmt(w, 0x4b000000u, I == 0 ? 0x7540u : 0x7541u)) - kMagic;
  float hi = __uint_as_float(prmt(w, 0x4b000000u, I == 0 ? 0x7542u : 0x7543u)) - kMagic;
  return __floats2bfloat162_rn(lo, hi);  // exact: |q'| <= 128
#endif
#endif
}

}  // namespace qc_sm80
