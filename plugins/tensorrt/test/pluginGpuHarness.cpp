// Runs the BatchKalmanNorm plugin's own code the way a TensorRT engine would, without TensorRT's
// library: the plugin library is dlopen'ed as IPluginRegistry::loadLibrary does, the plugin is
// created through its creator, and then, per reference case,
//
//   build phase    getOutputDataTypes, getOutputShapes (with the IExprBuilder test double below),
//                  supportsFormatCombination, configurePlugin (min/opt/max), getWorkspaceSize
//   runtime phase  createPlugin(kRUNTIME) from getFieldsToSerialize, attachToContext, onShapeChange,
//                  enqueue on device buffers (+ guard bytes behind every output), then the outputs
//                  are compared with the float64 functional reference written by
//                  benchmarks/gpu/plugin_reference.py (bkn_export.functional.batch_kalman_norm).
//
// usage: bkn_plugin_gpu_harness <libbkn_tensorrt_plugin.so> <reference_dir> [--host-only]
//   --host-only   everything but enqueue (for machines without a GPU: the CPU test suite)
// Prints "PASS|FAIL <check>" per check and one "CASE ..." line per enqueued case with the largest
// errors; exit 0 all passed, 1 a check failed, 2 bad arguments / unreadable files, 3 no CUDA
// device (and no --host-only).
//
// TEST DOUBLE. IExprBuilder and IDimensionExpr are implemented by TensorRT's library ("do not
// inherit", NvInferRuntime.h). Their public methods are inline forwarders to a protected `mImpl`
// pointer of type apiv::VExprBuilder* / apiv::VDimensionExpr* (NvInferImpl.h). The doubles below
// subclass the interfaces and point `mImpl` at our own apiv implementations. This layout was read
// from, and is compiled against, the headers of TensorRT 11.1.0.106 (NVIDIA/TensorRT commit
// a892d222, include/NvInferRuntime.h and include/NvInferImpl.h); it is a test double tied to that
// header version, not a TensorRT implementation. If a later header changes apiv::VExprBuilder or
// apiv::VDimensionExpr, this file stops compiling (pure virtuals) rather than misbehaving.
#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

static_assert(NV_TENSORRT_MAJOR >= 10, "IPluginV3 and apiv::VDimensionExpr::isSizeTensor need TensorRT >= 10 headers");

using namespace nvinfer1;

namespace
{

int gFailures = 0;

bool check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
    return ok;
}

// ------------------------------------------------------------------------------ test double

//! apiv side of one dimension expression: a constant, or a symbol (an input's unknown dim, or
//! an operation on a symbol) known only by its text.
class DimensionExprImplDouble final : public apiv::VDimensionExpr
{
public:
    DimensionExprImplDouble(bool constant, int64_t value, bool sizeTensor)
        : mConstant(constant)
        , mValue(value)
        , mSizeTensor(sizeTensor)
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    //! NvInferRuntime.h: "If !isConstant(), return std::numeric_limits<int64_t>::min()".
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return mSizeTensor;
    }

private:
    bool mConstant;
    int64_t mValue;
    bool mSizeTensor;
};

//! IDimensionExpr test double (see the file comment): forwards through the protected mImpl.
class DimensionExprDouble final : public IDimensionExpr
{
public:
    DimensionExprDouble(bool constant, int64_t value, std::string text, bool sizeTensor = false)
        : mImplDouble(constant, value, sizeTensor)
        , mText(std::move(text))
    {
        mImpl = &mImplDouble;
    }
    ~DimensionExprDouble() noexcept override = default;
    std::string const& text() const
    {
        return mText;
    }

private:
    DimensionExprImplDouble mImplDouble;
    std::string mText;
};

std::string textOf(IDimensionExpr const& e)
{
    auto const* d = dynamic_cast<DimensionExprDouble const*>(&e);
    return d != nullptr ? d->text() : std::string("<foreign expression>");
}

