// Static registration for libbkn_tensorrt_plugin_static.so: dlopen'ing the library
// (trtexec --staticPlugins, or a C++ application that links libnvinfer and links or dlopens
// this library) registers the creator with getPluginRegistry() while the library loads.
//
// This is what REGISTER_TENSORRT_PLUGIN(BatchKalmanNormPluginCreator) does, except for one
// argument: the macro's PluginRegistrar calls registerCreator(creator, "") with an empty
// library namespace, while our creator's namespace is "bkn" (the nodes' plugin_namespace).
// TensorRT's own registrations pass the creator's namespace there (initLibNvInferPlugins sets
// both to libNamespace; trtSafeExec passes the plugin's namespace), so this registrar does too.
//
// getPluginRegistry and getLogger are libnvinfer symbols, left undefined here and resolved
// when the library is loaded into a process that has libnvinfer.
#include "BatchKalmanNormFields.h"
#include "BatchKalmanNormPlugin.h"

namespace
{

nvinfer1::ILogger* tensorrtGlobalLogger()
{
    return getLogger();
}

class BatchKalmanNormRegistrar
{
public:
    BatchKalmanNormRegistrar()
    {
        bkn::plugin::setLoggerGetter(&tensorrtGlobalLogger);
        if (!getPluginRegistry()->registerCreator(mCreator, bkn::fields::kPLUGIN_NAMESPACE))
        {
            bkn::plugin::logMessage(nvinfer1::ILogger::Severity::kERROR,
                "could not register the creator (already registered, e.g. by libbkn_tensorrt_plugin.so?)");
        }
    }

private:
    bkn::plugin::BatchKalmanNormPluginCreator mCreator;
};

BatchKalmanNormRegistrar gRegistrar;

} // namespace
