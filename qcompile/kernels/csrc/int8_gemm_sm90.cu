// int8 x int8 -> int32 GEMM for Hopper (sm_90a), CUTLASS 3.x, with a fused rescale epilogue:
//
//   out[m, n] = (float(acc[m, n] - azp[m] * azp_adj[n]) * row_scale[m] * col_scale[n] + bias[n])
//
// xq [M, K] int8 row-major, wq [N, K] int8 row-major (both K-major), out [M, N] row-major.
// row_scale is a float32 vector [M] or a scalar, col_scale a float32 vector [N] or a scalar
// (chosen at run time), bias a vector [N] of the output dtype or null. azp (int32 [M] or a
// scalar, as row_scale) and azp_adj (int32 [N]) correct asymmetric activations exactly in
// int32 before the rescale; null reads as 0 (no correction).
//
// One configuration per compiled library, chosen by -D defines only:
//   QC_TILE_M, QC_TILE_N, QC_TILE_K   CTA tile of the GEMM the kernel runs (after any swap)
//   QC_CLUSTER_M, QC_CLUSTER_N        thread-block cluster
//   QC_PINGPONG                       1: ping-pong schedule, 0: cooperative
//   QC_STREAMK                        1: stream-K / split-K tile scheduler (cooperative only)
//   QC_SWAP_AB                        1: compute out^T = wq @ xq^T, so the token dimension M
//                                     becomes the GEMM's N and can use a narrow tile (decode)
//   QC_OUT_BF16                       1: bf16 output, 0: fp16
//
// Exports (C ABI, no torch): qc_int8_gemm_sm90, qc_int8_gemm_sm90_workspace_size.
// Return value: 0 on success, else a cudaError_t (or -1 for a CUTLASS status that has none).

#include <cuda_runtime.h>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#ifndef QC_TILE_M
#define QC_TILE_M 128
#endif
#ifndef QC_TILE_N
#define QC_TILE_N 128
#endif
#ifndef QC_TILE_K
#define QC_TILE_K 128
#endif
#ifndef QC_CLUSTER_M
#define QC_CLUSTER_M 1
#endif
#ifndef QC_CLUSTER_N
#define QC_CLUSTER_N 1
#endif
#ifndef QC_PINGPONG
#define QC_PINGPONG 0
#endif
#ifndef QC_STREAMK
#define QC_STREAMK 0
#endif
#ifndef QC_SWAP_AB
#define QC_SWAP_AB 0
#endif
#ifndef QC_OUT_BF16
#define QC_OUT_BF16 1
#endif

#if QC_PINGPONG && QC_STREAMK
#error "CUTLASS's ping-pong kernel has no stream-K scheduler"
#endif

using namespace cute;