//! Owns every expression it hands out, like TensorRT's builder (valid for the builder's life).
class ExprBuilderImplDouble final : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        ++calls;
        return make(true, value, std::to_string(value));
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        ++calls;
        static char const* const kNames[] = {"+", "*", "max", "min", "-", "==", "<", "floordiv", "ceildiv"};
        auto const index = static_cast<int32_t>(op);
        std::string const name = index >= 0 && index < 9 ? kNames[index] : "?";
        std::string const text = "(" + textOf(first) + " " + name + " " + textOf(second) + ")";
        if (!first.isConstant() || !second.isConstant())
        {
            return make(false, 0, text);
        }
        int64_t const a = first.getConstantValue();
        int64_t const b = second.getConstantValue();
        int64_t value = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: value = a + b; break;
        case DimensionOperation::kPROD: value = a * b; break;
        case DimensionOperation::kMAX: value = a > b ? a : b; break;
        case DimensionOperation::kMIN: value = a < b ? a : b; break;
        case DimensionOperation::kSUB: value = a - b; break;
        case DimensionOperation::kEQUAL: value = a == b ? 1 : 0; break;
        case DimensionOperation::kLESS: value = a < b ? 1 : 0; break;
        case DimensionOperation::kFLOOR_DIV: value = b == 0 ? 0 : (a / b - ((a % b != 0) && ((a < 0) != (b < 0)))); break;
        case DimensionOperation::kCEIL_DIV: value = b == 0 ? 0 : (a / b + ((a % b != 0) && ((a < 0) == (b < 0)))); break;
        }
        return make(true, value, text);
    }
    IDimensionExpr const* declareSizeTensor(int32_t outputIndex, IDimensionExpr const& opt, IDimensionExpr const& upper) override
    {
        ++calls;
        return make(false, 0,
            "size_tensor(" + std::to_string(outputIndex) + ", opt=" + textOf(opt) + ", upper=" + textOf(upper) + ")", true);
    }
    //! A symbolic dimension, as TensorRT gives for an input's runtime dimension.
    IDimensionExpr const* symbol(std::string const& name)
    {
        return make(false, 0, name);
    }
    int32_t calls{0};

private:
    IDimensionExpr const* make(bool constant, int64_t value, std::string text, bool sizeTensor = false)
    {
        mOwned.push_back(std::make_unique<DimensionExprDouble>(constant, value, std::move(text), sizeTensor));
        return mOwned.back().get();
    }
    std::vector<std::unique_ptr<DimensionExprDouble>> mOwned;
};

//! IExprBuilder test double (see the file comment).
class ExprBuilderDouble final : public IExprBuilder
{
public:
    ExprBuilderDouble()
    {
        mImpl = &impl;
    }
    ~ExprBuilderDouble() noexcept override = default;
    ExprBuilderImplDouble impl;
};

// ------------------------------------------------------------------------------ helpers

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

struct ReferenceCase
{
    std::string name;
    DataType type{DataType::kFLOAT};
    float epsilon{0.0F};
    float fallbackRatio{0.0F};
    std::vector<int64_t> shape;
    std::vector<char> x;          // X as stored (float32 or IEEE half)
    std::vector<float> params;    // 5 x C
    std::vector<double> expected; // Y, posterior_mean, posterior_variance

    int64_t channels() const
    {
        return shape[1];
    }
    int64_t numel() const
    {
        int64_t n = 1;
        for (int64_t d : shape)
        {
            n *= d;
        }
        return n;
    }
    size_t elementSize() const
    {
        return type == DataType::kHALF ? 2 : 4;
    }
};

bool readFile(std::string const& path, std::vector<char>& bytes)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        return false;
    }
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return true;
}

