// Loads libbkn_tensorrt_plugin.so the way IPluginRegistry::loadLibrary does (dlopen, then
// the getCreators / setLoggerFinder symbols) and checks the creator and the plugin through
// their TensorRT interfaces, with no TensorRT library in the process: every method called
// here is implemented by the plugin itself (nothing of TensorRT's runtime is needed or faked).
// Shape inference (needs TensorRT's IExprBuilder) and enqueue (needs a GPU) are not covered.
//
// usage: bkn_plugin_library_test <path/to/libbkn_tensorrt_plugin.so>
// Prints "FIELD <name> <type>" per creator field, "PASS|FAIL <check>" per check; exit 1 on a failure.
#include "NvInferRuntime.h"

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool ok, char const* what)
{
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
    gFailures += ok ? 0 : 1;
}

//! Collects the plugin's log messages, as an application's logger would.
class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            messages.emplace_back(msg);
        }
    }
    bool saw(char const* text) const
    {
        for (auto const& m : messages)
        {
            if (m.find(text) != std::string::npos)
            {
                return true;
            }
        }
        return false;
    }
    std::vector<std::string> messages;
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

char const* fieldTypeName(PluginFieldType type)
{
    switch (type)
    {
    case PluginFieldType::kFLOAT32: return "kFLOAT32";
    case PluginFieldType::kCHAR: return "kCHAR";
    default: return "other";
    }
}

PluginTensorDesc desc(std::vector<int64_t> const& dims, DataType type)
{
    PluginTensorDesc d{};
    d.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.dims.d[i] = dims[i];
    }
    d.type = type;
    d.format = TensorFormat::kLINEAR;
    return d;
}

