// Ampere-class (sm_80 code; also runs on sm_86/89 and, built as sm_90 SASS, on Hopper)
// mixed-input GEMM, CUTLASS 2.x:
//
//   out[m, n] = (sum_k x[m, k] * q[n, k]) * col_scale[n] + bias[n]      -> bf16 / fp16
//
// x [M, K] bf16/fp16 row-major (the GEMM's A); q [N, K] signed int8 row-major, i.e. the
// GEMM's B [K, N] column-major (K-major), prepared by qcompile/kernels/mixed_gemm_sm80.py;
// col_scale float32 [N] (per output channel: it factors out of the K sum, so the epilogue
// applies it and the main loop only converts); bias [N] in the activation type or null.
//
// Main loop: CUTLASS's multistage (cp.async) threadblock MMA with the mixed-input warp MMA
// (arch::OpMultiplyAddMixedInputUpcast, gemm/warp/mma_mixed_input_tensor_op.h): both
// operands are staged through shared memory with 128-bit cp.async (8 activations or 16
// weights per copy); the weight is read with ldmatrix as 8-bit data, the two bytes a
// 16-bit mma.sync fragment needs from neighbouring lanes are exchanged with two
// shfl + one prmt per 4 bytes, and converted with the bias-trick converters of
// numeric_conversion.h instead of one cvt per element: fp16 sign-extends byte pairs with
// prmt, merges them into the mantissa of the magic half 1536 (0x6600) with one lop3 and
// subtracts 1536 with one sub.f16x2; bf16 does the same in float (prmt, add 0x4B400000,
// sub.f32) and packs pairs with one cvt.rn.bf16x2.f32 (the
// compute_80 PTX path, also the one the sm_90 SASS is built from). Tensor cores then see a
// 16-bit x 16-bit mma.sync.m16n8k16.
//
// Not here (see mixed_gemm_sm80.py): int4 weights (upstream's fragment shuffle handles
// a 2:1 width ratio only) and group-wise scales/zeros (upstream CUTLASS 2.x has no
// fine-grained scale iterator); those formats stay with other kernels / the reference.
//
// Scheduling: ThreadblockSwizzleStreamK. Its run-time split factor gives split-K (several
// CTAs per output tile, partials reduced through the workspace), and avail_sms = 1 gives
// classic data-parallel tiles, so one build serves decode and prefill.
//
// Configuration by -D defines only (set by mixed_gemm_sm80.py, never edited):
//   QC_ACT_FP16            0: bf16 activations/output, 1: fp16
//   QC_TILE_M/N/K          CTA tile (M = tokens: 16 / 32 for decode)
//   QC_WARP_M/N/K          warp tile
//   QC_STAGES              cp.async pipeline depth
// Exports (extern "C", 0 = success, else a cudaError_t value; no torch headers):
//   qc_mixed_gemm_sm80_info, qc_mixed_gemm_sm80_workspace_size, qc_mixed_gemm_sm80

#include <cuda_runtime.h>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"

#ifndef QC_ACT_FP16
#define QC_ACT_FP16 0
#endif
#ifndef QC_TILE_M
#define QC_TILE_M 64
#endif
#ifndef QC_TILE_N
#define QC_TILE_N 128
#endif
#ifndef QC_TILE_K
#define QC_TILE_K 64
#endif
#ifndef QC_WARP_M
#define QC_WARP_M 32
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

static_assert(QC_TILE_M % QC_WARP_M == 0 && QC_TILE_N % QC_WARP_N == 0 && QC_TILE_K % QC_WARP_K == 0,
              "the warp tile must divide the CTA tile");

using namespace cute;