namespace {

using ElementAB = int8_t;
using ElementAcc = int32_t;
using ElementCompute = float;
using ElementScale = float;
#if QC_OUT_BF16
using ElementOut = cutlass::bfloat16_t;
#else
using ElementOut = cutlass::half_t;
#endif

using TileShape = Shape<Int<QC_TILE_M>, Int<QC_TILE_N>, Int<QC_TILE_K>>;
using ClusterShape = Shape<Int<QC_CLUSTER_M>, Int<QC_CLUSTER_N>, _1>;

#if QC_PINGPONG
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#else
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#endif

#if QC_STREAMK
using TileScheduler = cutlass::gemm::StreamKScheduler;
#else
using TileScheduler = cutlass::gemm::PersistentScheduler;
#endif

// Both operands are K-major: A is the GEMM's [M', K] row-major, B its [N', K] which CUTLASS
// calls a column-major K x N'. Swapping A and B keeps both K-major.
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
constexpr int kAlignAB = 16;  // 16 bytes for TMA
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;

namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// Per-GEMM-row and per-GEMM-column float vectors. The bool stride (1: vector, 0: scalar
// broadcast of element 0) is decided at run time, so one library serves per-token and
// per-tensor activation scales and per-channel and per-tensor weight scales.
using ScaleGemmRow = fusion::Sm90ColBroadcast<0, TileShape, ElementScale, ElementCompute,
                                              Stride<bool, _0, _0>>;
using ScaleGemmCol = fusion::Sm90RowBroadcast<0, TileShape, ElementScale, ElementCompute,
                                              Stride<_0, bool, _0>>;

#if QC_SWAP_AB
// GEMM rows are the weight's N, GEMM columns the tokens: out^T is column-major [N, M].
using LayoutOut = cutlass::layout::ColumnMajor;
using Bias = fusion::Sm90ColBroadcast<0, TileShape, ElementOut, ElementCompute, Stride<_1, _0, _0>>;
using Azp = fusion::Sm90RowBroadcast<0, TileShape, ElementAcc, ElementAcc, Stride<_0, bool, _0>>;
using AzpAdj = fusion::Sm90ColBroadcast<0, TileShape, ElementAcc, ElementAcc, Stride<_1, _0, _0>>;
#else
using LayoutOut = cutlass::layout::RowMajor;
using Bias = fusion::Sm90RowBroadcast<0, TileShape, ElementOut, ElementCompute, Stride<_0, _1, _0>>;
using Azp = fusion::Sm90ColBroadcast<0, TileShape, ElementAcc, ElementAcc, Stride<bool, _0, _0>>;
using AzpAdj = fusion::Sm90RowBroadcast<0, TileShape, ElementAcc, ElementAcc, Stride<_0, _1, _0>>;
#endif

// acc - azp (per token) * azp_adj (per channel) in int32, exact; null pointers read as zeros.
using AzpTerm = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, ElementAcc, ElementAcc, kRound>,
                                Azp, AzpAdj>;
using CorrectedAcc = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, ElementAcc, ElementAcc, kRound>,
                                     fusion::Sm90AccFetch, AzpTerm>;

// out = gemm_row_scale * (gemm_col_scale * float(acc')) + bias; a null bias reads as zeros.
using ScaledAcc = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::multiplies, ElementCompute, ElementCompute, kRound>,
    ScaleGemmCol, CorrectedAcc>;
using EpilogueEVT = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, ElementCompute, kRound>,
    ScaleGemmRow, ScaledAcc, Bias>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
    void, LayoutOut, kAlignOut,  // no C operand: the bias comes in through the EVT
    ElementOut, LayoutOut, kAlignOut, EpilogueSchedule, EpilogueEVT>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB,
    ElementAB, LayoutB, kAlignAB, ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue, TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideA = typename GemmKernel::StrideA;
using StrideB = typename GemmKernel::StrideB;
using StrideD = typename GemmKernel::StrideD;

// The SM count is needed by the persistent schedulers on every call; querying it each time
// costs a driver call, so remember it per device. Never 0: the stream-K scheduler divides
// by it even when only asked for a workspace size (e.g. on a machine without a GPU).
int sm_count_for_current_device() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 1;
    cached[dev] = n;
  }
  return cached[dev];
}

typename Gemm::Arguments make_arguments(void* out, const void* xq, const void* wq, const float* row_scale,
                                        const float* col_scale, const void* bias, const int32_t* azp,
                                        const int32_t* azp_adj, int M, int N, int K,
                                        int row_scale_is_vector, int col_scale_is_vector, int splits) {
  const bool azp_vec = row_scale_is_vector != 0;  // zero points are per token like the scale
#if QC_SWAP_AB
  const int gm = N, gn = M;
  const ElementAB* ptr_a = static_cast<const ElementAB*>(wq);
  const ElementAB* ptr_b = static_cast<const ElementAB*>(xq);
  const float* gemm_row_scale = col_scale;
  const float* gemm_col_scale = row_scale;
  const bool gemm_row_vec = col_scale_is_vector != 0;
  const bool gemm_col_vec = row_scale_is_vector != 0;
#else
  const int gm = M, gn = N;
  const ElementAB* ptr_a = static_cast<const ElementAB*>(xq);
  const ElementAB* ptr_b = static_cast<const ElementAB*>(wq);
  const float* gemm_row_scale = row_scale;
  const float* gemm_col_scale = col_scale;
  const bool gemm_row_vec = row_scale_is_vector != 0;
  const bool gemm_col_vec = col_scale_is_vector != 0;
#endif
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(gm, K, 1));
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(gn, K, 1));
  StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(gm, gn, 1));

  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {gm, gn, K, 1};
  args.mainloop = {ptr_a, stride_a, ptr_b, stride_b};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_d;
  args.epilogue.ptr_D = static_cast<ElementOut*>(out);
  args.epilogue.dD = stride_d;
  // Nested EVT arguments: {child args..., op args} in the order of the type above.
  args.epilogue.thread = {
      {gemm_row_scale, 0.f, {gemm_row_vec, _0{}, _0{}}},    // ScaleGemmRow
      {                                                      // ScaledAcc
          {gemm_col_scale, 0.f, {_0{}, gemm_col_vec, _0{}}}, //   ScaleGemmCol
          {                                                  //   CorrectedAcc
              {},                                            //     AccFetch
              {                                              //     AzpTerm
#if QC_SWAP_AB
                  {azp, 0, {_0{}, azp_vec, _0{}}},           //       Azp (GEMM columns)
                  {azp_adj, 0, {}},                          //       AzpAdj (GEMM rows)
#else
                  {azp, 0, {azp_vec, _0{}, _0{}}},           //       Azp (GEMM rows)
                  {azp_adj, 0, {}},                          //       AzpAdj (GEMM columns)
#endif
                  {}},                                       //       multiplies
              {}},                                           //     minus
          {}},                                               //   multiplies
      {static_cast<const ElementOut*>(bias), ElementOut(0.f), {}},  // Bias (null reads as 0)
      {}};                                                   // multiply_add
  args.hw_info.device_id = 0;
  cudaGetDevice(&args.hw_info.device_id);
  args.hw_info.sm_count = sm_count_for_current_device();
