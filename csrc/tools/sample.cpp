// sr3fast_sample: the C++ user's entry point. Runs a whole SR3 sampling call without Python: the
// U-Net is an AOTInductor package, the steps are sr3fast::sample (csrc/sampler/sampler.h).
//
//   sr3fast_sample PACKAGE.pt2 INPUTS.pt OUTPUT.pt [--device cpu|cuda[:N]]
//
// Its inputs come from Python, once per model, image size and sampler:
//   PACKAGE.pt2  `sr3fast export MODEL --batch B --size HxW -o PACKAGE.pt2`
//                (or sr3fast.export.export): predict_noise compiled for one input shape.
//   INPUTS.pt    sr3fast.export.save_sampling_inputs(path, x, schedule, sampler, seed=...):
//                the condition x, the step tables, the seed (its docstring is the contract).
// OUTPUT.pt receives y_0, a float32 (B, C, H, W) tensor: torch.load(OUTPUT.pt) in
// Python, torch::jit::pickle_load in C++. With the same seed it is the image the Python sampler
// gives with torch.Generator(device).manual_seed(seed) and the same package (bit for bit on CPU).
//
// --device defaults to the device the package was compiled for. Exit status: 0 done, 2 the
// command line cannot be run (wrong arguments, a file that does not exist), 1 anything that
// fails afterwards (an input file that breaks the contract, a failed sampling call).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randn.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "sampler/aoti.h"
#include "sampler/sampler.h"

namespace {

namespace fs = std::filesystem;

constexpr const char* kUsage =
    "usage: sr3fast_sample PACKAGE.pt2 INPUTS.pt OUTPUT.pt [--device cpu|cuda[:N]]";
constexpr const char* kPackageFormat = "sr3fast-denoiser-1";  // sr3fast.export.FORMAT
constexpr const char* kInputsHint = "write it with sr3fast.export.save_sampling_inputs";

// The command line cannot be run as given (exit status 2).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failure after the command line was accepted (exit status 1).
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

std::string in_quotes(const std::string& path) { return concat('\'', path, '\''); }

struct Arguments {
  bool help = false;
  std::string package, inputs, output;
  std::optional<c10::Device> device;  // nullopt: the package's
};

c10::Device parse_device(const std::string& text) {
  std::optional<c10::Device> device;
  try {
    device = c10::Device(text);
  } catch (const c10::Error&) {
  }
  if (!device || !(device->is_cpu() || device->is_cuda())) {
    throw UsageError(concat("--device must be cpu, cuda or cuda:N, got ", in_quotes(text)));
  }
  return *device;
}

Arguments parse_arguments(int argc, char** argv) {
  Arguments arguments;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "-h" || argument == "--help") {
      arguments.help = true;
      return arguments;
    } else if (argument == "--device") {
      if (i + 1 == argc) {
        throw UsageError("--device needs a value");
      }
      arguments.device = parse_device(argv[++i]);
    } else if (argument.rfind("--device=", 0) == 0) {
      arguments.device = parse_device(argument.substr(std::strlen("--device=")));
    } else if (argument.rfind("--", 0) == 0) {
      throw UsageError(concat("unknown option ", in_quotes(argument)));
    } else {
      paths.push_back(argument);
    }
  }
  if (paths.size() != 3) {
    throw UsageError(concat("expected 3 paths (PACKAGE.pt2 INPUTS.pt OUTPUT.pt), got ",
                            paths.size()));
  }
  arguments.package = paths[0];
  arguments.inputs = paths[1];
  arguments.output = paths[2];
  // Checked here so that a mistyped path is reported as such, not as a failure deep in a loader.
  for (const auto& [path, what] : {std::pair{arguments.package, "package"},
                                   std::pair{arguments.inputs, "inputs file"}}) {
    if (!fs::is_regular_file(path)) {
      throw UsageError(concat("no ", what, " at ", in_quotes(path)));
    }
  }
  const fs::path folder = fs::path(arguments.output).parent_path();
  if (!folder.empty() && !fs::is_directory(folder)) {
    throw UsageError(concat("cannot write ", in_quotes(arguments.output), ": folder ",
                            in_quotes(folder.string()), " does not exist"));
  }
  return arguments;
}

// ---- the package's contract --------------------------------------------------------------------