DynamicPluginTensorDesc dynamicDesc(std::vector<int64_t> const& dims, DataType type)
{
    DynamicPluginTensorDesc d{};
    d.desc = desc(dims, type);
    d.min = d.desc.dims;
    d.opt = d.desc.dims;
    d.max = d.desc.dims;
    return d;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s <libbkn_tensorrt_plugin.so>\n", argv[0]);
        return 2;
    }
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
    check(getCreators != nullptr, "exports getCreators");
    check(setLoggerFinder != nullptr, "exports setLoggerFinder");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return 1;
    }
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    check(nbCreators == 1 && creators != nullptr && creators[0] != nullptr, "one creator");
    check(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is V3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    std::printf("CREATOR %s %s %s\n", creator->getPluginName(), creator->getPluginVersion(),
        creator->getPluginNamespace());

    PluginFieldCollection const* names = creator->getFieldNames();
    for (int32_t i = 0; names != nullptr && i < names->nbFields; ++i)
    {
        std::printf("FIELD %s %s\n", names->fields[i].name, fieldTypeName(names->fields[i].type));
    }

    // Fields exactly as TensorRT's ONNX parser (loadFields) passes node attributes:
    // floats as kFLOAT32 length 1, strings as kCHAR with the NUL counted in the length.
    float const epsilon = 1e-3F;
    float const fallbackRatio = 100.0F;
    char const version[] = "1";
    char const nameSpace[] = "bkn";
    std::vector<PluginField> fields{{"epsilon", &epsilon, PluginFieldType::kFLOAT32, 1},
        {"fallback_ratio", &fallbackRatio, PluginFieldType::kFLOAT32, 1},
        {"plugin_version", version, PluginFieldType::kCHAR, static_cast<int32_t>(sizeof(version))},
        {"plugin_namespace", nameSpace, PluginFieldType::kCHAR, static_cast<int32_t>(sizeof(nameSpace))}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("bkn_layer", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin(kBUILD) with the node's attributes");
    if (plugin == nullptr)
    {
        return 1;
    }
    check(std::strcmp(plugin->getInterfaceInfo().kind, "PLUGIN") == 0, "plugin is IPluginV3");
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core != nullptr && build != nullptr && runtime != nullptr, "core/build/runtime capabilities");
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability interface kinds");
    check(std::strcmp(core->getPluginName(), creator->getPluginName()) == 0
            && std::strcmp(core->getPluginVersion(), creator->getPluginVersion()) == 0
            && std::strcmp(core->getPluginNamespace(), creator->getPluginNamespace()) == 0,
        "plugin name/version/namespace equal the creator's");
    check(build->getNbOutputs() == 3, "three outputs");

    DataType inTypes[6] = {DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT,
        DataType::kFLOAT};
    DataType outTypes[3] = {};
    check(build->getOutputDataTypes(outTypes, 3, inTypes, 6) == 0 && outTypes[0] == DataType::kHALF
            && outTypes[1] == DataType::kFLOAT && outTypes[2] == DataType::kFLOAT,
        "output types: Y like X, posterior float32");

    int64_t const channels = 16;
    std::vector<DynamicPluginTensorDesc> io{dynamicDesc({4, channels, 5, 5}, DataType::kHALF),
        dynamicDesc({channels}, DataType::kFLOAT), dynamicDesc({channels}, DataType::kFLOAT),
        dynamicDesc({channels}, DataType::kFLOAT), dynamicDesc({channels}, DataType::kFLOAT),
        dynamicDesc({channels}, DataType::kFLOAT), dynamicDesc({4, channels, 5, 5}, DataType::kHALF),
        dynamicDesc({channels}, DataType::kFLOAT), dynamicDesc({channels}, DataType::kFLOAT)};
    bool allSupported = true;
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        allSupported = allSupported && build->supportsFormatCombination(pos, io.data(), 6, 3);
    }
    check(allSupported, "supports float16 X/Y with float32 statistics");
    io[6].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(6, io.data(), 6, 3), "rejects Y whose type differs from X");
    io[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, io.data(), 6, 3), "rejects int8 X");
    io[0].desc.type = DataType::kHALF;
    io[1].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(1, io.data(), 6, 3), "rejects float16 statistics");
    io[1].desc.type = DataType::kFLOAT;
    io[6].desc.type = DataType::kHALF;

    check(build->configurePlugin(io.data(), 6, io.data() + 6, 3) == 0, "configurePlugin accepts (N, C, H, W) + (C,)");
    check(build->getWorkspaceSize(io.data(), 6, io.data() + 6, 3) >= 4 * channels * sizeof(float),
        "workspace holds 4 float arrays of C");
    io[2] = dynamicDesc({channels + 1}, DataType::kFLOAT);
    logger.messages.clear();
    check(build->configurePlugin(io.data(), 6, io.data() + 6, 3) != 0 && logger.saw("prior_variance"),
        "configurePlugin rejects prior_variance of the wrong length, naming it");

    PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
    bool serializedOk = serialized != nullptr && serialized->nbFields == 2;
    for (int32_t i = 0; serializedOk && i < serialized->nbFields; ++i)
    {
        PluginField const& f = serialized->fields[i];
        float const expected = std::strcmp(f.name, "epsilon") == 0 ? epsilon : fallbackRatio;
        serializedOk = f.type == PluginFieldType::kFLOAT32 && f.length == 1
            && *static_cast<float const*>(f.data) == expected;
    }
    check(serializedOk, "getFieldsToSerialize: epsilon and fallback_ratio round-trip");
    IPluginV3* restored = creator->createPlugin("bkn_layer", serialized, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "createPlugin(kRUNTIME) from the serialized fields");
    if (restored != nullptr)
    {
        auto* restoredBuild
            = static_cast<IPluginV3OneBuild*>(restored->getCapabilityInterface(PluginCapabilityType::kBUILD));
        check(std::strcmp(restoredBuild->getMetadataString(), build->getMetadataString()) == 0,
            "restored plugin has the same attributes");
        delete restored;
    }
    IPluginV3* cloned = runtime->attachToContext(nullptr);
    check(cloned != nullptr && cloned != plugin, "attachToContext returns a clone");
    delete cloned;
    std::printf("METADATA %s\n", build->getMetadataString());

    char const otherVersion[] = "2";
    fields[2] = PluginField{"plugin_version", otherVersion, PluginFieldType::kCHAR, 2};
    logger.messages.clear();
    check(creator->createPlugin("bkn_layer", &fc, TensorRTPhase::kBUILD) == nullptr && logger.saw("plugin_version"),
        "refuses a node asking for another plugin_version, naming it");
    fields[2] = PluginField{"plugin_version", version, PluginFieldType::kCHAR, 2};
    fields[1] = PluginField{"momentum", &fallbackRatio, PluginFieldType::kFLOAT32, 1};
    logger.messages.clear();
    check(creator->createPlugin("bkn_layer", &fc, TensorRTPhase::kBUILD) == nullptr && logger.saw("momentum"),
        "refuses an unknown field, naming it");
    float const negative = -1.0F;
    fields[1] = PluginField{"epsilon", &negative, PluginFieldType::kFLOAT32, 1};
    check(creator->createPlugin("bkn_layer", &fc, TensorRTPhase::kBUILD) == nullptr, "refuses epsilon < 0");
    IPluginV3* defaults = creator->createPlugin("bkn_layer", nullptr, TensorRTPhase::kBUILD);
    check(defaults != nullptr, "createPlugin without fields uses the defaults");
    delete defaults;

    delete plugin;
    std::printf("%s (%d failures)\n", gFailures == 0 ? "OK" : "FAILED", gFailures);
    return gFailures == 0 ? 0 : 1;
}
