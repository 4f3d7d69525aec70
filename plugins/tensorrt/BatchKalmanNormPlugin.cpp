// Implementation of the BatchKalmanNorm IPluginV3 and its creator; see BatchKalmanNormPlugin.h.
#include "BatchKalmanNormPlugin.h"

#include "BatchKalmanNormFields.h"
#include "batchKalmanNormKernel.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <iostream>
#include <sstream>

using namespace nvinfer1;

namespace bkn
{
namespace plugin
{
namespace
{

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
std::atomic<ILogger* (*) ()> gLoggerGetter{nullptr};

constexpr int32_t kNB_IO = fields::kNB_INPUTS + fields::kNB_OUTPUTS;

std::string shapeString(Dims const& dims)
{
    std::ostringstream text;
    text << "(";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text << (i ? ", " : "") << dims.d[i];
    }
    text << (dims.nbDims == 1 ? ",)" : ")");
    return text.str();
}

//! Parse the creator's fields into (epsilon, fallbackRatio); false with `error` set on a bad field.
bool parseFields(PluginFieldCollection const* fc, float& epsilon, float& fallbackRatio, std::string& error)
{
    epsilon = fields::kFIELDS[fields::kFIELD_EPSILON].floatDefault;
    fallbackRatio = fields::kFIELDS[fields::kFIELD_FALLBACK_RATIO].floatDefault;
    if (fc == nullptr)
    {
        return true;
    }
    if (fc->nbFields > 0 && fc->fields == nullptr)
    {
        error = "the field collection has no fields array";
        return false;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        int32_t index = -1;
        for (int32_t j = 0; field.name != nullptr && j < fields::kNB_FIELDS; ++j)
        {
            if (std::strcmp(field.name, fields::kFIELDS[j].name) == 0)
            {
                index = j;
            }
        }
        if (index < 0)
        {
            std::string known;
            for (int32_t j = 0; j < fields::kNB_FIELDS; ++j)
            {
                known += (j ? ", " : "") + std::string(fields::kFIELDS[j].name);
            }
            error = "unknown field '" + std::string(field.name ? field.name : "<null>") + "'; the fields are " + known;
            return false;
        }
        fields::FieldSpec const& spec = fields::kFIELDS[index];
        if (field.data == nullptr)
        {
            error = "field '" + std::string(spec.name) + "' has no data";
            return false;
        }
        if (spec.kind == fields::FieldKind::kFLOAT32)
        {
            if (field.type != PluginFieldType::kFLOAT32 || field.length != 1)
            {
                error = "field '" + std::string(spec.name) + "' must be one float32 (PluginFieldType::kFLOAT32, length 1)";
                return false;
            }
            float const value = *static_cast<float const*>(field.data);
            (index == fields::kFIELD_EPSILON ? epsilon : fallbackRatio) = value;
        }
        else
        {
            if (field.type != PluginFieldType::kCHAR || field.length < 0)
            {
                error = "field '" + std::string(spec.name) + "' must be a string (PluginFieldType::kCHAR)";
                return false;
            }
            char const* text = static_cast<char const*>(field.data);
            std::string const value(text, strnlen(text, static_cast<size_t>(field.length)));
            if (value != spec.stringDefault)
            {
                error = "the node asks for " + std::string(spec.name) + " '" + value + "' but this library provides '"
                    + spec.stringDefault + "'; export the model for this plugin or build the matching plugin";
                return false;
            }
        }
    }
    if (!std::isfinite(epsilon) || epsilon < 0.0F)
    {
        error = "epsilon must be finite and >= 0, got " + std::to_string(epsilon);
        return false;
    }
    if (std::isnan(fallbackRatio) || fallbackRatio < 0.0F)
    {
        // +inf is valid (the rule then fires only on an infinite ratio), as in PyTorch and the ONNX function body.
        error = "fallback_ratio must be >= 0 (0 disables the rule), got " + std::to_string(fallbackRatio);
        return false;
    }
    return true;
}

} // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept
{
    if (finder != nullptr)
    {
        gLoggerFinder.store(finder);
    }
}

void setLoggerGetter(ILogger* (*getter)()) noexcept
{
    gLoggerGetter.store(getter);
}

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        ILogger* logger = nullptr;
        if (ILoggerFinder* finder = gLoggerFinder.load())
        {
            logger = finder->findLogger();
        }
        if (logger == nullptr)
        {
            if (ILogger* (*getter)() = gLoggerGetter.load())
            {
                logger = getter();
            }
        }
        std::string const text = std::string("[") + fields::kPLUGIN_NAMESPACE + "::" + fields::kPLUGIN_NAME + "] " + message;
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else
        {
            std::cerr << text << std::endl;
        }
    }
    catch (...)
    {
        // Logging must never throw out of a noexcept plugin method.
    }
}

