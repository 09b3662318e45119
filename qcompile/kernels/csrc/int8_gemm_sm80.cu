// int8 x int8 -> int32 GEMM for Ampere-class code (sm_80, also runs on Hopper), CUTLASS 2.x,
// with the same fused rescale epilogue as int8_gemm_sm90.cu:
//
//   out[m, n] = (float(acc[m, n] - azp[m] * azp_adj[n]) * row_scale[m] * col_scale[n] + bias[n])
//
// xq [M, K] int8 row-major, wq [N, K] int8 row-major, out [M, N] row-major. row_scale is a
// float32 vector [M] or a scalar (run-time flag); col_scale must be a float32 vector [N] (the
// caller expands a scalar: the 2.x row-broadcast visitor loads it with vector loads); bias is
// a vector [N] of the output dtype or null. azp (int32 [M] or a scalar, same flag as
// row_scale) and azp_adj (int32 [N]) correct asymmetric activations exactly in int32; null
// reads as 0 (no correction). Stream-K threadblock swizzle, so small-M problems
// with few output tiles still spread over all SMs.
//
// Configuration by -D defines only: QC_TILE_M/N/K, QC_WARP_M/N/K, QC_STAGES, QC_OUT_BF16.
// Exports (C ABI, no torch): qc_int8_gemm_sm80, qc_int8_gemm_sm80_workspace_size.

#include <cuda_runtime.h>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"

#ifndef QC_TILE_M
#define QC_TILE_M 128
#endif
#ifndef QC_TILE_N
#define QC_TILE_N 128
#endif
#ifndef QC_TILE_K
#define QC_TILE_K 64
#endif
#ifndef QC_WARP_M
#define QC_WARP_M 64
#endif
#ifndef QC_WARP_N
#define QC_WARP_N 64
#endif
#ifndef QC_WARP_K
#define QC_WARP_K 64
#endif
#ifndef QC_STAGES
#define QC_STAGES 4
#endif
#ifndef QC_OUT_BF16
#define QC_OUT_BF16 1
#endif

using namespace cute;