// What sr3fast.export.PackageInfo stores in a package's metadata; empty for a package that was
// not written by sr3fast (any AOTI denoiser of (x, y_t, gamma) still runs, unchecked).
struct PackageContract {
  std::optional<std::vector<int64_t>> shape;
  std::optional<std::string> dtype;  // Python's name: "float32", "bfloat16", ...
  std::optional<std::string> device_type;
};

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::istringstream in(text);
  for (std::string size; std::getline(in, size, ',');) {
    shape.push_back(std::stoll(size));
  }
  return shape;
}

std::unordered_map<std::string, std::string> read_metadata(const std::string& package) {
  try {
    return torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
  } catch (const c10::Error& error) {
    // The loader's own message names zip entries; say first what the file should have been.
    throw Failure(concat("cannot read package ", in_quotes(package), " (an AOTInductor .pt2 "
                         "from `sr3fast export`): ", error.what_without_backtrace()));
  }
}

PackageContract read_contract(const std::string& package) {
  // Read without loading the model, so that the device can default to the package's own.
  const auto metadata = read_metadata(package);
  PackageContract contract;
  const auto format = metadata.find("sr3fast.format");
  if (format == metadata.end()) {
    return contract;
  }
  if (format->second != kPackageFormat) {
    throw Failure(concat("package ", in_quotes(package), " has format ", in_quotes(format->second),
                         ", this program reads ", kPackageFormat, "; export it again with this "
                         "version of sr3fast"));
  }
  contract.shape = parse_shape(metadata.at("sr3fast.shape"));
  contract.dtype = metadata.at("sr3fast.dtype");
  contract.device_type = metadata.at("sr3fast.device");
  return contract;
}

std::string dtype_name(at::ScalarType type) { return std::string(c10::getDtypeNames(type).first); }

void check_against_package(const at::Tensor& x, const c10::Device& device,
                           const PackageContract& contract, const std::string& package) {
  if (contract.shape && x.sizes() != at::IntArrayRef(*contract.shape)) {
    throw Failure(concat("package ", in_quotes(package), " was compiled for x of shape ",
                         at::IntArrayRef(*contract.shape), ", the inputs have ", x.sizes(),
                         "; export one for this shape (sr3fast export --batch B --size HxW)"));
  }
  if (contract.dtype && dtype_name(x.scalar_type()) != *contract.dtype) {
    throw Failure(concat("package ", in_quotes(package), " takes ", *contract.dtype,
                         " inputs, x is ", dtype_name(x.scalar_type()),
                         "; save the inputs with x in the package's dtype"));
  }
  if (contract.device_type && c10::DeviceTypeName(device.type(), true) != *contract.device_type) {
    throw Failure(concat("package ", in_quotes(package), " was compiled for ", *contract.device_type,
                         ", not ", device, "; pass --device ", *contract.device_type,
                         " or export the model for ", device.type()));
  }
}

// ---- the inputs file ---------------------------------------------------------------------------

struct Inputs {
  at::Tensor x, coefs, gammas;
  std::optional<at::Tensor> y_T;
  bool stochastic = true;
  int64_t history = 0;  // past x0 estimates each step carries (1: DPM-Solver++ 2M, 2: 3M)
  int64_t seed = 0;
  std::optional<double> clip;
};

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad() || (!in.eof() && in.fail())) {
    throw Failure(concat("cannot read ", in_quotes(path), ": ", std::strerror(errno)));
  }
  return bytes;
}

class InputsFile {
 public:
  explicit InputsFile(const std::string& path) : path_(path) {
    // pickle_load reads torch.save's zip format: a dict of tensors comes back as a GenericDict.
    c10::IValue value;
    try {
      value = torch::jit::pickle_load(read_bytes(path));
    } catch (const c10::Error& error) {
      throw Failure(concat("cannot read inputs file ", in_quotes(path), " (", kInputsHint, "): ",
                           error.what_without_backtrace()));
    }
    if (!value.isGenericDict()) {
      throw Failure(concat(in_quotes(path), " holds a ", value.tagKind(),
                           ", not the dict of sampling inputs; ", kInputsHint));
    }
    dict_ = value.toGenericDict();
  }

  bool has(const char* key) const { return dict_.contains(key); }

