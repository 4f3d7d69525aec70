// TensorRT IPluginV3 plugin for the ONNX op ai.bkn::BatchKalmanNorm (one BKN step:
// batch statistics, Kalman update with the given prior, normalization).
//
// Name, version, namespace, inputs, outputs and fields come from BatchKalmanNormFields.h,
// generated from bkn_export/export/op/op_spec.py. The math is bkn_export/functional.py:
// batch_kalman_norm; the kernels are in batchKalmanNormKernel.cu.
//
// I/O (all kLINEAR):
//   inputs   X (N, C, *) float32|float16; prior_mean, prior_variance, prior_weight, scale, B (C,) float32
//   outputs  Y like X; posterior_mean, posterior_variance (C,) float32
// Fields: epsilon (float32), fallback_ratio (float32), plugin_version, plugin_namespace (char;
// when given they must equal the registered version / namespace).
#ifndef BKN_BATCH_KALMAN_NORM_PLUGIN_H
#define BKN_BATCH_KALMAN_NORM_PLUGIN_H

#include "NvInferRuntime.h"

#include <string>
#include <vector>

namespace bkn
{
namespace plugin
{

//! Logging: through the ILoggerFinder given to setLoggerFinder() (plugin library loaded by
//! IPluginRegistry::loadLibrary), else through the getter installed by the statically
//! registering library (TensorRT's global logger), else to stderr.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void setLoggerGetter(nvinfer1::ILogger* (*getter)()) noexcept;
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

class BatchKalmanNormPlugin final : public nvinfer1::IPluginV3,
                                    public nvinfer1::IPluginV3OneCore,
                                    public nvinfer1::IPluginV3OneBuild,
                                    public nvinfer1::IPluginV3OneRuntime
{
public:
    BatchKalmanNormPlugin(std::string layerName, float epsilon, float fallbackRatio);
    BatchKalmanNormPlugin(BatchKalmanNormPlugin const& other);
    BatchKalmanNormPlugin& operator=(BatchKalmanNormPlugin const&) = delete;
    ~BatchKalmanNormPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! 0 when X is (N, C, *) and every (C,) input has C elements (unknown dims pass), else -1 (logged).
    int32_t checkShapes(nvinfer1::Dims const* const* inputDims, int32_t nbInputs) const noexcept;
    void logError(std::string const& message) const noexcept;

    std::string mLayerName;
    float mEpsilon;
    float mFallbackRatio;
    std::string mMetadata;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollectionToSerialize{};
};

class BatchKalmanNormPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    BatchKalmanNormPluginCreator();
    ~BatchKalmanNormPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace bkn

#endif // BKN_BATCH_KALMAN_NORM_PLUGIN_H
