// Plain C++ launcher for the BatchKalmanNorm forward pass (no TensorRT types).
//
// The math is bkn_export/functional.py: batch_kalman_norm. For X of shape (N, C, S)
// (S = product of the spatial dims, 1 for (N, C) inputs), per channel c:
//
//   batch statistics   x̄_c = mean over (n, s) of X         S_c = biased variance over (n, s)
//   fallback           p_c = 0 for every c if fallbackRatio > 0 and
//                      mean_c(prior_variance_c / max(S_c, 1e-12)) >= fallbackRatio, else prior_weight_c
//   update             μ_c = prior_mean_c + (1 - p_c)(x̄_c - prior_mean_c)
//                      Σ_c = p_c prior_variance_c + (1 - p_c) S_c + p_c (1 - p_c)(x̄_c - prior_mean_c)²
//   normalize          a_c = γ_c / sqrt(Σ_c + ε),   b_c = β_c - μ_c a_c,   Y = a_c X + b_c
//
// Statistics and (C,) tensors are float32; X and Y are float32 or float16 (accumulated
// in float32). Tensors are contiguous, row-major (the TensorRT kLINEAR format).
#ifndef BKN_BATCH_KALMAN_NORM_KERNEL_H
#define BKN_BATCH_KALMAN_NORM_KERNEL_H

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace bkn
{

//! Element type of X and Y.
enum class ElementType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1
};

//! X viewed as (batch, channels, spatial).
struct BatchKalmanNormShape
{
    int64_t batch;
    int64_t channels;
    int64_t spatial;
};

//! Node attributes used by the kernels.
struct BatchKalmanNormAttributes
{
    float epsilon;
    float fallbackRatio;
};

//! Device pointers. Inputs (C,) float32: priorMean, priorVariance, priorWeight, scale, bias.
//! Outputs: y (like x), posteriorMean and posteriorVariance (C,) float32.
struct BatchKalmanNormTensors
{
    void const* x;
    float const* priorMean;
    float const* priorVariance;
    float const* priorWeight;
    float const* scale;
    float const* bias;
    void* y;
    float* posteriorMean;
    float* posteriorVariance;
};

//! Bytes of device workspace the launcher needs for `channels` channels (256-byte aligned).
size_t batchKalmanNormWorkspaceSize(int64_t channels) noexcept;

//! Enqueue the forward pass on `stream` (three kernels: per-channel two-pass statistics,
//! the Kalman update with the fallback rule, normalization). Returns cudaErrorInvalidValue
//! for an empty or malformed shape or null pointers, else the launch status.
cudaError_t batchKalmanNormForward(ElementType type, BatchKalmanNormShape const& shape,
    BatchKalmanNormAttributes const& attributes, BatchKalmanNormTensors const& tensors, void* workspace,
    cudaStream_t stream) noexcept;

} // namespace bkn

#endif // BKN_BATCH_KALMAN_NORM_KERNEL_H
