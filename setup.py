"""Build script: the Python package plus the optional C++/CUDA extension ``sr3fast._C``.

The extension's sources are listed once, in ``csrc/sources.txt`` (also read by CMakeLists.txt).
Environment switches:
  SR3FAST_SKIP_EXT=1      build no extension (pure Python + Triton)
  SR3FAST_SKIP_CUDA=1     build the CPU half only, even when a CUDA toolkit is present
  SR3FAST_REQUIRE_EXT=1   fail the install when the extension does not build (CI sets it);
                          otherwise a failed build is reported and the library falls back
  TORCH_CUDA_ARCH_LIST    CUDA targets (default: Ampere and Hopper, "8.0;9.0")
  SR3FAST_CPU_CAPABILITY  SIMD level of the CPU kernels: default, avx2 or avx512 (default: the
                          level torch itself uses on the build machine)
  MAX_JOBS                parallel compile jobs (read by torch's build_ext)
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The CUDA toolkit root, or None. `nvcc` on PATH may be a wrapper script outside the
    toolkit, so torch's own guess (the folder above `which nvcc`) can be wrong: prefer an
    explicit CUDA_HOME/CUDA_PATH, then the standard install location."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    for home in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home).resolve())
    return None


def _cuda_library_include_dirs(cuda_home):
    """Include folders for the CUDA math libraries' headers (cuBLAS, cuSPARSE, cuRAND, ...) that
    torch's CUDA headers include, when the toolkit lacks them: a minimal toolkit (nvcc and the
    runtime only) next to torch's pip wheels, which ship those headers in nvidia/<pkg>/include."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    includes = (include for root in nvidia.__path__ for include in Path(root).glob("*/include"))
    return sorted(str(include) for include in includes
                  if (include / "cusparse.h").exists() or (include / "curand_kernel.h").exists())


def _listed_sources():
    """Paths from csrc/sources.txt, relative to the repository root ('#' starts a comment)."""
    listing = CSRC / "sources.txt"
    if not listing.exists():
        return []
    names = []
    for line in listing.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(f"csrc/{line}")
    return names


# ATen's Vectorized<T> takes its SIMD width from the CPU_CAPABILITY_* macros. torch compiles its
# kernels once per level and picks one at run time; the extension is compiled once, for one level.
_CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512"],
}


def _cpu_capability_flags(torch):
    """Compiler flags for the CPU kernels' SIMD level: SR3FAST_CPU_CAPABILITY, else the level torch
    runs at on this machine (x86-64 only; other machines build the portable DEFAULT level)."""
    level = os.environ.get("SR3FAST_CPU_CAPABILITY", "").strip().upper()
    if not level:
        import platform
        if platform.machine().lower() not in ("x86_64", "amd64"):
            level = "DEFAULT"
        else:
            level = torch.backends.cpu.get_cpu_capability().upper()
            level = level if level in _CPU_CAPABILITY_FLAGS else "DEFAULT"
    if level not in _CPU_CAPABILITY_FLAGS:
        raise SystemExit(f"SR3FAST_CPU_CAPABILITY={level.lower()}: choose one of "
                         f"{', '.join(c.lower() for c in _CPU_CAPABILITY_FLAGS)}")
    # A distinct inline namespace per level (as in torch's own kernels) keeps the inline vector
    # functions of differently compiled libraries apart.
    return [*_CPU_CAPABILITY_FLAGS[level], f"-DCPU_CAPABILITY={level}"]


def _extensions():
    if _flag("SR3FAST_SKIP_EXT"):
        return [], {}
    sources = _listed_sources()
    if not sources:
        return [], {}
    cuda_home = None if _flag("SR3FAST_SKIP_CUDA") else _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sr3fast: torch is not installed at build time; building no C++ extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    if not with_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -ffp-contract=off: no implicit FMA, so reverse_step reproduces the reference bit for bit.
    # No -std flag: torch adds the C++ standard its headers need (C++17 or C++20 by version).
    cxx = ["-O3", "-ffp-contract=off", *openmp, *_cpu_capability_flags(torch)]
    define_macros = [("SR3FAST_WITH_CUDA", "1")] if with_cuda else []
    kwargs = dict(
        name="sr3fast._C",
        sources=sources,
        include_dirs=[str(CSRC), *(_cuda_library_include_dirs(cuda_home) if with_cuda else [])],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math",
                                                 "-lineinfo"]} if with_cuda else {"cxx": cxx},
        extra_link_args=openmp,
        py_limited_api=False,
        optional=not _flag("SR3FAST_REQUIRE_EXT"),
    )
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(**kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _version() -> str:
    """sr3fast.__version__, the one place of truth, read from the source: importing the
    package at build time would need its dependencies installed first."""
    text = (ROOT / "sr3fast" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


ext_modules, cmdclass = _extensions()

setup(
    name="sr3fast",
    version=_version(),
    description="Fast SR3 diffusion super-resolution: fused Triton/CUDA kernels, a pure-PyTorch "
                "reference, and loaders for public SR3 checkpoints",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ (Triton) lives at the top level of the repository and installs as sr3fast.kernels.
    packages=find_packages(include=["sr3fast", "sr3fast.*"]) + ["sr3fast.kernels"],
    package_dir={"sr3fast.kernels": "kernels"},
    # the default model (sr3fast.load("default")): weights and their SHA-256; the page of
    # `sr3fast study serve`
    package_data={"sr3fast": ["weights/*.safetensors", "weights/*.sha256", "study/static/*.html"]},
    # Lower bounds are the oldest releases tested: torch 2.11.0 + triton 3.6.0 (the GPU machine's;
    # CPU test suite passes, CUDA extension compiles with nvcc 13) and torch 2.14.1 + triton 3.8.0.
    # Older releases are untested. Version differences: kernels/compat.py (feature detection).
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        "pillow>=9",
        "tqdm>=4.60",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "study": ["matplotlib"],   # `sr3fast study report --png` (the rest of the study kit needs nothing)
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "pytest-benchmark>=4",
            "scikit-image>=0.21",
            "scikit-learn",   # and matplotlib: photos of the default model (scripts/collect_photos.py)
            "matplotlib",
            "expecttest",
            "cmake>=3.18",  # tests/test_extension.py builds CMakeLists.txt (ninja: scripts/setup.sh)
            # tests/test_study_browser.py drives the system's Chromium (.ci/run installs it); never
            # run `playwright install`: the test uses /usr/bin/chromium
            "playwright>=1.40",
        ],
    },
    entry_points={"console_scripts": ["sr3fast=sr3fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