//! Reads manifest.txt and the case files; prints the reason and returns false on any problem.
bool readCases(std::string const& dir, std::vector<ReferenceCase>& cases)
{
    std::ifstream manifest(dir + "/manifest.txt");
    if (!manifest)
    {
        std::fprintf(stderr, "cannot read %s/manifest.txt (write it with benchmarks/gpu/plugin_reference.py)\n", dir.c_str());
        return false;
    }
    std::string line;
    while (std::getline(manifest, line))
    {
        if (line.empty())
        {
            continue;
        }
        std::istringstream fields(line);
        std::string tag, type;
        ReferenceCase c;
        int32_t rank = 0;
        fields >> tag >> c.name >> type >> c.epsilon >> c.fallbackRatio >> rank;
        c.shape.resize(static_cast<size_t>(rank > 0 ? rank : 0));
        for (auto& d : c.shape)
        {
            fields >> d;
        }
        if (!fields || tag != "case" || (type != "f32" && type != "f16") || rank < 2)
        {
            std::fprintf(stderr, "%s/manifest.txt: malformed line '%s'\n", dir.c_str(), line.c_str());
            return false;
        }
        c.type = type == "f16" ? DataType::kHALF : DataType::kFLOAT;
        std::vector<char> params, expected;
        std::string const base = dir + "/" + c.name;
        if (!readFile(base + ".x", c.x) || !readFile(base + ".params", params) || !readFile(base + ".expected", expected))
        {
            std::fprintf(stderr, "%s.{x,params,expected}: cannot read\n", base.c_str());
            return false;
        }
        size_t const n = static_cast<size_t>(c.numel());
        size_t const ch = static_cast<size_t>(c.channels());
        if (c.x.size() != n * c.elementSize() || params.size() != 5 * ch * sizeof(float)
            || expected.size() != (n + 2 * ch) * sizeof(double))
        {
            std::fprintf(stderr, "%s: file sizes do not match the manifest's shape\n", base.c_str());
            return false;
        }
        c.params.resize(5 * ch);
        std::memcpy(c.params.data(), params.data(), params.size());
        c.expected.resize(n + 2 * ch);
        std::memcpy(c.expected.data(), expected.data(), expected.size());
        cases.push_back(std::move(c));
    }
    if (cases.empty())
    {
        std::fprintf(stderr, "%s/manifest.txt lists no case\n", dir.c_str());
        return false;
    }
    return true;
}

std::string shapeText(std::vector<int64_t> const& shape)
{
    std::string text;
    for (size_t i = 0; i < shape.size(); ++i)
    {
        text += (i ? "x" : "") + std::to_string(shape[i]);
    }
    return text;
}

//! IEEE binary16 bits -> float (host side; no CUDA half header needed).
float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h >> 15) << 31;
    int32_t exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF;
    uint32_t bits = 0;
    if (exponent == 0x1F)
    {
        bits = sign | 0x7F800000U | (mantissa << 13);
    }
    else if (exponent == 0)
    {
        if (mantissa == 0)
        {
            bits = sign;
        }
        else
        {
            exponent = 1;
            while ((mantissa & 0x400) == 0)
            {
                mantissa <<= 1;
                --exponent;
            }
            mantissa &= 0x3FF;
            bits = sign | static_cast<uint32_t>(exponent + 112) << 23 | (mantissa << 13);
        }
    }
    else
    {
        bits = sign | static_cast<uint32_t>(exponent + 112) << 23 | (mantissa << 13);
    }
    float f = 0.0F;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

Dims dimsOf(std::vector<int64_t> const& shape)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i)
    {
        d.d[i] = shape[i];
    }
    return d;
}

//! The 9 I/O descriptions (6 inputs, 3 outputs) of one case, X's batch dim replaced by `batch`.
std::vector<PluginTensorDesc> ioDescs(ReferenceCase const& c, int64_t batch)
{
    std::vector<int64_t> x = c.shape;
    x[0] = batch;
    std::vector<PluginTensorDesc> io(9);
    for (size_t i = 0; i < io.size(); ++i)
    {
        bool const isX = i == 0 || i == 6;
        io[i].dims = isX ? dimsOf(x) : dimsOf({c.channels()});
        io[i].type = isX ? c.type : DataType::kFLOAT;
        io[i].format = TensorFormat::kLINEAR;
        io[i].scale = 1.0F;
    }
    return io;
}

IPluginV3OneBuild* buildOf(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}

