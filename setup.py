"""Build and install `pretrain`.

Install torch first, then `pip install --no-build-isolation -e .` so the DCNv3 extension builds against that torch.
The CPU kernel always builds. The CUDA kernel builds whenever torch has CUDA and nvcc is found, with or without a
visible GPU, so a kernel that does not compile fails CI on a machine without one.
"""
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DCNV3_SOURCES = Path("csrc") / "dcnv3"
# -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is built with OpenMP
# (torch's libgomp is the one loaded at run time). Accumulating reductions (the backward's dot products) vectorise
# only when the compiler may reorder them; these flags allow that without -ffast-math's global side effects
# (flush-to-zero at load time) or its NaN assumptions.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
CUDA_EXTENSION = "pretrain._dcnv3_cuda"
# Native code for A100 (8.0) and H100/H200 (9.0), and PTX for the newest: a newer GPU JITs it at load instead of finding
# no kernel image. Without a default torch would build for the visible GPU only, or for every arch it knows.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Written beside the CUDA kernel at build time; the run's start-up line reports it (pretrain/ops/kernels.py).
CUDA_BUILD_RECORD = "_dcnv3_cuda_build.json"


def find_nvcc_home() -> str | None:
    """CUDA_HOME, else the toolkit behind the nvcc on PATH (resolving wrapper scripts' links), else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists() and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


def cuda_wheel_includes() -> list[str]:
    """Headers that torch's own CUDA headers need and a bare nvcc install may lack ship in the nvidia-* wheels."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    return sorted(str(p) for p in site.glob("nvidia/*/include") if p.is_dir())


def dcnv3_extensions() -> list:
    import torch

    nvcc_home = find_nvcc_home()
    if nvcc_home:  # torch reads CUDA_HOME once, at import, and guesses wrong when nvcc is a wrapper in /usr/local/bin
        os.environ.setdefault("CUDA_HOME", nvcc_home)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [str(ROOT / DCNV3_SOURCES)]
    extensions = [CppExtension("pretrain._dcnv3_cpu", [str(DCNV3_SOURCES / "dcnv3_cpu.cpp")],
                               include_dirs=include, extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])]
    if platform.machine() in ("x86_64", "AMD64"):  # twice the SIMD width where the CPU has it: ~1.5x (fwd) to 2x (bwd)
        extensions.append(CppExtension("pretrain._dcnv3_cpu_avx2", [str(DCNV3_SOURCES / "dcnv3_cpu_avx2.cpp")],
                                       include_dirs=include, extra_compile_args=CPU_FLAGS + ["-march=x86-64-v3"],
                                       extra_link_args=["-fopenmp"]))
    if torch.version.cuda and nvcc_home:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources = [str(DCNV3_SOURCES / name) for name in ("dcnv3_cuda.cu", "dcnv3_cuda_bind.cpp")]
        extensions.append(CUDAExtension(
            CUDA_EXTENSION, sources, include_dirs=include,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))
    return extensions


def build_ext_command():
    from torch.utils.cpp_extension import BuildExtension

    class BuildRecordingArchs(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            if any(ext.name == CUDA_EXTENSION for ext in self.extensions):
                # after run(): an in-place (editable) build's path is the kernel's in the source tree, not build/'s
                record = Path(self.get_ext_fullpath(CUDA_EXTENSION)).with_name(CUDA_BUILD_RECORD)
                record.write_text(json.dumps({"arch_list": os.environ["TORCH_CUDA_ARCH_LIST"]}))

    return BuildRecordingArchs


if __name__ == "__main__":  # pip runs it as __main__; tests import it for its defaults
    setup(
        name="internimage-pretrain",
        version="0.1.0",
        description="Distributed pretraining of InternImage vision foundation models",
        python_requires=">=3.10",
        packages=find_packages(include=["pretrain", "pretrain.*", "launch", "launch.*"]),
        entry_points={"console_scripts": ["pretrain = launch.cli:main"]},
        ext_modules=dcnv3_extensions(),
        cmdclass={"build_ext": build_ext_command()},
    )