// ---------------------------------------------------------------------------------- plugin

BatchKalmanNormPlugin::BatchKalmanNormPlugin(std::string layerName, float epsilon, float fallbackRatio)
    : mLayerName(std::move(layerName))
    , mEpsilon(epsilon)
    , mFallbackRatio(fallbackRatio)
{
    std::ostringstream metadata;
    metadata << fields::kFIELDS[fields::kFIELD_EPSILON].name << "=" << mEpsilon << ", "
             << fields::kFIELDS[fields::kFIELD_FALLBACK_RATIO].name << "=" << mFallbackRatio;
    mMetadata = metadata.str();
}

// The serialization fields point into the object that owns them: a copy rebuilds them.
BatchKalmanNormPlugin::BatchKalmanNormPlugin(BatchKalmanNormPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mLayerName(other.mLayerName)
    , mEpsilon(other.mEpsilon)
    , mFallbackRatio(other.mFallbackRatio)
    , mMetadata(other.mMetadata)
{
}

void BatchKalmanNormPlugin::logError(std::string const& message) const noexcept
{
    try
    {
        logMessage(ILogger::Severity::kERROR, "layer '" + mLayerName + "': " + message);
    }
    catch (...)
    {
    }
}

IPluginCapability* BatchKalmanNormPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* BatchKalmanNormPlugin::clone() noexcept
{
    try
    {
        return new BatchKalmanNormPlugin(*this);
    }
    catch (...)
    {
        logError("clone failed (out of memory)");
        return nullptr;
    }
}

char const* BatchKalmanNormPlugin::getPluginName() const noexcept
{
    return fields::kPLUGIN_NAME;
}

char const* BatchKalmanNormPlugin::getPluginVersion() const noexcept
{
    return fields::kPLUGIN_VERSION;
}

char const* BatchKalmanNormPlugin::getPluginNamespace() const noexcept
{
    return fields::kPLUGIN_NAMESPACE;
}

int32_t BatchKalmanNormPlugin::getNbOutputs() const noexcept
{
    return fields::kNB_OUTPUTS;
}

int32_t BatchKalmanNormPlugin::checkShapes(Dims const* const* inputDims, int32_t nbInputs) const noexcept
{
    try
    {
        if (nbInputs != fields::kNB_INPUTS)
        {
            logError("expects " + std::to_string(fields::kNB_INPUTS) + " inputs, got " + std::to_string(nbInputs));
            return -1;
        }
        Dims const& x = *inputDims[fields::kINPUT_X];
        if (x.nbDims < 2)
        {
            logError("input 'X' must be (N, C, *), got rank " + std::to_string(x.nbDims) + " " + shapeString(x));
            return -1;
        }
        int64_t const channels = x.d[1];
        for (int32_t i = fields::kINPUT_X + 1; i < fields::kNB_INPUTS; ++i)
        {
            Dims const& d = *inputDims[i];
            bool const rankOk = d.nbDims == 1;
            bool const sizeOk = !rankOk || channels < 0 || d.d[0] < 0 || d.d[0] == channels;
            if (!rankOk || !sizeOk)
            {
                logError(std::string("input '") + fields::kINPUT_NAMES[i] + "' must be (C,) with C = X.shape[1] = "
                    + std::to_string(channels) + ", got " + shapeString(d));
                return -1;
            }
        }
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

int32_t BatchKalmanNormPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != fields::kNB_INPUTS || nbOutputs != fields::kNB_OUTPUTS)
    {
        logError("configurePlugin: unexpected number of inputs/outputs");
        return -1;
    }
    Dims const* dims[fields::kNB_INPUTS];
    for (int32_t i = 0; i < fields::kNB_INPUTS; ++i)
    {
        dims[i] = &in[i].desc.dims;
    }
    return checkShapes(dims, nbInputs);
}

int32_t BatchKalmanNormPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != fields::kNB_OUTPUTS
        || nbInputs != fields::kNB_INPUTS)
    {
        logError("getOutputDataTypes: unexpected number of inputs/outputs");
        return -1;
    }
    outputTypes[fields::kOUTPUT_Y] = inputTypes[fields::kINPUT_X];
    outputTypes[fields::kOUTPUT_POSTERIOR_MEAN] = DataType::kFLOAT;
    outputTypes[fields::kOUTPUT_POSTERIOR_VARIANCE] = DataType::kFLOAT;
    return 0;
}

