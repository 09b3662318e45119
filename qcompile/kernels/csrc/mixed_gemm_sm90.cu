// Hopper (sm_90a) mixed-input GEMM: out[M, N] = x[M, K] @ dequant(W[N, K]).T (+ bias).
//
// x is bf16 or fp16; W holds signed int4 or int8 values in the offline-reordered layout
// made by qcompile/kernels/mixed_gemm.py (prepare_weight). Built on CUTLASS's Hopper
// mixed-input collective (register-sourced wgmma: the narrow operand goes through the
// register file, where it is converted and scaled).
//
// The narrow operand must be the collective's A, so the kernel computes the transposed
// product  out^T[N, M] = W[N, K] * x^T  : W is A (rows = output channels), x is B
// (columns = tokens), and out^T stored column-major is exactly out[M, N] row-major.
// Tokens are the GEMM's N, so decode (M = 1..64) uses small N tiles.
//
// Everything configurable comes from -D defines (set by mixed_gemm.py, never edited):
//   QC_ACT_FP16      0: bf16 activations/output, 1: fp16
//   QC_WBITS         4 or 8 (weights are signed; unsigned ones are shifted at prepare time)
//   QC_MODE          0: no scale in the main loop, per-row scale vector in the epilogue
//                       (per-channel weights: the scale factors out of the K sum)
//                    2: group-wise scale and zero in the main loop, w = q*s + z
//                       (CUTLASS's ConvertAndScaleWithZero; zeros arrive pre-multiplied)
//   QC_TILE_M        weight rows per CTA (64 with pingpong, 128 with cooperative)
//   QC_TILE_N        tokens per CTA (16 .. 256)
//   QC_TILE_K        K per main-loop stage (64; group sizes must be multiples of it)
//   QC_CLUSTER_M/N   thread-block cluster shape
//   QC_COOP          1: cooperative schedule (2 consumer warpgroups share a 128-row tile)
//                    0: pingpong (2 consumer warpgroups alternate on 64-row tiles)
//   QC_STREAMK       1: StreamKScheduler (cooperative only): stream-K or split-K at run time
//
// Exports (extern "C", 0 = success, otherwise a cudaError_t value):
//   qc_mixed_gemm_sm90_info           the compiled configuration, to check a loaded library
//   qc_mixed_gemm_sm90_offsets        the weight reorder map (host only), for tests
//   qc_mixed_gemm_sm90_workspace_size bytes of device workspace a call needs
//   qc_mixed_gemm_sm90                the GEMM
// No torch headers: raw pointers and the stream as void*.

#include <cstdint>
#include <cuda_runtime.h>

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

#include "mixed_gemm_sm90.cuh"

#ifndef QC_ACT_FP16
#define QC_ACT_FP16 0
#endif
#ifndef QC_WBITS
#define QC_WBITS 4
#endif
#ifndef QC_MODE
#define QC_MODE 2
#endif
#ifndef QC_TILE_M
#define QC_TILE_M 128
#endif
#ifndef QC_TILE_N
#define QC_TILE_N 64
#endif
#ifndef QC_TILE_K
#define QC_TILE_K 64
#endif
#ifndef QC_CLUSTER_M
#define QC_CLUSTER_M 1
#endif
#ifndef QC_CLUSTER_N
#define QC_CLUSTER_N 1
#endif
#ifndef QC_COOP
#define QC_COOP 1
#endif
#ifndef QC_STREAMK
#define QC_STREAMK 0
#endif

static_assert(QC_WBITS == 4 || QC_WBITS == 8, "QC_WBITS must be 4 or 8");
static_assert(QC_MODE == 0 || QC_MODE == 2, "QC_MODE must be 0 or 2");
static_assert(!(QC_STREAMK && !QC_COOP), "stream-K needs the cooperative schedule");
static_assert(!QC_COOP || QC_TILE_M >= 128, "cooperative schedule needs QC_TILE_M >= 128");

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#define QC_SM90_OK 1
#else
#define QC_SM90_OK 0
#endif