  at::Tensor tensor(const char* key) const {
    if (!has(key)) {
      throw Failure(concat(in_quotes(path_), " has no ", in_quotes(key), "; ", kInputsHint));
    }
    const c10::IValue value = dict_.at(key);
    if (!value.isTensor()) {
      throw Failure(concat(in_quotes(path_), ": ", in_quotes(key), " is a ", value.tagKind(),
                           ", not a tensor; ", kInputsHint));
    }
    return value.toTensor();
  }

  // A 0-d tensor (how save_sampling_inputs stores scalars) of one of `kinds`.
  at::Tensor scalar(const char* key, std::initializer_list<at::ScalarType> kinds) const {
    at::Tensor value = tensor(key);
    const bool known = std::find(kinds.begin(), kinds.end(), value.scalar_type()) != kinds.end();
    if (value.dim() != 0 || !known) {
      throw Failure(concat(in_quotes(path_), ": ", in_quotes(key), " must be a 0-d ",
                           dtype_name(*kinds.begin()), " tensor, got ",
                           dtype_name(value.scalar_type()), " of shape ", value.sizes(), "; ",
                           kInputsHint));
    }
    return value;
  }

  // A tensor of rank `dims` (the full shapes are checked by sr3fast::sample and the package).
  at::Tensor array(const char* key, int64_t dims, const char* shape) const {
    at::Tensor value = tensor(key);
    if (value.dim() != dims) {
      throw Failure(concat(in_quotes(path_), ": ", in_quotes(key), " must have shape ", shape,
                           ", got ", value.sizes(), "; ", kInputsHint));
    }
    return value;
  }

 private:
  std::string path_;
  c10::impl::GenericDict dict_{c10::StringType::get(), c10::AnyType::get()};
};

Inputs read_inputs(const std::string& path) {
  const InputsFile file(path);
  Inputs inputs;
  inputs.x = file.array("x", 4, "(B, C, H, W)");
  inputs.coefs = file.array("coefs", 3, "(T, B, 7)");
  inputs.gammas = file.array("gammas", 2, "(T, B)");
  inputs.stochastic = file.scalar("stochastic", {at::kBool}).item<bool>();
  inputs.seed = file.scalar("seed", {at::kLong, at::kInt}).item<int64_t>();
  // "history" (0-d int64): how many past x0 estimates each step carries. Files written before it
  // have the 0-d bool "multistep" (true: one), and files from before multistep samplers neither.
  if (file.has("history")) {
    inputs.history = file.scalar("history", {at::kLong, at::kInt}).item<int64_t>();
    if (inputs.history < 0 || inputs.history > 2) {
      throw Failure(concat(in_quotes(path), ": \"history\" must be 0, 1 or 2, got ",
                           inputs.history, "; ", kInputsHint));
    }
  } else if (file.has("multistep")) {
    inputs.history = file.scalar("multistep", {at::kBool}).item<bool>() ? 1 : 0;
  }
  if (file.has("clip")) {
    inputs.clip = file.scalar("clip", {at::kDouble, at::kFloat}).item<double>();
  }
  if (file.has("y_T")) {
    inputs.y_T = file.array("y_T", 4, "(B, C, H, W)");
    if (inputs.y_T->sizes() != inputs.x.sizes()) {
      throw Failure(concat(in_quotes(path), ": y_T has shape ", inputs.y_T->sizes(),
                           ", x has ", inputs.x.sizes(), "; they must match"));
    }
  }
  if (inputs.coefs.size(0) == 0) {
    throw Failure(concat(in_quotes(path), " has no steps (coefs is ", inputs.coefs.sizes(), ")"));
  }
  return inputs;
}

// ---- sampling ----------------------------------------------------------------------------------

// A fresh generator seeded as torch.Generator(device).manual_seed(seed) is in Python, so the
// program draws the same y_T and step noise as the Python samplers.
at::Generator seeded_generator(const c10::Device& device, int64_t seed) {
  if (device.is_cpu()) {
    return at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  }
  // Through the CUDA hooks, so that this file needs no CUDA headers in a CPU-only build.
  at::Generator generator = at::detail::getCUDAHooks().getNewGenerator(device.index());
  generator.set_current_seed(static_cast<uint64_t>(seed));
  return generator;
}