int32_t BatchKalmanNormPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /* exprBuilder */) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != fields::kNB_INPUTS || nbOutputs != fields::kNB_OUTPUTS)
    {
        logError("getOutputShapes: unexpected number of inputs/outputs");
        return -1;
    }
    DimsExprs const& x = inputs[fields::kINPUT_X];
    if (x.nbDims < 2)
    {
        logError("input 'X' must be (N, C, *), got rank " + std::to_string(x.nbDims));
        return -1;
    }
    outputs[fields::kOUTPUT_Y] = x;
    for (int32_t index : {fields::kOUTPUT_POSTERIOR_MEAN, fields::kOUTPUT_POSTERIOR_VARIANCE})
    {
        outputs[index].nbDims = 1;
        outputs[index].d[0] = x.d[1];
    }
    return 0;
}

bool BatchKalmanNormPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != fields::kNB_INPUTS || nbOutputs != fields::kNB_OUTPUTS || pos < 0
        || pos >= kNB_IO)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == fields::kINPUT_X)
    {
        return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    }
    if (pos == fields::kNB_INPUTS + fields::kOUTPUT_Y)
    {
        return desc.type == inOut[fields::kINPUT_X].desc.type;
    }
    // Statistics inputs and posterior outputs are float32 (the op's type U for float/float16 X).
    return desc.type == DataType::kFLOAT;
}

size_t BatchKalmanNormPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /* outputs */, int32_t /* nbOutputs */) const noexcept
{
    if (inputs == nullptr || nbInputs != fields::kNB_INPUTS || inputs[fields::kINPUT_X].max.nbDims < 2)
    {
        return 0;
    }
    return batchKalmanNormWorkspaceSize(inputs[fields::kINPUT_X].max.d[1]);
}

char const* BatchKalmanNormPlugin::getMetadataString() noexcept
{
    return mMetadata.c_str();
}

int32_t BatchKalmanNormPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != fields::kNB_INPUTS || nbOutputs != fields::kNB_OUTPUTS)
    {
        logError("onShapeChange: unexpected number of inputs/outputs");
        return -1;
    }
    Dims const* dims[fields::kNB_INPUTS];
    for (int32_t i = 0; i < fields::kNB_INPUTS; ++i)
    {
        dims[i] = &in[i].dims;
    }
    return checkShapes(dims, nbInputs);
}