namespace {

using ElementAB = int8_t;
using ElementAcc = int32_t;
using ElementCompute = float;
#if QC_OUT_BF16
using ElementOut = cutlass::bfloat16_t;
#else
using ElementOut = cutlass::half_t;
#endif

using TileShape = cutlass::gemm::GemmShape<QC_TILE_M, QC_TILE_N, QC_TILE_K>;
using WarpShape = cutlass::gemm::GemmShape<QC_WARP_M, QC_WARP_N, QC_WARP_K>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;  // int8 mma.sync
constexpr int kAlignAB = 16;
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
constexpr int kEpilogueStages = 1;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

namespace tb = cutlass::epilogue::threadblock;

using ThreadMap = tb::OutputTileThreadLayout<TileShape, WarpShape, ElementOut, kAlignOut, kEpilogueStages>;

// Per-row (token) scale: an int stride of 1 walks the vector, 0 repeats element 0.
using RowScale = tb::VisitorColBroadcast<ThreadMap, float, Stride<int, _0, _0>>;
using ColScale = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, _0>>;
using Bias = tb::VisitorRowBroadcast<ThreadMap, ElementOut, Stride<_0, _1, _0>>;  // null -> 0
using Azp = tb::VisitorColBroadcast<ThreadMap, ElementAcc, Stride<int, _0, _0>>;     // null -> 0
using AzpAdj = tb::VisitorRowBroadcast<ThreadMap, ElementAcc, Stride<_0, _1, _0>>;  // null -> 0

// acc - azp * azp_adj in int32 (exact), then the float rescale
using AzpTerm = tb::Sm80EVT<tb::VisitorCompute<cutlass::multiplies, ElementAcc, ElementAcc, kRound>,
                           Azp, AzpAdj>;
using CorrectedAcc = tb::Sm80EVT<tb::VisitorCompute<cutlass::minus, ElementAcc, ElementAcc, kRound>,
                                tb::VisitorAccFetch, AzpTerm>;
using ScaledAcc = tb::Sm80EVT<tb::VisitorCompute<cutlass::multiplies, ElementCompute, ElementCompute, kRound>,
                             CorrectedAcc, ColScale>;
using Result = tb::Sm80EVT<
    tb::VisitorCompute<cutlass::homogeneous_multiply_add, ElementOut, ElementCompute, kRound>,
    RowScale, ScaledAcc, Bias>;
using Store = tb::VisitorAuxStore<ThreadMap, ElementOut, kRound, Stride<int64_t, _1, _0>>;
using EVT = tb::Sm80EVT<Store, Result>;

using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
    ElementAB, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,
    ElementAB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,
    ElementOut, cutlass::layout::RowMajor, kAlignOut, ElementAcc, ElementCompute,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstructionShape, EVT,
    cutlass::gemm::threadblock::ThreadblockSwizzleStreamK, QC_STAGES,
    cutlass::arch::OpMultiplyAddSaturate, kEpilogueStages>::GemmKernel;

using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

int sm_count_for_current_device() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return -1;
  if (cached[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = n > 0 ? n : -1;
  }
  return cached[dev];
}

typename Gemm::Arguments make_arguments(void* out, const void* xq, const void* wq, const float* row_scale,
                                        const float* col_scale, const void* bias, const int32_t* azp,
                                        const int32_t* azp_adj, int M, int N, int K,
                                        int row_scale_is_vector) {
  cutlass::gemm::GemmCoord problem(M, N, K);
  typename EVT::Arguments evt_args{
      {                                                             // Result
          {row_scale, 0.f, {row_scale_is_vector ? 1 : 0, _0{}, _0{}}},  // RowScale
          {                                                         // ScaledAcc
              {                                                     //   CorrectedAcc
                  {},                                               //     AccFetch
                  {                                                 //     AzpTerm
                      {azp, 0, {row_scale_is_vector ? 1 : 0, _0{}, _0{}}},  // Azp
                      {azp_adj, 0, {}},                             //       AzpAdj
                      {}},                                          //       multiplies
                  {}},                                              //     minus
              {col_scale, 0.f, {}},                                 //   ColScale
              {}},                                                  //   multiplies
          {static_cast<const ElementOut*>(bias), ElementOut(0.f), {}},  // Bias
          {}},                                                      // multiply_add
      {static_cast<ElementOut*>(out), {int64_t(N), _1{}, _0{}}}};  // Store
  return typename Gemm::Arguments(
      cutlass::gemm::GemmUniversalMode::kGemm, problem, 1, evt_args, xq, wq, nullptr, nullptr,
      int64_t(M) * K, int64_t(N) * K, 0, 0, K, K, 0, 0, sm_count_for_current_device());
}

}  // namespace

extern "C" {

size_t qc_int8_gemm_sm80_workspace_size(int M, int N, int K) {
  auto args = make_arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N,
                             K, 1);
  return Gemm::get_workspace_size(args);
}

int qc_int8_gemm_sm80(void* out, const void* xq, const void* wq, const float* row_scale,
                      const float* col_scale, const void* bias, const int32_t* azp,
                      const int32_t* azp_adj, int M, int N, int K, int row_scale_is_vector,
                      void* workspace, size_t workspace_size, void* stream) {
  if ((azp == nullptr) != (azp_adj == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  auto args = make_arguments(out, xq, wq, row_scale, col_scale, bias, azp, azp_adj, M, N, K,
                             row_scale_is_vector);
  if (Gemm::get_workspace_size(args) > workspace_size) return static_cast<int>(cudaErrorInvalidValue);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorInvalidValue);
  auto cs = static_cast<cudaStream_t>(stream);
  cutlass::Status s = gemm.initialize(args, workspace, cs);
  if (s == cutlass::Status::kSuccess) s = gemm.run(cs);
  cudaError_t e = cudaGetLastError();
  if (s != cutlass::Status::kSuccess) return e != cudaSuccess ? static_cast<int>(e) : -1;
  return static_cast<int>(e);
}

const char* qc_int8_gemm_sm80_config() {
#define QC_STR2(x) #x
#define QC_STR(x) QC_STR2(x)
  return "tile=" QC_STR(QC_TILE_M) "x" QC_STR(QC_TILE_N) "x" QC_STR(QC_TILE_K)
         " warp=" QC_STR(QC_WARP_M) "x" QC_STR(QC_WARP_N) "x" QC_STR(QC_WARP_K)
         " stages=" QC_STR(QC_STAGES) " bf16=" QC_STR(QC_OUT_BF16);
}

}  // extern "C"