#if QC_STREAMK
  using Decomp = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
  using Reduction = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::ReductionMode;
  // splits > 1: plain split-K; splits == 1: data-parallel; splits <= 0: CUTLASS's stream-K
  // heuristic. Integer partial sums add exactly in any order, so the faster
  // nondeterministic reduction gives deterministic results here.
  args.scheduler.splits = splits > 1 ? splits : 1;
  args.scheduler.decomposition_mode =
      splits > 1 ? Decomp::SplitK : (splits == 1 ? Decomp::DataParallel : Decomp::Heuristic);
  args.scheduler.reduction_mode = Reduction::Nondeterministic;
#else
  (void)splits;
#endif
  return args;
}

int status_to_int(cutlass::Status s) {
  if (s == cutlass::Status::kSuccess) return 0;
  cudaError_t e = cudaGetLastError();
  return e != cudaSuccess ? static_cast<int>(e) : -1;
}

}  // namespace

extern "C" {

// Bytes of scratch memory the call with these arguments needs (stream-K partial sums).
size_t qc_int8_gemm_sm90_workspace_size(int M, int N, int K, int splits) {
  auto args = make_arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N,
                             K, 1, 1, splits);
  return Gemm::get_workspace_size(args);
}

// 0 when this configuration can run the problem (alignment, sizes), else nonzero.
int qc_int8_gemm_sm90_can_implement(int M, int N, int K) {
  auto args = make_arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N,
                             K, 1, 1, 0);
  return Gemm::can_implement(args) == cutlass::Status::kSuccess ? 0 : 1;
}

int qc_int8_gemm_sm90(void* out, const void* xq, const void* wq, const float* row_scale,
                      const float* col_scale, const void* bias, const int32_t* azp,
                      const int32_t* azp_adj, int M, int N, int K, int row_scale_is_vector,
                      int col_scale_is_vector, int splits, void* workspace, size_t workspace_size,
                      void* stream) {
  if ((azp == nullptr) != (azp_adj == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  auto args = make_arguments(out, xq, wq, row_scale, col_scale, bias, azp, azp_adj, M, N, K,
                             row_scale_is_vector, col_scale_is_vector, splits);
  if (Gemm::get_workspace_size(args) > workspace_size) return static_cast<int>(cudaErrorInvalidValue);
  Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorInvalidValue);
  auto cs = static_cast<cudaStream_t>(stream);
  s = gemm.initialize(args, workspace, cs);
  if (s != cutlass::Status::kSuccess) return status_to_int(s);
  s = gemm.run(cs);
  if (s != cutlass::Status::kSuccess) return status_to_int(s);
  return static_cast<int>(cudaGetLastError());
}

// Which configuration this library was built with, for logs and tests.
const char* qc_int8_gemm_sm90_config() {
#define QC_STR2(x) #x
#define QC_STR(x) QC_STR2(x)
  return "tile=" QC_STR(QC_TILE_M) "x" QC_STR(QC_TILE_N) "x" QC_STR(QC_TILE_K)
         " cluster=" QC_STR(QC_CLUSTER_M) "x" QC_STR(QC_CLUSTER_N)
         " pingpong=" QC_STR(QC_PINGPONG) " streamk=" QC_STR(QC_STREAMK)
         " swap_ab=" QC_STR(QC_SWAP_AB) " bf16=" QC_STR(QC_OUT_BF16);
}

}  // extern "C"
