// Static registration for libbkn_tensorrt_plugin_static.so: dlopen'ing the library
// (trtexec --staticPlugins, ctypes.CDLL(..., RTLD_GLOBAL), or linking it into an application
// that links libnvinfer) runs REGISTER_TENSORRT_PLUGIN, which registers the creator with
// getPluginRegistry() under the empty library namespace (the creator's own namespace, "bkn",
// is what lookups match). getPluginRegistry and getLogger are libnvinfer symbols left
// undefined here and resolved when the library is loaded into a process that has libnvinfer.
#include "BatchKalmanNormPlugin.h"

namespace
{

nvinfer1::ILogger* tensorrtGlobalLogger()
{
    return getLogger();
}

struct LoggerInstaller
{
    LoggerInstaller()
    {
        bkn::plugin::setLoggerGetter(&tensorrtGlobalLogger);
    }
};

LoggerInstaller const gLoggerInstaller{};

} // namespace

using bkn::plugin::BatchKalmanNormPluginCreator;
REGISTER_TENSORRT_PLUGIN(BatchKalmanNormPluginCreator);