namespace qc_mixed {

using namespace cute;

#if QC_ACT_FP16
using Act = cutlass::half_t;
#else
using Act = cutlass::bfloat16_t;
#endif

#if QC_WBITS == 4
using Quant = cutlass::int4b_t;
// The [0,2,4,6,1,3,5,7] value order lets the int4 -> 16-bit converter extract pairs of
// nibbles with one lop3 each (CUTLASS's LayoutAwareConvertImpl specialisations).
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
#else
using Quant = cutlass::int8_t;
// [0,2,1,3] per 4 values: matches the int8 -> 16-bit lop3 converter.
using ValueShuffle = Layout<Shape<_2, _2>, Stride<_2, _1>>;
#endif

using Scale = Act;  // main-loop scales/zeros in the MMA type: the fastest conversion path
using Acc = float;

// Weight W [N, K]: row-major (K-major), then reordered so that the values one thread
// feeds to wgmma are contiguous (one wide shared-memory load instead of byte loads).
using StrideW = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
using LayoutAtomQuant = decltype(weight_reorder_atom<Act, ValueShuffle>());
using LayoutW = decltype(cute::tile_to_shape(LayoutAtomQuant{}, Layout<Shape<int, int, int>, StrideW>{}));

// x [M, K] row-major is the GEMM's B (N x K, K-major) = CUTLASS ColumnMajor.
using LayoutX = cutlass::layout::ColumnMajor;
// out^T [N, M] column-major == out [M, N] row-major.
using LayoutOut = cutlass::layout::ColumnMajor;

constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;
constexpr int kAlignX = 128 / cutlass::sizeof_bits<Act>::value;
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<Act>::value;

using TileShape = Shape<Int<QC_TILE_M>, Int<QC_TILE_N>, Int<QC_TILE_K>>;
using ClusterShape = Shape<Int<QC_CLUSTER_M>, Int<QC_CLUSTER_N>, _1>;

#if QC_COOP
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#else
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#endif

#if QC_STREAMK
using TileScheduler = cutlass::gemm::StreamKScheduler;
#else
using TileScheduler = void;  // persistent data-parallel
#endif

// Epilogue: out^T[n, m] = acc * row_scale[n] + bias[n]. Both vectors are per GEMM row
// (an output channel), i.e. column broadcasts; a null pointer reads as the default
// (scale 1, bias 0), so one kernel serves with and without them.
using namespace cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using RowScale = Sm90ColBroadcast<0, TileShape, float, float>;
using RowBias = Sm90ColBroadcast<0, TileShape, Act, float>;
using EpilogueEVT = Sm90EVT<Sm90Compute<cutlass::homogeneous_multiply_add, Act, float, kRound>,
                            Sm90AccFetch, RowScale, RowBias>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, float,
    void, LayoutOut, kAlignOut,  // no C source: beta is never used
    Act, LayoutOut, kAlignOut, EpilogueSchedule, EpilogueEVT>::CollectiveOp;

#if QC_MODE == 0
using ElementWArg = Quant;  // convert only
#else
using ElementWArg = cute::tuple<Quant, Scale, Scale>;  // convert, scale, add zero
#endif

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementWArg, LayoutW, kAlignW,
    Act, LayoutX, kAlignX,
    Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideXT = typename GemmKernel::StrideB;
using StrideOut = typename GemmKernel::StrideD;

// SM count per device, read once: cudaGetDeviceProperties on every call costs far more
// than the kernel at decode sizes.
static int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (counts[device] == 0) {
    int c = 0;
    if (cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device) == cudaSuccess) counts[device] = c;
  }
  return counts[device];
}

static typename Gemm::Arguments make_args(const void* x, const void* w, const void* scales,
                                          const void* zeros, const float* row_scale,
                                          const void* bias, void* out, int M, int N, int K,
                                          int group_size, int decomposition, int splits,
                                          int device) {
  // GEMM problem (m, n, k) = (weight rows N, tokens M, K).
  auto layout_w = cute::tile_to_shape(LayoutAtomQuant{}, cute::make_shape(N, K, 1));
  auto stride_x = cutlass::make_cute_packed_stride(StrideXT{}, cute::make_shape(M, K, 1));
  auto stride_out = cutlass::make_cute_packed_stride(StrideOut{}, cute::make_shape(N, M, 1));

  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {N, M, K, 1};
#if QC_MODE == 0
  (void)scales; (void)zeros; (void)group_size;
  args.mainloop = {static_cast<Quant const*>(w), layout_w, static_cast<Act const*>(x), stride_x};
#else
  // Scales/zeros are [K/g, N] (N fastest: the collective wants them MN-major).
  using StrideS = typename CollectiveMainloop::StrideScale;
  int scale_k = (K + group_size - 1) / group_size;
  auto stride_s = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, scale_k, 1));
  args.mainloop = {static_cast<Quant const*>(w), layout_w, static_cast<Act const*>(x), stride_x,
                   static_cast<Scale const*>(scales), stride_s, group_size,
                   static_cast<Scale const*>(zeros)};