namespace {

#if QC_ACT_FP16
using Act = cutlass::half_t;
#else
using Act = cutlass::bfloat16_t;
#endif
using Quant = int8_t;
using Acc = float;

using TileShape = cutlass::gemm::GemmShape<QC_TILE_M, QC_TILE_N, QC_TILE_K>;
using WarpShape = cutlass::gemm::GemmShape<QC_WARP_M, QC_WARP_N, QC_WARP_K>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;  // 16-bit mma.sync after the upcast
constexpr int kAlignX = 128 / cutlass::sizeof_bits<Act>::value;    // 8: one cp.async of 16 bytes
constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;  // 16
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<Act>::value;
constexpr int kEpilogueStages = 1;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

namespace tb = cutlass::epilogue::threadblock;

using ThreadMap = tb::OutputTileThreadLayout<TileShape, WarpShape, Act, kAlignOut, kEpilogueStages>;

// Per output channel (GEMM column n) vectors; a null bias reads as 0.
using ColScale = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, _0>>;
using Bias = tb::VisitorRowBroadcast<ThreadMap, Act, Stride<_0, _1, _0>>;
using Result = tb::Sm80EVT<tb::VisitorCompute<cutlass::homogeneous_multiply_add, Act, float, kRound>,
                           tb::VisitorAccFetch, ColScale, Bias>;
using Store = tb::VisitorAuxStore<ThreadMap, Act, kRound, Stride<int64_t, _1, _0>>;
using EVT = tb::Sm80EVT<Store, Result>;

using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
    Act, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignX,
    Quant, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignW,
    Act, cutlass::layout::RowMajor, kAlignOut, Acc, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstructionShape, EVT,
    cutlass::gemm::threadblock::ThreadblockSwizzleStreamK, QC_STAGES,
    cutlass::arch::OpMultiplyAddMixedInputUpcast, kEpilogueStages>::GemmKernel;

using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

// SM count per device, read once (cudaDeviceGetAttribute per call costs more than a decode GEMM).
int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 1;
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n > 0 ? n : 1;
  }
  return cached[device];
}

// decomposition: 0 / 3 stream-K heuristic over all SMs, 1 data-parallel, 2 split-K by `splits`.
typename Gemm::Arguments make_arguments(void* out, const void* x, const void* w, const float* col_scale,
                                        const void* bias, int M, int N, int K, int decomposition,
                                        int splits, int device) {
  cutlass::gemm::GemmCoord problem(M, N, K);
  typename EVT::Arguments evt_args{
      {                                                         // Result = acc * scale + bias
          {},                                                   //   AccFetch
          {col_scale, 0.f, {}},                                 //   ColScale
          {static_cast<const Act*>(bias), Act(0.f), {}},        //   Bias
          {}},                                                  //   multiply_add
      {static_cast<Act*>(out), {int64_t(N), _1{}, _0{}}}};      // Store
  int split = (decomposition == 2 && splits > 1) ? splits : 1;
  int avail_sms = decomposition == 1 ? 1 : sm_count(device);
  return typename Gemm::Arguments(
      cutlass::gemm::GemmUniversalMode::kGemm, problem, split, evt_args, x, w, nullptr, nullptr,
      int64_t(M) * K, int64_t(N) * K, 0, 0, K, K, 0, 0, avail_sms);
}

}  // namespace

extern "C" {

// The compiled configuration, so Python can check it loaded what it asked for.
int qc_mixed_gemm_sm80_info(int* out, int n) {
  int v[8] = {QC_ACT_FP16, QC_TILE_M, QC_TILE_N, QC_TILE_K, QC_WARP_M, QC_WARP_N, QC_WARP_K, QC_STAGES};
  for (int i = 0; i < n && i < 8; ++i) out[i] = v[i];
  return 8;
}

// Device workspace bytes (stream-K / split-K partials and flags); -1 without a CUDA device.
int64_t qc_mixed_gemm_sm80_workspace_size(int M, int N, int K, int decomposition, int splits) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  auto args = make_arguments(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, decomposition, splits,
                             device);
  return static_cast<int64_t>(Gemm::get_workspace_size(args));
}

// x [M, K], w [N, K] int8, col_scale float [N], bias [N] or null, out [M, N]; x, bias and out
// in the activation type. All 16-byte aligned, K % 16 == 0, N % 8 == 0.
int qc_mixed_gemm_sm80(const void* x, const void* w, const float* col_scale, const void* bias, void* out,
                       int M, int N, int K, int decomposition, int splits, void* workspace,
                       int64_t workspace_bytes, void* stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  auto args = make_arguments(out, x, w, col_scale, bias, M, N, K, decomposition, splits, device);
  if (static_cast<int64_t>(Gemm::get_workspace_size(args)) > workspace_bytes)
    return static_cast<int>(cudaErrorInvalidValue);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorNotSupported);
  auto s = static_cast<cudaStream_t>(stream);
  cutlass::Status st = gemm.initialize(args, workspace, s);
  if (st == cutlass::Status::kSuccess) st = gemm.run(s);
  err = cudaGetLastError();
  if (st != cutlass::Status::kSuccess) return err != cudaSuccess ? static_cast<int>(err) : static_cast<int>(cudaErrorUnknown);
  return static_cast<int>(err);
}

}  // extern "C"
