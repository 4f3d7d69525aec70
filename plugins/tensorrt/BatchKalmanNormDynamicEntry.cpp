// Entry points of libbkn_tensorrt_plugin.so, the library for IPluginRegistry::loadLibrary
// (Python: trt.get_plugin_registry().load_library), trtexec --dynamicPlugins and
// --setPluginsToSerialize. TensorRT looks these two symbols up by name after dlopen and
// registers the creators itself; this library registers nothing on its own (see
// BatchKalmanNormStaticRegistration.cpp for the other library, and README.md for why two).
#include "BatchKalmanNormPlugin.h"

#define BKN_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

//! The creators in this library (one), owned by the library.
BKN_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static bkn::plugin::BatchKalmanNormPluginCreator sCreator;
    static nvinfer1::IPluginCreatorInterface* const kCREATORS[] = {&sCreator};
    nbCreators = 1;
    return kCREATORS;
}

//! Called by TensorRT with the finder through which the plugin reaches the caller's logger.
BKN_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    bkn::plugin::setLoggerFinder(finder);
}
