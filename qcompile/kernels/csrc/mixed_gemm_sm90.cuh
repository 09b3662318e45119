// Offline weight order for qcompile's Hopper mixed-input GEMM (mixed_gemm_sm90.cu).
//
// The register-sourced wgmma reads its A operand (the narrow weight) in the thread/value
// order of the 16-bit MMA fragment: each thread of a warp owns 8 values of a 16x16
// (rows x K) block, scattered over 4 rows-and-columns pairs. Stored K-major, an int4
// thread would need four 1-byte shared-memory loads per block; stored so that a thread's
// 8 values sit side by side, one 32-bit load suffices. This header builds that order as a
// CuTe layout (n, k) -> offset, the same function as CUTLASS's
// compute_memory_reordering_atom with one MMA atom per block, written here so the kernel
// does not pull in cutlass/util (whose headers need cuRAND). qcompile/kernels/mixed_gemm.py
// implements the same map in torch; tests compare the two through qc_mixed_gemm_sm90_offset.
#pragma once

#include "cute/tensor.hpp"
#include "cute/arch/mma_sm90.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"

namespace qc_mixed {

// ValueOrder permutes a thread's values inside its contiguous run, for the converters
// that unpack several narrow values with one lop3 (see mixed_input_utils.hpp).
template <class MmaType, class ValueOrder>
constexpr auto weight_reorder_atom() {
  using namespace cute;
  // Any 16-bit RS wgmma has the same A thread/value layout; the shape is arbitrary.
  using Atom = decltype(SM90::GMMA::rs_op_selector<MmaType, MmaType, float, Shape<_64, _16, _32>>());
  using Traits = MMA_Traits<Atom>;
  auto mk_shape = select<0, 2>(typename Traits::Shape_MNK{});            // (64, 16)
  auto tv = typename Traits::ALayout{};                                  // (thr 128, val 8) -> (m, k)
  constexpr int kVals = decltype(size<1>(tv))::value;
  static_assert(kVals % decltype(size(ValueOrder{}))::value == 0);
  // One warp's share (the four warps split the 64 rows): (thr 32, val 8) -> (m, k),
  // inverted to (m, k) -> thr + 32 * val over the warp's 16 x 16 block.
  auto tv_warp = make_layout_like(composition(tv, make_shape(Int<32>{}, Int<kVals>{})));
  auto mk_warp = right_inverse(tv_warp).with_shape(shape_div(mk_shape, Int<4>{}));
  // Offsets: thread t's values at 8t .. 8t+7, permuted by ValueOrder.
  auto val_off = logical_product(ValueOrder{}, Int<kVals / decltype(size(ValueOrder{}))::value>{});
  auto tv_off = select<1, 0>(logical_product(val_off, make_layout(Int<32>{})));
  return composition(tv_off, mk_warp);
}

}  // namespace qc_mixed