void check_device(const c10::Device& device) {
  if (!device.is_cuda()) {
    return;
  }
  if (!at::hasCUDA()) {
    throw Failure(concat("--device ", device, ": no CUDA device (or no CUDA build of torch)"));
  }
  // Asked here, not left to the first step: the dispatcher's error would come after the package
  // loaded and would not say how to get the kernel.
  const auto reverse_step =
      c10::Dispatcher::singleton().findSchemaOrThrow("sr3fast::reverse_step", "");
  if (!reverse_step.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    throw Failure(concat("--device ", device, ": this sr3fast_ops has no CUDA kernels; build it "
                         "with cmake -DSR3FAST_WITH_CUDA=ON"));
  }
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// ---- output ------------------------------------------------------------------------------------

// Writes OUTPUT.tmp, flushes it to disk, then renames it over OUTPUT: a reader never sees a
// half-written file, and a failed run leaves the previous OUTPUT in place.
void write_atomically(const std::string& path, const std::vector<char>& bytes) {
  const std::string staged = path + ".tmp";
  const int fd = ::open(staged.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    throw Failure(concat("cannot write ", in_quotes(staged), ": ", std::strerror(errno)));
  }
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    written += static_cast<size_t>(n);
  }
  const int error = written < bytes.size() ? errno : (::fsync(fd) != 0 ? errno : 0);
  if (::close(fd) != 0 || error != 0 || std::rename(staged.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(error != 0 ? error : errno);
    std::remove(staged.c_str());
    throw Failure(concat("cannot write ", in_quotes(path), ": ", reason));
  }
}

std::string shape_text(at::IntArrayRef sizes) {
  std::string text;
  for (const int64_t size : sizes) {
    text += (text.empty() ? "" : "x") + std::to_string(size);
  }
  return text;
}

int run(const Arguments& arguments) {
  if (arguments.help) {
    std::printf("%s\n", kUsage);
    return 0;
  }
  const PackageContract contract = read_contract(arguments.package);
  c10::Device device = arguments.device.value_or(c10::Device(contract.device_type.value_or("cpu")));
  check_device(device);
  if (device.is_cuda() && !device.has_index()) {
    device = c10::Device(c10::kCUDA, 0);  // the current device of a fresh process
  }
  Inputs inputs = read_inputs(arguments.inputs);
  check_against_package(inputs.x, device, contract, arguments.package);

  const c10::InferenceMode no_autograd;  // nothing here needs gradients or version counters
  const c10::DeviceGuard guard(device);
  const auto load_start = std::chrono::steady_clock::now();
  auto& package = sr3fast::aoti_package(arguments.package, device);
  const double load_ms = milliseconds_since(load_start);

  const at::Tensor x = inputs.x.to(device);
  sr3fast::SampleOptions options;
  options.clip = inputs.clip;
  options.stochastic = inputs.stochastic;
  options.history = inputs.history;
  options.noise = sr3fast::NoiseSource::kTorch;  // the draws the Python samplers make
  options.generator = seeded_generator(device, inputs.seed);
  const auto sample_start = std::chrono::steady_clock::now();
  // y_T first, as the Python samplers do, so every later draw comes from the same stream.
  const at::Tensor y_T = inputs.y_T ? inputs.y_T->to(device, at::kFloat)
                                    : at::randn(x.sizes(), options.generator,
                                                x.options().dtype(at::kFloat));
  // .cpu() inside the timing: it waits for the device to finish.
  const at::Tensor y_0 = sr3fast::sample(sr3fast::aoti_denoiser(package), x, y_T,
                                         inputs.coefs.to(device), inputs.gammas.to(device),
                                         options)
                             .cpu();
  const double sample_ms = milliseconds_since(sample_start);

  write_atomically(arguments.output, torch::jit::pickle_save(y_0));
  std::printf("sr3fast_sample: %lld steps, y_0 %s float32 on %s in %.1f ms "
              "(package load %.1f ms) -> %s\n",
              static_cast<long long>(inputs.coefs.size(0)), shape_text(y_0.sizes()).c_str(),
              device.str().c_str(), sample_ms, load_ms, arguments.output.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_arguments(argc, argv));
  } catch (const UsageError& error) {
    std::fprintf(stderr, "sr3fast_sample: %s\n", error.what());
    std::fprintf(stderr, "%s\n", kUsage);
    return 2;
  } catch (const c10::Error& error) {
    // Without the C++ backtrace: the message says what is wrong; the stack would bury it.
    std::fprintf(stderr, "sr3fast_sample: %s\n", error.what_without_backtrace());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "sr3fast_sample: %s\n", error.what());
    return 1;
  }
}
