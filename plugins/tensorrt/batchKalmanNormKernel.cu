// CUDA kernels for the BatchKalmanNorm forward pass; see batchKalmanNormKernel.h for the math.
//
// Three kernels on one stream, reading top to bottom:
//   1. channelStatisticsKernel: one block per channel, two passes over the channel's
//      N*S elements (mean first, then the mean of squared deviations: no cancellation
//      as in E[x²] - E[x]²), biased variance as in torch.var_mean(correction=0).
//   2. kalmanUpdateKernel: one block; the fallback rule needs the mean over all channels
//      of prior_variance / batch_variance, so it cannot be decided per channel. Writes the
//      posterior outputs and the per-channel affine (a, b) of the normalization.
//   3. normalizeKernel: Y = a_c X + b_c, grid-stride over all elements.
#include "batchKalmanNormKernel.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <climits>

namespace bkn
{
namespace
{

//! Threads per block. A multiple of the warp size; 256 keeps one statistics block per
//! channel busy for typical N*S (>= a few thousand) without starving small ones.
constexpr int32_t kTHREADS = 256;
constexpr int32_t kWARP = 32;
//! Cap on the normalization grid; the kernel strides over the rest.
constexpr int64_t kMAX_NORMALIZE_BLOCKS = 65536;
//! Same floor on the batch variance as bkn_export.functional's fallback rule (_VARIANCE_FLOOR).
constexpr float kVARIANCE_FLOOR = 1e-12F;
//! Workspace arrays of `channels` floats: batch mean, batch variance, a, b.
constexpr int64_t kWORKSPACE_ARRAYS = 4;
constexpr size_t kWORKSPACE_ALIGNMENT = 256;

__device__ __forceinline__ float toFloat(float value)
{
    return value;
}

__device__ __forceinline__ float toFloat(__half value)
{
    return __half2float(value);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float value);

template <>
__device__ __forceinline__ float fromFloat<float>(float value)
{
    return value;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float value)
{
    return __float2half_rn(value);
}

//! Sum of `value` over the block, returned to every thread. `shared` holds kWARP floats.
__device__ float blockSum(float value, float* shared)
{
    int32_t const lane = static_cast<int32_t>(threadIdx.x) % kWARP;
    int32_t const warp = static_cast<int32_t>(threadIdx.x) / kWARP;
    int32_t const nbWarps = static_cast<int32_t>(blockDim.x) / kWARP;
    for (int32_t offset = kWARP / 2; offset > 0; offset /= 2)
    {
        value += __shfl_down_sync(0xffffffffU, value, offset);
    }
    if (lane == 0)
    {
        shared[warp] = value;
    }
    __syncthreads();
    if (warp == 0)
    {
        value = lane < nbWarps ? shared[lane] : 0.0F;
        for (int32_t offset = kWARP / 2; offset > 0; offset /= 2)
        {
            value += __shfl_down_sync(0xffffffffU, value, offset);
        }
        if (lane == 0)
        {
            shared[0] = value;
        }
    }
    __syncthreads();
    float const total = shared[0];
    __syncthreads(); // `shared` may be reused by the caller's next blockSum
    return total;
}

//! `sum += value` with Kahan's compensation carried in `error` (the build keeps IEEE float arithmetic: no fast math).
__device__ __forceinline__ void kahanAdd(float& sum, float& error, float value)
{
    float const corrected = __fsub_rn(value, error);
    float const total = __fadd_rn(sum, corrected);
    error = __fsub_rn(__fsub_rn(total, sum), corrected);
    sum = total;
}

//! Offset of element i (counted over (n, s) of one channel) in an (N, C, S) tensor.
__device__ __forceinline__ int64_t channelElementOffset(int64_t i, int64_t channel, int64_t channels, int64_t spatial)
{
    int64_t const n = i / spatial;
    int64_t const s = i - n * spatial;
    return (n * channels + channel) * spatial + s;
}

template <typename T>
__global__ void __launch_bounds__(kTHREADS) channelStatisticsKernel(
    T const* x, int64_t batch, int64_t channels, int64_t spatial, float* batchMean, float* batchVariance)
{
    __shared__ float shared[kWARP];
    int64_t const channel = blockIdx.x;
    int64_t const count = batch * spatial;

    // Each thread sums count / blockDim values in turn: compensated (Kahan), or a plain float32 running sum loses
    // ~1e-4 relative at a few million values per channel (3-D or high-resolution inputs).
    float sum = 0.0F;
    float sumError = 0.0F;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
    {
        kahanAdd(sum, sumError, toFloat(x[channelElementOffset(i, channel, channels, spatial)]));
    }
    float const mean = blockSum(sum, shared) / static_cast<float>(count);

    float squares = 0.0F;
    float squaresError = 0.0F;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x)
    {
        float const deviation = toFloat(x[channelElementOffset(i, channel, channels, spatial)]) - mean;
        kahanAdd(squares, squaresError, deviation * deviation);
    }
    float const variance = blockSum(squares, shared) / static_cast<float>(count);

