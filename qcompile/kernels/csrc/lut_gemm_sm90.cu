// Hopper (sm_90a) lookup-table GEMM: out[M, N] = x[M, K] @ W.T (+ bias) with
// W[n, k] = table[c[n, k]] * scales[k / block, n], 4-bit codes c and a 16-entry table (NF4,
// FP4, any fixed 16-value codebook) compiled in.
//
// The same CUTLASS Hopper mixed-input collective as mixed_gemm_sm90.cu (register-sourced
// wgmma, the weight as the collective's A, tokens as its N; that file says why), in its
// ConvertAndScale mode (block scale, no zero). The one new piece is the 4-bit element type
// `Code` and its converter: CUTLASS converts the narrow operand in registers through
// LayoutAwareConvertImpl<Src, Dst, ...>, which this file specialises for Code so that the
// conversion is a table lookup (lut_lookup.cuh).
//
// The lookup (QC_LUT_SMEM): 1, from a table of all 256 value pairs in shared memory, in 32
// bank-private copies (32 KB), as the decode kernel reads it: per 8 values 4 prmt, 4 lea and
// 4 conflict-free shared loads. The kernel is CUTLASS's with a prologue (PairTableKernel):
// every thread stores its share of the table into the first 32 KB of the dynamic shared
// memory, one barrier, then CUTLASS's kernel runs on the rest (its stage count computed with
// the table carved out). 0, by byte permutes from registers: 16 prmt and 4 bit operations per
// 8 values on the integer pipe, no shared memory.
//
// Weight layout: qcompile's lookup-table layout (lut_gemm.py, "sm90_lut_pairs"): the sm90
// mixed GEMM's reorder with each thread's 8 values in K order (nibble j of a 32-bit word =
// value j), each nibble holding c ^ 8 (the codes stored as signed int4 c - 8). The decode
// kernel reads the same bytes.
//
// -D defines (set by mixed_gemm.py / lut_gemm.py, never edited):
//   QC_ACT_FP16      0: bf16 activations/output, 1: fp16
//   QC_LUT_T0..T3    the 16 table values as their 16-bit patterns in the activation type,
//                    four to a 64-bit word: entry c at bits 16 * (c % 4) of word c / 4
//                    (nvcc splits a -D value at commas, so not one list)
//   QC_WBITS, QC_MODE  must be 4 and 1 (the config's format: 4-bit, block scale in the loop)
//   QC_TILE_M/N/K, QC_CLUSTER_M/N, QC_COOP, QC_STREAMK  as in mixed_gemm_sm90.cu
//   QC_LUT_SMEM      1: the pair table in shared memory (default), 0: byte permutes
//
// Exports (extern "C", 0 = success, otherwise a cudaError_t value):
//   qc_lut_gemm_sm90_info           the compiled configuration and table
//   qc_lut_gemm_sm90_workspace_size bytes of device workspace a call needs
//   qc_lut_gemm_sm90                the GEMM

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

#include "lut_lookup.cuh"
#include "mixed_gemm_sm90.cuh"
#include "sm90_launch.cuh"

#ifndef QC_ACT_FP16
#define QC_ACT_FP16 0
#endif
#if !defined(QC_LUT_T0) || !defined(QC_LUT_T1) || !defined(QC_LUT_T2) || !defined(QC_LUT_T3)
#error "QC_LUT_T0..T3 (the table values' bit patterns) must be defined"
#endif
#ifndef QC_WBITS
#define QC_WBITS 4
#endif
#ifndef QC_MODE
#define QC_MODE 1
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
#ifndef QC_LUT_SMEM
#define QC_LUT_SMEM 1
#endif

static_assert(QC_WBITS == 4 && QC_MODE == 1, "the lookup-table GEMM takes 4-bit codes with block scales");
static_assert(!(QC_STREAMK && !QC_COOP), "stream-K needs the cooperative schedule");
static_assert(!QC_COOP || QC_TILE_M >= 128, "cooperative schedule needs QC_TILE_M >= 128");

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#define QC_SM90_OK 1
#else
#define QC_SM90_OK 0
#endif