IPluginV3OneRuntime* runtimeOf(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

// ------------------------------------------------------------------------------ checks

//! getOutputShapes through the test double: Y has X's expressions (the same objects), the
//! posteriors are (C,) with X's channel expression; a rank-1 X is refused.
void checkOutputShapes(IPluginV3OneBuild* build, RecordingLogger& logger)
{
    ExprBuilderDouble builder;
    IDimensionExpr const* batch = builder.impl.symbol("N");
    IDimensionExpr const* channels = builder.impl.constant(6);
    IDimensionExpr const* height = builder.impl.symbol("H");
    IDimensionExpr const* width = builder.impl.constant(5);
    DimsExprs in[6]{};
    in[0].nbDims = 4;
    in[0].d[0] = batch;
    in[0].d[1] = channels;
    in[0].d[2] = height;
    in[0].d[3] = width;
    for (int32_t i = 1; i < 6; ++i)
    {
        in[i].nbDims = 1;
        in[i].d[0] = builder.impl.constant(6);
    }
    DimsExprs out[3]{};
    int32_t const callsBefore = builder.impl.calls;
    int32_t const status = build->getOutputShapes(in, 6, nullptr, 0, out, 3, builder);
    check(status == 0, "getOutputShapes with a symbolic (N, 6, H, 5) X returns 0");
    bool sameY = out[0].nbDims == 4;
    for (int32_t i = 0; sameY && i < 4; ++i)
    {
        sameY = out[0].d[i] == in[0].d[i];
    }
    check(sameY, "getOutputShapes: Y has X's dimension expressions (N, 6, H, 5)");
    bool posteriors = true;
    for (int32_t k = 1; k < 3; ++k)
    {
        posteriors = posteriors && out[k].nbDims == 1 && out[k].d[0] != nullptr && out[k].d[0]->isConstant()
            && out[k].d[0]->getConstantValue() == 6 && !out[k].d[0]->isSizeTensor();
    }
    check(posteriors, "getOutputShapes: posterior_mean and posterior_variance are (C,) = (6,)");
    std::printf("INFO getOutputShapes made %d IExprBuilder calls; Y = (%s, %s, %s, %s)\n",
        builder.impl.calls - callsBefore, textOf(*out[0].d[0]).c_str(), textOf(*out[0].d[1]).c_str(),
        textOf(*out[0].d[2]).c_str(), textOf(*out[0].d[3]).c_str());

    DimsExprs rankOne[6]{};
    for (auto& e : rankOne)
    {
        e.nbDims = 1;
        e.d[0] = channels;
    }
    logger.messages.clear();
    check(build->getOutputShapes(rankOne, 6, nullptr, 0, out, 3, builder) != 0 && logger.saw("'X'"),
        "getOutputShapes refuses a rank-1 X, naming 'X'");
    check(build->getOutputShapes(in, 5, nullptr, 0, out, 3, builder) != 0,
        "getOutputShapes refuses 5 inputs");
}

struct DeviceBuffer
{
    void* ptr{nullptr};
    size_t bytes{0};
    size_t guard{0};
    ~DeviceBuffer()
    {
        if (ptr != nullptr)
        {
            cudaFree(ptr);
        }
    }
};

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuardValue = 0xA5;

bool allocate(DeviceBuffer& b, size_t bytes, size_t guard)
{
    b.bytes = bytes;
    b.guard = guard;
    if (cudaMalloc(&b.ptr, bytes + guard) != cudaSuccess)
    {
        return false;
    }
    return cudaMemset(b.ptr, kGuardValue, bytes + guard) == cudaSuccess;
}

bool guardIntact(DeviceBuffer const& b)
{
    std::vector<unsigned char> tail(b.guard);
    if (cudaMemcpy(tail.data(), static_cast<char*>(b.ptr) + b.bytes, b.guard, cudaMemcpyDeviceToHost) != cudaSuccess)
    {
        return false;
    }
    for (unsigned char v : tail)
    {
        if (v != kGuardValue)
        {
            return false;
        }
    }
    return true;
}

struct Tolerance
{
    double rtol;
    double atol;
};

//! Largest |got - exact| and whether every element is within atol + rtol |exact|.
std::pair<double, bool> compare(std::vector<double> const& got, double const* exact, size_t n, Tolerance tol)
{
    double worst = 0.0;
    bool ok = true;
    for (size_t i = 0; i < n; ++i)
    {
        double const err = std::fabs(got[i] - exact[i]);
        worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : (err > worst ? err : worst);
        ok = ok && err <= tol.atol + tol.rtol * std::fabs(exact[i]);
    }
    return {worst, ok};
}

//! One case: build phase on a kBUILD plugin, runtime phase on a deserialized + attached clone.
void runCase(IPluginCreatorV3One* creator, ReferenceCase const& c, bool hostOnly, RecordingLogger& logger)
{
    std::string const tag = c.name + ": ";
    std::vector<PluginField> fields{{"epsilon", &c.epsilon, PluginFieldType::kFLOAT32, 1},
        {"fallback_ratio", &c.fallbackRatio, PluginFieldType::kFLOAT32, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin(c.name.c_str(), &fc, TensorRTPhase::kBUILD));
    if (!check(plugin != nullptr, tag + "createPlugin(kBUILD)"))
    {
        return;
    }
    IPluginV3OneBuild* build = buildOf(plugin.get());

    DataType inTypes[6] = {c.type, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT};
    DataType outTypes[3] = {};
    check(build->getOutputDataTypes(outTypes, 3, inTypes, 6) == 0 && outTypes[0] == c.type
            && outTypes[1] == DataType::kFLOAT && outTypes[2] == DataType::kFLOAT,
        tag + "getOutputDataTypes");

    // Build: a dynamic batch from 1 to 2N, optimised for N.
    int64_t const batch = c.shape[0];
    std::vector<PluginTensorDesc> const actual = ioDescs(c, batch);
    std::vector<DynamicPluginTensorDesc> dynamic(9);
    for (size_t i = 0; i < dynamic.size(); ++i)
    {
        dynamic[i].desc = actual[i];
        dynamic[i].min = ioDescs(c, 1)[i].dims;
        dynamic[i].opt = actual[i].dims;
        dynamic[i].max = ioDescs(c, 2 * batch)[i].dims;
        if (i == 0 || i == 6)
        {
            dynamic[i].desc.dims.d[0] = -1; // TensorRT passes -1 for a dynamic dimension at build time
        }
    }
    bool formats = true;
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        formats = formats && build->supportsFormatCombination(pos, dynamic.data(), 6, 3);
    }
    check(formats, tag + "supportsFormatCombination accepts the case's types");
    check(build->configurePlugin(dynamic.data(), 6, dynamic.data() + 6, 3) == 0, tag + "configurePlugin (batch 1..2N)");
    size_t const workspaceBytes = build->getWorkspaceSize(dynamic.data(), 6, dynamic.data() + 6, 3);
    check(workspaceBytes >= 4 * static_cast<size_t>(c.channels()) * sizeof(float), tag + "getWorkspaceSize >= 16 B/channel");

    // Runtime: what an engine does after deserialization.
    std::unique_ptr<IPluginV3> deserialized(
        creator->createPlugin(c.name.c_str(), runtimeOf(plugin.get())->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    if (!check(deserialized != nullptr, tag + "createPlugin(kRUNTIME) from getFieldsToSerialize"))
    {
        return;
    }
    std::unique_ptr<IPluginV3> attached(runtimeOf(deserialized.get())->attachToContext(nullptr));
    if (!check(attached != nullptr, tag + "attachToContext"))
    {
        return;
    }
    IPluginV3OneRuntime* runtime = runtimeOf(attached.get());
    check(runtime->onShapeChange(actual.data(), 6, actual.data() + 6, 3) == 0, tag + "onShapeChange (actual shape)");
    std::vector<PluginTensorDesc> wrong = actual;
    wrong[3].dims.d[0] = c.channels() + 1;
    logger.messages.clear();
    check(runtime->onShapeChange(wrong.data(), 6, wrong.data() + 6, 3) != 0 && logger.saw("prior_weight"),
        tag + "onShapeChange refuses prior_weight of C+1, naming it");
    if (hostOnly)
    {
        return;
    }

    // enqueue on device buffers; every output is followed by guard bytes that must stay untouched.
    size_t const n = static_cast<size_t>(c.numel());
    size_t const ch = static_cast<size_t>(c.channels());
    DeviceBuffer x, params, y, mean, variance, workspace;
    bool const allocated = allocate(x, c.x.size(), 0) && allocate(params, c.params.size() * sizeof(float), 0)
        && allocate(y, n * c.elementSize(), kGuardBytes) && allocate(mean, ch * sizeof(float), kGuardBytes)
        && allocate(variance, ch * sizeof(float), kGuardBytes) && allocate(workspace, workspaceBytes, kGuardBytes)
        && cudaMemcpy(x.ptr, c.x.data(), c.x.size(), cudaMemcpyHostToDevice) == cudaSuccess
        && cudaMemcpy(params.ptr, c.params.data(), params.bytes, cudaMemcpyHostToDevice) == cudaSuccess;
    if (!check(allocated, tag + "device buffers"))
    {
        return;
    }
    float const* p = static_cast<float const*>(params.ptr);
    void const* inputs[6] = {x.ptr, p, p + ch, p + 2 * ch, p + 3 * ch, p + 4 * ch};
    void* outputs[3] = {y.ptr, mean.ptr, variance.ptr};
    cudaStream_t stream = nullptr;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    int32_t const status = runtime->enqueue(actual.data(), actual.data() + 6, inputs, outputs, workspace.ptr, stream);
    cudaError_t const sync = cudaStreamSynchronize(stream);
    cudaError_t const last = cudaGetLastError();
    cudaStreamDestroy(stream);
    if (!check(status == 0 && sync == cudaSuccess && last == cudaSuccess,
            tag + "enqueue returns 0 and the stream completes (" + cudaGetErrorString(sync != cudaSuccess ? sync : last) + ")"))
    {
        return;
    }
    check(guardIntact(y) && guardIntact(mean) && guardIntact(variance) && guardIntact(workspace),
        tag + "no write past Y, the posteriors or the workspace");

    std::vector<double> gotY(n), gotMean(ch), gotVariance(ch);
    std::vector<char> rawY(y.bytes);
    std::vector<float> rawMean(ch), rawVariance(ch);
    cudaMemcpy(rawY.data(), y.ptr, y.bytes, cudaMemcpyDeviceToHost);
    cudaMemcpy(rawMean.data(), mean.ptr, mean.bytes, cudaMemcpyDeviceToHost);
    cudaMemcpy(rawVariance.data(), variance.ptr, variance.bytes, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n; ++i)
    {
        if (c.type == DataType::kHALF)
        {
            uint16_t bits = 0;
            std::memcpy(&bits, rawY.data() + 2 * i, 2);
            gotY[i] = halfToFloat(bits);
        }
        else
        {
            float v = 0.0F;
            std::memcpy(&v, rawY.data() + 4 * i, 4);
            gotY[i] = v;
        }
    }
    for (size_t i = 0; i < ch; ++i)
    {
        gotMean[i] = rawMean[i];
        gotVariance[i] = rawVariance[i];
    }
    // The tolerances of tests/test_tensorrt_plugin.py::test_cuda_launcher_matches_functional_reference,
    // here against the float64 reference: float32 statistics; Y rounded once to X's dtype.
    Tolerance const statistics{1e-4, 1e-5};
    Tolerance const output = c.type == DataType::kHALF ? Tolerance{1e-3, 4e-3} : Tolerance{1e-4, 1e-4};
    auto const [errY, okY] = compare(gotY, c.expected.data(), n, output);
    auto const [errMean, okMean] = compare(gotMean, c.expected.data() + n, ch, statistics);
    auto const [errVariance, okVariance] = compare(gotVariance, c.expected.data() + n + ch, ch, statistics);
    std::printf("CASE %s %s %s eps=%g fallback_ratio=%g max_abs_err Y=%.3g posterior_mean=%.3g posterior_variance=%.3g\n",
        c.name.c_str(), c.type == DataType::kHALF ? "float16" : "float32", shapeText(c.shape).c_str(),
        static_cast<double>(c.epsilon), static_cast<double>(c.fallbackRatio), errY, errMean, errVariance);
    check(okY, tag + "Y matches the functional reference");
    check(okMean && okVariance, tag + "posterior mean and variance match the functional reference");
}

//! An empty batch (N = 0) is refused by enqueue with an error, not launched.
void checkEmptyBatch(IPluginCreatorV3One* creator, RecordingLogger& logger)
{
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("empty", nullptr, TensorRTPhase::kRUNTIME));
    if (!check(plugin != nullptr, "createPlugin(kRUNTIME) with defaults"))
    {
        return;
    }
    ReferenceCase c;
    c.shape = {0, 4, 3};
    std::vector<PluginTensorDesc> const io = ioDescs(c, 0);
    DeviceBuffer dummy;
    if (!check(allocate(dummy, 1024, 0), "device buffer for the empty-batch check"))
    {
        return;
    }
    void const* inputs[6] = {dummy.ptr, dummy.ptr, dummy.ptr, dummy.ptr, dummy.ptr, dummy.ptr};
    void* outputs[3] = {dummy.ptr, dummy.ptr, dummy.ptr};
    logger.messages.clear();
    int32_t const status = runtimeOf(plugin.get())->enqueue(io.data(), io.data() + 6, inputs, outputs, dummy.ptr, nullptr);
    check(status != 0 && logger.saw("enqueue failed") && cudaDeviceSynchronize() == cudaSuccess,
        "enqueue refuses an empty batch (0, 4, 3) with a logged error");
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 3 || argc > 4 || (argc == 4 && std::strcmp(argv[3], "--host-only") != 0))
    {
        std::fprintf(stderr, "usage: %s <libbkn_tensorrt_plugin.so> <reference_dir> [--host-only]\n", argv[0]);
        return 2;
    }
    bool const hostOnly = argc == 4;
    std::printf("INFO TensorRT headers %d.%d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH,
        NV_TENSORRT_BUILD);
    std::vector<ReferenceCase> cases;
    if (!readCases(argv[2], cases))
    {
        return 2;
    }
    if (!hostOnly)
    {
        int32_t devices = 0;
        cudaError_t const status = cudaGetDeviceCount(&devices);
        if (status != cudaSuccess || devices == 0)
        {
            std::fprintf(stderr, "no CUDA device (cudaGetDeviceCount: %s, %d devices); rerun with --host-only\n",
                cudaGetErrorString(status), devices);
            return 3;
        }
        cudaDeviceProp props{};
        cudaGetDeviceProperties(&props, 0);
        std::printf("INFO device %s (sm_%d%d)\n", props.name, props.major, props.minor);
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
    if (!check(getCreators != nullptr && setLoggerFinder != nullptr, "exports getCreators and setLoggerFinder"))
    {
        return 1;
    }
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    if (!check(nbCreators == 1 && creators != nullptr && creators[0] != nullptr
                && std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
            "one IPluginCreatorV3One"))
    {
        return 1;
    }
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);

    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("shapes", nullptr, TensorRTPhase::kBUILD));
    if (!check(plugin != nullptr, "createPlugin(kBUILD) with defaults"))
    {
        return 1;
    }
    checkOutputShapes(buildOf(plugin.get()), logger);
    for (ReferenceCase const& c : cases)
    {
        runCase(creator, c, hostOnly, logger);
    }
    if (!hostOnly)
    {
        checkEmptyBatch(creator, logger);
    }
    std::printf("%s (%d failures, %zu cases%s)\n", gFailures == 0 ? "OK" : "FAILED", gFailures, cases.size(),
        hostOnly ? ", host only: enqueue not run" : "");
    return gFailures == 0 ? 0 : 1;
}