int32_t BatchKalmanNormPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /* outputDesc */,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        logError("enqueue: missing tensors");
        return -1;
    }
    Dims const& x = inputDesc[fields::kINPUT_X].dims;
    if (x.nbDims < 2)
    {
        logError("enqueue: input 'X' must be (N, C, *)");
        return -1;
    }
    int64_t spatial = 1;
    for (int32_t i = 2; i < x.nbDims; ++i)
    {
        spatial *= x.d[i];
    }
    DataType const type = inputDesc[fields::kINPUT_X].type;
    if (type != DataType::kFLOAT && type != DataType::kHALF)
    {
        logError("enqueue: input 'X' must be float32 or float16");
        return -1;
    }
    BatchKalmanNormTensors const tensors{
        inputs[fields::kINPUT_X],
        static_cast<float const*>(inputs[fields::kINPUT_PRIOR_MEAN]),
        static_cast<float const*>(inputs[fields::kINPUT_PRIOR_VARIANCE]),
        static_cast<float const*>(inputs[fields::kINPUT_PRIOR_WEIGHT]),
        static_cast<float const*>(inputs[fields::kINPUT_SCALE]),
        static_cast<float const*>(inputs[fields::kINPUT_B]),
        outputs[fields::kOUTPUT_Y],
        static_cast<float*>(outputs[fields::kOUTPUT_POSTERIOR_MEAN]),
        static_cast<float*>(outputs[fields::kOUTPUT_POSTERIOR_VARIANCE]),
    };
    cudaError_t const status = batchKalmanNormForward(type == DataType::kHALF ? ElementType::kFLOAT16 : ElementType::kFLOAT32,
        BatchKalmanNormShape{x.d[0], x.d[1], spatial}, BatchKalmanNormAttributes{mEpsilon, mFallbackRatio}, tensors,
        workspace, stream);
    if (status != cudaSuccess)
    {
        logError(std::string("enqueue failed for X of shape ") + shapeString(x) + ": " + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* BatchKalmanNormPlugin::attachToContext(IPluginResourceContext* /* context */) noexcept
{
    // No per-context resources: the workspace comes from TensorRT at enqueue.
    return clone();
}

PluginFieldCollection const* BatchKalmanNormPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mFieldsToSerialize.clear();
        mFieldsToSerialize.emplace_back(
            fields::kFIELDS[fields::kFIELD_EPSILON].name, &mEpsilon, PluginFieldType::kFLOAT32, 1);
        mFieldsToSerialize.emplace_back(
            fields::kFIELDS[fields::kFIELD_FALLBACK_RATIO].name, &mFallbackRatio, PluginFieldType::kFLOAT32, 1);
        mFieldCollectionToSerialize.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
        mFieldCollectionToSerialize.fields = mFieldsToSerialize.data();
        return &mFieldCollectionToSerialize;
    }
    catch (...)
    {
        logError("getFieldsToSerialize failed (out of memory)");
        return nullptr;
    }
}

// ---------------------------------------------------------------------------------- creator

BatchKalmanNormPluginCreator::BatchKalmanNormPluginCreator()
{
    for (fields::FieldSpec const& spec : fields::kFIELDS)
    {
        bool const isFloat = spec.kind == fields::FieldKind::kFLOAT32;
        mFieldNames.emplace_back(
            spec.name, nullptr, isFloat ? PluginFieldType::kFLOAT32 : PluginFieldType::kCHAR, isFloat ? 1 : 0);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* BatchKalmanNormPluginCreator::getPluginName() const noexcept
{
    return fields::kPLUGIN_NAME;
}

char const* BatchKalmanNormPluginCreator::getPluginVersion() const noexcept
{
    return fields::kPLUGIN_VERSION;
}

char const* BatchKalmanNormPluginCreator::getPluginNamespace() const noexcept
{
    return fields::kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* BatchKalmanNormPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* BatchKalmanNormPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /* phase */) noexcept
{
    // Both phases read the same fields: the build phase gets the node's attributes from the
    // ONNX parser, the runtime phase what getFieldsToSerialize() wrote into the engine.
    try
    {
        std::string const layerName = name != nullptr ? name : "";
        float epsilon = 0.0F;
        float fallbackRatio = 0.0F;
        std::string error;
        if (!parseFields(fc, epsilon, fallbackRatio, error))
        {
            logMessage(ILogger::Severity::kERROR, "layer '" + layerName + "': " + error);
            return nullptr;
        }
        return new BatchKalmanNormPlugin(layerName, epsilon, fallbackRatio);
    }
    catch (...)
    {
        logMessage(ILogger::Severity::kERROR, "createPlugin failed (out of memory)");
        return nullptr;
    }
}

} // namespace plugin
} // namespace bkn