namespace qc_lut {

// A 4-bit code: no arithmetic, only its bits (CUTLASS's sub-byte containers move it by bits).
struct Code {
  uint8_t storage;
};

// The compiled-in table and its lookup (lut_lookup.cuh).
using Table = Lookup<QC_LUT_T0, QC_LUT_T1, QC_LUT_T2, QC_LUT_T3>;

// The pair table: 256 pairs x 32 copies of a 32-bit word, at the start of the dynamic shared
// memory (a multiple of 1024 bytes, so CUTLASS's storage after it keeps its TMA alignment).
constexpr int kPairTableBytes = QC_LUT_SMEM ? 256 * 32 * 4 : 0;

#if defined(__CUDACC__)
// The lane's copy of the pair table: its shared-space byte address (CUTLASS's device_kernel
// declares the same dynamic shared memory as `smem`; every unsized extern array starts there).
__device__ __forceinline__ uint32_t pair_table_lane_base() {
  extern __shared__ char qc_lut_dynamic_smem[];
  return static_cast<uint32_t>(__cvta_generic_to_shared(qc_lut_dynamic_smem)) + 4 * (threadIdx.x & 31);
}

__device__ __forceinline__ uint32_t load_shared_u32(uint32_t addr) {
  uint32_t v;
  // not volatile: the table is written once, before the barrier every thread passes first
  asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
#endif

}  // namespace qc_lut

namespace cutlass {

template <>
struct sizeof_bits<qc_lut::Code> {
  static constexpr int value = 4;
};

// The collective's conversion of the narrow operand, for Code: the table lookup. It gets a
// thread's 8 values of one 32-bit load in K order (the weight layout's identity value order).
template <class Dst, class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<qc_lut::Code, Dst, LayoutIn, LayoutOut> {
  template <class EngineIn, class EngineOut>
  CUTLASS_DEVICE static void convert(cute::Tensor<EngineIn, LayoutIn> const& src,
                                     cute::Tensor<EngineOut, LayoutOut>& dst) {
    static_assert(cute::is_same_v<Dst, typename EngineOut::value_type> && cute::sizeof_bits_v<Dst> == 16,
                  "the table holds 16-bit values in the activation type");
    static_assert(cute::is_same_v<decltype(cute::coalesce(LayoutIn{})), cute::Layout<cute::_8, cute::_1>> &&
                      cute::is_same_v<decltype(cute::coalesce(LayoutOut{})), cute::Layout<cute::_8, cute::_1>>,
                  "the lookup converts 8 contiguous values (one 32-bit word of codes) at a time");
    uint32_t q = cute::recast<uint32_t>(src)(0);
    auto&& out = cute::recast<cutlass::AlignedArray<uint32_t, 4, 16>>(dst)(0);
    uint32_t r[4];
#if QC_LUT_SMEM
    qc_lut::lookup8_pairs(q, qc_lut::pair_table_lane_base(), qc_lut::load_shared_u32, r);
#else
    qc_lut::Table::lookup8(q, r);
#endif
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) out[i] = r[i];
  }
};

}  // namespace cutlass

namespace qc_lut {

using namespace cute;

#if QC_ACT_FP16
using Act = cutlass::half_t;
#else
using Act = cutlass::bfloat16_t;
#endif
using Acc = float;

// The weight: the sm90 mixed GEMM's reorder with the identity value order.
using StrideW = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
using LayoutAtomQuant = decltype(qc_mixed::weight_reorder_atom<Act, Layout<_8, _1>>());
using LayoutW = decltype(cute::tile_to_shape(LayoutAtomQuant{}, Layout<Shape<int, int, int>, StrideW>{}));
using LayoutX = cutlass::layout::ColumnMajor;    // x [M, K] row-major as the GEMM's B
using LayoutOut = cutlass::layout::ColumnMajor;  // out^T [N, M] column-major == out [M, N]

constexpr int kAlignW = 128 / 4;
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
using TileScheduler = void;
#endif

// Epilogue: out^T[n, m] = acc + bias[n] (a null bias reads as 0).
using namespace cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using RowBias = Sm90ColBroadcast<0, TileShape, Act, float>;
using EpilogueEVT = Sm90EVT<Sm90Compute<cutlass::plus, Act, float, kRound>, Sm90AccFetch, RowBias>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, float,
    void, LayoutOut, kAlignOut,
    Act, LayoutOut, kAlignOut, EpilogueSchedule, EpilogueEVT>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    cute::tuple<Code, Act>, LayoutW, kAlignW,  // look up, then scale by the block's absmax
    Act, LayoutX, kAlignX,
    Acc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage)) + kPairTableBytes>,
    MainloopSchedule>::CollectiveOp;

