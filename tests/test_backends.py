"""What a run computes with: the arch list the CUDA kernel is built for (with PTX for the newest), recorded at build
time; the GPU math settings of the config reaching torch.backends; the start-up line naming kernels, GPU, optimizer
and precision before the first step."""
import importlib.util
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, stage_command

from pretrain.config import load_stage_config
from pretrain.engine.backends import apply_cuda_settings, startup_line
from pretrain.ops import kernels


@pytest.fixture(scope="module")
def setup_script():
    spec = importlib.util.spec_from_file_location("setup_script", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the build, runs no setup()
    return module


@pytest.fixture
def torch_backends():
    """Put torch's process-wide flags back after the test (monkeypatch cannot: cuBLAS's are module properties)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_default_arch_list_builds_ptx_for_the_newest_arch(setup_script, monkeypatch):
    """nvcc gets the newest arch's PTX (code=compute_XY) besides every listed arch's native code (code=sm_XY)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_script.DEFAULT_CUDA_ARCH_LIST)
    flags = _get_cuda_arch_flags()
    native = sorted(flag.rsplit("sm_", 1)[1] for flag in flags if "code=sm_" in flag)
    assert native == ["80", "90"]
    newest = native[-1]
    ptx = [flag for flag in flags if "code=compute_" in flag]
    assert ptx == [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


@pytest.mark.parametrize("editable", [False, True])
def test_the_build_records_the_arch_list_where_the_start_up_line_reads_it(setup_script, monkeypatch, tmp_path,
                                                                          editable):
    """The build command writes the arch list beside the CUDA kernel, wherever it lands: build/ for a wheel, the
    source tree (here tmp_path) for `pip install -e .`; kernels_line reports it from there."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    monkeypatch.setattr(build_ext, "run", lambda self: None)  # the compilation itself, minutes of nvcc
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;10.0+PTX")
    monkeypatch.chdir(tmp_path)
    kernel_dir = tmp_path / ("pretrain" if editable else "build/pretrain")
    kernel_dir.mkdir(parents=True)
    command = setup_script.build_ext_command()(Distribution({"ext_modules": [Extension(setup_script.CUDA_EXTENSION,
                                                                                       [])]}))
    command.build_lib, command.editable_mode = str(tmp_path / "build"), editable
    command.ensure_finalized()
    command.run()
    kernel = SimpleNamespace(__name__=setup_script.CUDA_EXTENSION, __file__=str(kernel_dir / "_dcnv3_cuda.so"))
    assert kernels.built_arch_list(kernel) == "9.0;10.0+PTX"
    monkeypatch.setitem(kernels.EXTENSIONS, "cuda", kernel)
    assert "cuda: _dcnv3_cuda built for 9.0;10.0+PTX" in kernels.kernels_line()


def test_kernels_line_says_why_the_cuda_kernel_did_not_load(monkeypatch):
    monkeypatch.setitem(kernels.EXTENSIONS, "cuda", None)
    monkeypatch.setitem(kernels.LOAD_ERRORS, "_dcnv3_cuda", ImportError("undefined symbol: _ZN3c10abi"))
    line = kernels.kernels_line()
    assert "cuda: the DCNv3 cuda kernel did not load (_dcnv3_cuda: undefined symbol: _ZN3c10abi); build it" in line


@pytest.mark.parametrize("overrides, expected", [
    ([], (True, True, True)),
    (["cuda.tf32=false", "cuda.cudnn_benchmark=false"], (False, False, False)),
])
def test_cuda_settings_of_the_config_reach_torch_backends(torch_backends, overrides, expected):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected[0]
    torch.backends.cudnn.benchmark = not expected[2]
    apply_cuda_settings(load_stage_config(REPO / "configs/demo/pretrain.yaml", overrides).cuda)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == expected


def test_start_up_line_names_kernels_gpu_optimizer_and_precision(torch_backends):
    apply_cuda_settings(load_stage_config(REPO / "configs/demo/pretrain.yaml", ["cuda.cudnn_benchmark=false"]).cuda)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=False)
    assert startup_line(torch.device("cpu"), optimizer, "bf16") == (
        f"{kernels.kernels_line()} | GPU: none (cpu) | optimizer: torch.optim.adamw.AdamW (fused=False) | "
        "precision: bf16, TF32 matmul on, cudnn TF32 on, cudnn.benchmark off")


def test_a_run_prints_the_start_up_line(tmp_path):
    """On the real engine, printed while the trainer is built (before the first step): the settings it applied, the
    optimizer DeepSpeed built."""
    proc = subprocess.run(stage_command(tmp_path, "max_steps=1", "cuda.tf32=false", nproc=1), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("[rank 0] DCNv3 kernels: "))
    assert line == (f"[rank 0] {kernels.kernels_line()} | GPU: none (cpu) | optimizer: torch.optim.adamw.AdamW (fused=True) | "
                    "precision: fp32, TF32 matmul off, cudnn TF32 off, cudnn.benchmark on")
