"""Build and install dermomamba and dermomamba_kernels.

``pip install --no-build-isolation .`` (torch installed first) builds ``dermomamba_kernels._C``:
  * with CUDA kernels when torch is a CUDA build and nvcc is found (CUDA_HOME, or the toolkit that
    the ``nvcc`` on PATH belongs to, wrapper scripts included);
  * with the C++ CPU kernels only otherwise, saying why no CUDA kernels were built.
Environment:
  DERMOMAMBA_CUDA_ARCHS      compute capabilities to build for, default "8.0;9.0"
  DERMOMAMBA_SKIP_CUDA_BUILD=1  build the C++ CPU kernels only
  DERMOMAMBA_SKIP_EXTENSION=1   build nothing: pure-Python install (reference and Triton backends)
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def say(message):
    # pip hides a build's stdout unless -v; stderr lines still reach the user on failure, and the
    # line is in the build log either way.
    print(f"[dermomamba setup] {message}", file=sys.stderr, flush=True)


def find_cuda_home():
    """CUDA_HOME, else the toolkit folder of the nvcc on PATH (following wrapper scripts)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it execs
        match = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
        if match and os.path.isfile(os.path.join(match.group(1).decode(), "bin", "nvcc")):
            return match.group(1).decode()
        return None
    return os.path.dirname(os.path.dirname(nvcc))


def parse_archs(archs):
    """"8.0;9.0+PTX" -> ([80, 90], [90]): capabilities with machine code, and with PTX as well."""
    machine, ptx = [], []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        number = int(arch.replace(".", "").replace("+PTX", ""))
        machine.append(number)
        if arch.endswith("+PTX"):
            ptx.append(number)
    return machine, ptx


def gencode_flags(archs):
    machine, ptx = parse_archs(archs)
    flags = []
    for number in machine:
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if number in ptx:
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def arch_macros(archs):
    """The built architectures, for the extension to report (the dispatcher checks the GPU against them).

    Comma-separated integers: the flags pass through a shell in ninja builds, so no quotes or semicolons;
    and only to the host compiler (nvcc would read the commas as separate -D options).
    """
    machine, ptx = parse_archs(archs)
    return [("DERMOMAMBA_CUDA_SASS_ARCHS", ",".join(map(str, machine))),
            ("DERMOMAMBA_CUDA_PTX_ARCHS", ",".join(map(str, ptx)))]


def extension_modules():
    if os.environ.get("DERMOMAMBA_SKIP_EXTENSION") == "1":
        say("DERMOMAMBA_SKIP_EXTENSION=1: installing without dermomamba_kernels._C "
            "(reference and Triton backends only)")
        return [], {}
    try:
        import torch
    except ImportError:
        say("torch is not importable in the build environment, so dermomamba_kernels._C is NOT built. "
            "Install torch first and use `pip install --no-build-isolation .`")
        return [], {}

    why_no_cuda = None
    if os.environ.get("DERMOMAMBA_SKIP_CUDA_BUILD") == "1":
        why_no_cuda = "DERMOMAMBA_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            why_no_cuda = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
        else:
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
            os.environ["CUDA_HOME"] = cuda_home

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std: torch adds the standard its headers need (C++20 since torch 2.10).
    cxx_flags = ["-O3", "-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if why_no_cuda is None:
        archs = os.environ.get("DERMOMAMBA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # keep torch from adding its own list
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        say(f"building dermomamba_kernels._C with CUDA kernels for {archs} (CUDA_HOME={os.environ['CUDA_HOME']})")
        ext = CUDAExtension(
            "dermomamba_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("DERMOMAMBA_WITH_CUDA", None)],
            extra_compile_args={
                # host compiler only: nvcc splits -D values at commas
                "cxx": cxx_flags + [f"-D{name}={value}" for name, value in arch_macros(archs)],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                         "-DDERMOMAMBA_WITH_CUDA"] + gencode_flags(archs),
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        say(f"no CUDA kernels: {why_no_cuda}. Building dermomamba_kernels._C with the C++ CPU kernels only")
        ext = CppExtension(
            "dermomamba_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    name="dermomamba",
    version="0.1.0",
    description="Fast Mamba-based skin-lesion segmentation: DermoMamba, its kernels and drop-in layers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dermomamba", "dermomamba.*", "dermomamba_kernels", "dermomamba_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "numpy",
        "scipy",
        "safetensors",
        "Pillow",
        "PyYAML",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # The official ISIC scorer (its 5.6 line is the last for Python < 3.13; it brings
        # scikit-learn, used to check the published data split) is the oracle of the metric tests.
        "test": ["pytest", "pytest-benchmark", 'isic-challenge-scoring==5.6.0; python_version < "3.13"'],
        "scoring": ["isic-challenge-scoring"],
    },
    entry_points={"console_scripts": ["dermomamba = dermomamba.cli:main"]},
    zip_safe=False,
)