using CutlassKernel = cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, TileScheduler>;

// CUTLASS's kernel behind a prologue that stages the pair table: the 8192 words in 16-byte
// stores (4 copies of one pair each), consecutive threads to consecutive addresses, so each
// warp's store is one conflict-free pass; then one barrier before any thread looks up.
struct PairTableKernel : CutlassKernel {
  static constexpr int SharedStorageSize = kPairTableBytes + CutlassKernel::SharedStorageSize;
  static_assert(kPairTableBytes % 1024 == 0, "CUTLASS's shared storage must stay 1024-aligned");

  CUTLASS_DEVICE void operator()(typename CutlassKernel::Params const& params, char* smem_buf) {
    auto* table = reinterpret_cast<uint4*>(smem_buf);
    for (int i = threadIdx.x; i < kPairTableBytes / 16; i += blockDim.x) {
      uint32_t v = Table::pair(static_cast<uint32_t>(i) >> 3);  // 8 x 16 bytes a pair's 32 copies
      table[i] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    CutlassKernel::operator()(params, smem_buf + kPairTableBytes);
  }
};

using GemmKernel = cute::conditional_t<QC_LUT_SMEM != 0, PairTableKernel, CutlassKernel>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideXT = typename GemmKernel::StrideB;
using StrideOut = typename GemmKernel::StrideD;

static typename Gemm::Arguments make_args(const void* x, const void* w, const void* scales,
                                          const void* bias, void* out, int M, int N, int K,
                                          int block, int decomposition, int splits, int device) {
  auto layout_w = cute::tile_to_shape(LayoutAtomQuant{}, cute::make_shape(N, K, 1));
  auto stride_x = cutlass::make_cute_packed_stride(StrideXT{}, cute::make_shape(M, K, 1));
  auto stride_out = cutlass::make_cute_packed_stride(StrideOut{}, cute::make_shape(N, M, 1));
  using StrideS = typename CollectiveMainloop::StrideScale;
  auto stride_s = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, K / block, 1));

  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {N, M, K, 1};
  args.mainloop = {static_cast<Code const*>(w), layout_w, static_cast<Act const*>(x), stride_x,
                   static_cast<Act const*>(scales), stride_s, block};
  args.epilogue.thread = {{}, {static_cast<Act const*>(bias), Act(0), {}}, {}};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_out;
  args.epilogue.ptr_D = static_cast<Act*>(out);
  args.epilogue.dD = stride_out;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = qc_sm90::sm_count(device);
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

}  // namespace qc_lut

extern "C" {

// The compiled configuration (as mixed_gemm_sm90's info, QC_ACT_FP16 .. QC_STREAMK), then the
// 16 table entries, then whether sm90 code was compiled in.
int qc_lut_gemm_sm90_info(int* out, int n) {
  int v[27] = {QC_ACT_FP16, QC_WBITS, QC_MODE, QC_TILE_M, QC_TILE_N, QC_TILE_K,
               QC_CLUSTER_M, QC_CLUSTER_N, QC_COOP, QC_STREAMK};
  for (int i = 0; i < 16; ++i) v[10 + i] = static_cast<int>(qc_lut::Table::entry(i));
  v[26] = QC_SM90_OK;
  for (int i = 0; i < n && i < 27; ++i) out[i] = v[i];
  return 27;
}

// Device workspace bytes for this problem (stream-K partials); -1 where none can be had.
int64_t qc_lut_gemm_sm90_workspace_size(int M, int N, int K, int block, int decomposition, int splits) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  auto args = qc_lut::make_args(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, block,
                                decomposition, splits, device);
  return static_cast<int64_t>(qc_lut::Gemm::get_workspace_size(args));
}

// x [M, K], w the codes [N, K / 2] in the lookup-table layout, scales [K / block, N] and
// bias [N] (or null) in the activation type, out [M, N].
// decomposition (stream-K builds): 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K.
int qc_lut_gemm_sm90(const void* x, const void* w, const void* scales, const void* bias, void* out,
                     int M, int N, int K, int block, int decomposition, int splits, void* workspace,
                     int64_t workspace_bytes, void* stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  auto args = qc_lut::make_args(x, w, scales, bias, out, M, N, K, block, decomposition, splits, device);
  return qc_sm90::launch<qc_lut::Gemm>(args, workspace, workspace_bytes, stream);
}

}  // extern "C"
