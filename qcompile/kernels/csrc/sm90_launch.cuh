// Host-side launch of a CUTLASS 3 GEMM (GemmUniversalAdapter) for qcompile's extern "C"
// entry points: the SM count the persistent schedulers size their grids by, read once per
// device, and one launch sequence with its errors mapped to cudaError_t values.
// (lut_gemm_sm90.cu uses it; mixed_gemm_sm90.cu and int8_gemm_sm90.cu still carry their own
// copies: changing them rebuilds every cached library of theirs.)
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace qc_sm90 {

// cudaGetDeviceProperties on every call costs far more than a decode-sized kernel.
inline int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (counts[device] == 0) {
    int c = 0;
    if (cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device) == cudaSuccess) counts[device] = c;
  }
  return counts[device];
}

// can_implement, the workspace's size, initialize, run: 0, or the cudaError_t value that
// says which failed (cudaErrorNotSupported: the configuration does not take the problem;
// cudaErrorInvalidValue: the workspace is too small).
template <class Gemm>
int launch(typename Gemm::Arguments const& args, void* workspace, int64_t workspace_bytes, void* stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorNotSupported);
  if (static_cast<int64_t>(Gemm::get_workspace_size(args)) > workspace_bytes)
    return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
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

}  // namespace qc_sm90
