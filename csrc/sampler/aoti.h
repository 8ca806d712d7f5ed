// AOTInductor packages (.pt2 from `sr3fast export`) as denoisers of the C++ sampling loop.
#pragma once

#include <string>

#include <c10/core/Device.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "sampler/sampler.h"

namespace sr3fast {

// The package at `path`, loaded onto `device` on first use and kept for the life of the process
// (loading compiles nothing but maps a shared library and its weights: slow to repeat per call).
torch::inductor::AOTIModelPackageLoader& aoti_package(const std::string& path,
                                                      const c10::Device& device);

// f(x, y_t, gamma) -> eps running the package; it must take those three tensors and return one.
Denoiser aoti_denoiser(torch::inductor::AOTIModelPackageLoader& package);

}  // namespace sr3fast