#endif
  auto& fusion = args.epilogue.thread;
  // Order follows the EVT children: {acc}, {row_scale}, {bias}, {op}.
  fusion = {{}, {row_scale, 1.0f, {}}, {static_cast<Act const*>(bias), Act(0), {}}, {}};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_out;
  args.epilogue.ptr_D = static_cast<Act*>(out);
  args.epilogue.dD = stride_out;

  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count(device);
#if QC_STREAMK
  using Decomp = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
  Decomp modes[4] = {Decomp::Heuristic, Decomp::DataParallel, Decomp::SplitK, Decomp::StreamK};
  args.scheduler.decomposition_mode = modes[(decomposition >= 0 && decomposition < 4) ? decomposition : 0];
  args.scheduler.splits = splits > 0 ? splits : 1;
#else
  (void)decomposition; (void)splits;
#endif
  return args;
}

}  // namespace qc_mixed

extern "C" {

// Packs the compiled configuration into ints, so Python can check it loaded what it asked for.
int qc_mixed_gemm_sm90_info(int* out, int n) {
  int v[11] = {QC_ACT_FP16, QC_WBITS, QC_MODE, QC_TILE_M, QC_TILE_N, QC_TILE_K,
               QC_CLUSTER_M, QC_CLUSTER_N, QC_COOP, QC_STREAMK, QC_SM90_OK};
  for (int i = 0; i < n && i < 11; ++i) out[i] = v[i];
  return 11;
}

// Fills offsets[n * K + k] with the element offset of weight (n, k) in the reordered
// layout (host only, no GPU needed): lets tests check mixed_gemm.py's torch reorder.
int qc_mixed_gemm_sm90_offsets(int N, int K, int64_t* offsets) {
  auto layout_w = cute::tile_to_shape(qc_mixed::LayoutAtomQuant{}, cute::make_shape(N, K, 1));
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) offsets[int64_t(n) * K + k] = static_cast<int64_t>(layout_w(n, k, 0));
  return 0;
}

// Device workspace bytes for this problem (stream-K partials; 0 for data-parallel).
// Returns -1 if the problem is not supported by this configuration.
int64_t qc_mixed_gemm_sm90_workspace_size(int M, int N, int K, int group_size,
                                          int decomposition, int splits) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  auto args = qc_mixed::make_args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  M, N, K, group_size, decomposition, splits, device);
  return static_cast<int64_t>(qc_mixed::Gemm::get_workspace_size(args));
}

// x [M, K], w reordered [N, K], scales/zeros [K/g, N] (QC_MODE 2), row_scale float [N] or
// null, bias [N] or null, out [M, N]; all in the activation dtype except row_scale.
// decomposition (stream-K builds): 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K.
int qc_mixed_gemm_sm90(const void* x, const void* w, const void* scales, const void* zeros,
                       const float* row_scale, const void* bias, void* out, int M, int N, int K,
                       int group_size, int decomposition, int splits, void* workspace,
                       int64_t workspace_bytes, void* stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  auto args = qc_mixed::make_args(x, w, scales, zeros, row_scale, bias, out, M, N, K, group_size,
                                  decomposition, splits, device);
  qc_mixed::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorNotSupported);
  if (static_cast<int64_t>(qc_mixed::Gemm::get_workspace_size(args)) > workspace_bytes)
    return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  if (gemm.initialize(args, workspace, s) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return static_cast<int>(err != cudaSuccess ? err : cudaErrorUnknown);
  }
  if (gemm.run(s) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return static_cast<int>(err != cudaSuccess ? err : cudaErrorLaunchFailure);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