    if (threadIdx.x == 0)
    {
        batchMean[channel] = mean;
        batchVariance[channel] = variance;
    }
}

__global__ void __launch_bounds__(kTHREADS) kalmanUpdateKernel(int64_t channels, BatchKalmanNormAttributes attributes,
    float const* priorMean, float const* priorVariance, float const* priorWeight, float const* scale,
    float const* bias, float const* batchMean, float const* batchVariance, float* posteriorMean,
    float* posteriorVariance, float* normScale, float* normShift)
{
    __shared__ float shared[kWARP];

    // The authors' fallback: an unreliable prior (much wider than the batch) is ignored.
    bool fallback = false;
    if (attributes.fallbackRatio > 0.0F)
    {
        float ratio = 0.0F;
        for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
        {
            // fmaxf(NaN, floor) is the floor: a NaN channel must keep the ratio NaN (no fallback), as the reference.
            float const batch = batchVariance[c];
            ratio += priorVariance[c] / (isnan(batch) ? batch : fmaxf(batch, kVARIANCE_FLOOR));
        }
        fallback = blockSum(ratio, shared) / static_cast<float>(channels) >= attributes.fallbackRatio;
    }

    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
    {
        float const p = fallback ? 0.0F : priorWeight[c];
        float const q = 1.0F - p;
        float const innovation = batchMean[c] - priorMean[c];
        float const mean = priorMean[c] + q * innovation;
        float const variance = p * priorVariance[c] + q * batchVariance[c] + p * q * innovation * innovation;
        posteriorMean[c] = mean;
        posteriorVariance[c] = variance;
        float const a = rsqrtf(variance + attributes.epsilon) * scale[c];
        normScale[c] = a;
        normShift[c] = -mean * a + bias[c];
    }
}

template <typename T>
__global__ void __launch_bounds__(kTHREADS) normalizeKernel(
    T const* x, T* y, int64_t total, int64_t channels, int64_t spatial, float const* normScale, float const* normShift)
{
    int64_t const stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    {
        int64_t const c = (i / spatial) % channels;
        y[i] = fromFloat<T>(toFloat(x[i]) * normScale[c] + normShift[c]);
    }
}

size_t alignUp(size_t bytes)
{
    return (bytes + kWORKSPACE_ALIGNMENT - 1) / kWORKSPACE_ALIGNMENT * kWORKSPACE_ALIGNMENT;
}

template <typename T>
cudaError_t launch(BatchKalmanNormShape const& shape, BatchKalmanNormAttributes const& attributes,
    BatchKalmanNormTensors const& tensors, void* workspace, cudaStream_t stream)
{
    int64_t const channels = shape.channels;
    float* const batchMean = static_cast<float*>(workspace);
    float* const batchVariance = batchMean + channels;
    float* const normScale = batchVariance + channels;
    float* const normShift = normScale + channels;
    T const* const x = static_cast<T const*>(tensors.x);
    T* const y = static_cast<T*>(tensors.y);

    channelStatisticsKernel<T><<<static_cast<unsigned int>(channels), kTHREADS, 0, stream>>>(
        x, shape.batch, channels, shape.spatial, batchMean, batchVariance);
    kalmanUpdateKernel<<<1, kTHREADS, 0, stream>>>(channels, attributes, tensors.priorMean, tensors.priorVariance,
        tensors.priorWeight, tensors.scale, tensors.bias, batchMean, batchVariance, tensors.posteriorMean,
        tensors.posteriorVariance, normScale, normShift);
    int64_t const total = shape.batch * channels * shape.spatial;
    int64_t const blocks = std::min<int64_t>((total + kTHREADS - 1) / kTHREADS, kMAX_NORMALIZE_BLOCKS);
    normalizeKernel<T><<<static_cast<unsigned int>(blocks), kTHREADS, 0, stream>>>(
        x, y, total, channels, shape.spatial, normScale, normShift);
    return cudaGetLastError();
}

bool validShape(BatchKalmanNormShape const& shape)
{
    if (shape.batch <= 0 || shape.channels <= 0 || shape.spatial <= 0 || shape.channels > INT_MAX)
    {
        return false;
    }
    // The element count must fit in int64_t.
    return shape.batch <= INT64_MAX / shape.channels / shape.spatial;
}

bool validTensors(BatchKalmanNormTensors const& t)
{
    return t.x != nullptr && t.priorMean != nullptr && t.priorVariance != nullptr && t.priorWeight != nullptr
        && t.scale != nullptr && t.bias != nullptr && t.y != nullptr && t.posteriorMean != nullptr
        && t.posteriorVariance != nullptr;
}

} // namespace

size_t batchKalmanNormWorkspaceSize(int64_t channels) noexcept
{
    if (channels <= 0)
    {
        return 0;
    }
    return alignUp(static_cast<size_t>(kWORKSPACE_ARRAYS * channels) * sizeof(float));
}

cudaError_t batchKalmanNormForward(ElementType type, BatchKalmanNormShape const& shape,
    BatchKalmanNormAttributes const& attributes, BatchKalmanNormTensors const& tensors, void* workspace,
    cudaStream_t stream) noexcept
{
    if (!validShape(shape) || !validTensors(tensors) || workspace == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    switch (type)
    {
    case ElementType::kFLOAT32: return launch<float>(shape, attributes, tensors, workspace, stream);
    case ElementType::kFLOAT16: return launch<__half>(shape, attributes, tensors, workspace, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace bkn
