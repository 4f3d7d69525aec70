// C entry points of the kernel-only library (libbkn_batch_kalman_norm_kernel.so), so that
// the launcher can be tested from Python (ctypes, device pointers from torch) without
// TensorRT. The plugin library links the same kernel objects but not this file.
#include "batchKalmanNormKernel.h"

#include <cstdint>

#define BKN_C_API extern "C" __attribute__((visibility("default")))

//! Device workspace bytes for `channels` channels.
BKN_C_API size_t bkn_batch_kalman_norm_workspace_size(int64_t channels)
{
    return bkn::batchKalmanNormWorkspaceSize(channels);
}

//! Enqueue the forward pass; returns the cudaError_t value (0 = success).
//! element_type: 0 float32, 1 float16 (for x and y). All pointers are device pointers;
//! stream is a cudaStream_t (0 = the legacy default stream).
BKN_C_API int32_t bkn_batch_kalman_norm_forward(int32_t element_type, int64_t batch, int64_t channels,
    int64_t spatial, float epsilon, float fallback_ratio, void const* x, float const* prior_mean,
    float const* prior_variance, float const* prior_weight, float const* scale, float const* bias, void* y,
    float* posterior_mean, float* posterior_variance, void* workspace, void* stream)
{
    if (element_type != static_cast<int32_t>(bkn::ElementType::kFLOAT32)
        && element_type != static_cast<int32_t>(bkn::ElementType::kFLOAT16))
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    bkn::BatchKalmanNormShape const shape{batch, channels, spatial};
    bkn::BatchKalmanNormAttributes const attributes{epsilon, fallback_ratio};
    bkn::BatchKalmanNormTensors const tensors{
        x, prior_mean, prior_variance, prior_weight, scale, bias, y, posterior_mean, posterior_variance};
    return static_cast<int32_t>(bkn::batchKalmanNormForward(static_cast<bkn::ElementType>(element_type), shape,
        attributes, tensors, workspace, static_cast<cudaStream_t>(stream)));
}
