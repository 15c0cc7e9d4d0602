"""The compiled DCNv3 kernels as torch.library custom ops, with fake kernels and autograd.

`pretrain::dcnv3` runs the CPU or the CUDA extension according to the tensors' device; `pretrain::dcnv3_backward` returns
the three gradients in one pass. Fake kernels give shapes only, so torch.compile and meta-device tracing see through
both. `layout` is the release's integer arguments in its order (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
dilation_h, dilation_w, group, group_channels).
"""
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from pretrain.ops.reference import output_size

# What each compiled kernel stores and computes in; anything else goes to the reference.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


BUILD_HINT = "build it with `pip install --no-build-isolation -e .` where nvcc is on PATH (docs/gpu_check.md)"

# Why each extension that is not loaded did not load (never built, an ABI or CUDA mismatch): kept so that the error
# a tensor meets later names the cause instead of a bare "not built".
LOAD_ERRORS: dict[str, ImportError] = {}


def _import_extension(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"pretrain.{name}")
    except ImportError as error:
        LOAD_ERRORS[name] = error
        return None


def _import_cpu_extension() -> ModuleType | None:
    """The AVX2 build where torch finds AVX2 (or better) on this CPU, else the baseline build."""
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return (avx2 and _import_extension("_dcnv3_cpu_avx2")) or _import_extension("_dcnv3_cpu")


EXTENSIONS = {"cpu": _import_cpu_extension(), "cuda": _import_extension("_dcnv3_cuda")}


def not_loaded_reason(device_type: str) -> str:
    """One line: why the `device_type` kernel is not loaded, and how to build it."""
    names = ("_dcnv3_cpu_avx2", "_dcnv3_cpu") if device_type == "cpu" else (f"_dcnv3_{device_type}",)
    causes = "; ".join(f"{name}: {LOAD_ERRORS[name]}" for name in names if name in LOAD_ERRORS) or "no extension"
    return f"the DCNv3 {device_type} kernel did not load ({causes}); {BUILD_HINT}"


CUDA_BUILD_RECORD = "_dcnv3_cuda_build.json"  # setup.py writes it beside the CUDA kernel: the arch list it is built for


def built_arch_list(extension: ModuleType) -> str | None:
    """The TORCH_CUDA_ARCH_LIST the CUDA kernel was compiled for, as its build recorded it; None: not recorded."""
    try:
        return json.loads(Path(extension.__file__).with_name(CUDA_BUILD_RECORD).read_text())["arch_list"]
    except (OSError, ValueError, KeyError):
        return None


def kernels_line() -> str:
    """Which DCNv3 kernel each device type runs: the extension loaded (the CUDA one with its arch list), or why none."""
    return "DCNv3 kernels: " + "; ".join(_described(device_type, ext) for device_type, ext in EXTENSIONS.items())


def _described(device_type: str, extension: ModuleType | None) -> str:
    if extension is None:
        return f"{device_type}: {not_loaded_reason(device_type)}"
    name = extension.__name__.rsplit(".", 1)[-1]
    if device_type != "cuda":
        return f"{device_type}: {name}"
    arch_list = built_arch_list(extension) or "an unrecorded arch list (built before setup.py recorded it)"
    return f"cuda: {name} built for {arch_list}"


def _extension(device: torch.device) -> ModuleType:
    extension = EXTENSIONS.get(device.type)
    if extension is None:
        raise RuntimeError(not_loaded_reason(device.type))
    return extension


@torch.library.custom_op("pretrain::dcnv3", mutates_args=())
def dcnv3_kernel(input: Tensor, offset: Tensor, mask: Tensor, layout: list[int], offset_scale: float,
                 remove_center: bool, mask_softmax: bool) -> Tensor:
    return _extension(input.device).forward(input, offset, mask, layout, offset_scale, remove_center, mask_softmax)


@dcnv3_kernel.register_fake
def _(input, offset, mask, layout, offset_scale, remove_center, mask_softmax):
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels = layout
    h_out = output_size(input.shape[1], kernel_h, stride_h, pad_h, dilation_h)
    w_out = output_size(input.shape[2], kernel_w, stride_w, pad_w, dilation_w)
    return input.new_empty(input.shape[0], h_out, w_out, group * group_channels)


@torch.library.custom_op("pretrain::dcnv3_backward", mutates_args=())
def dcnv3_backward_kernel(grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor, layout: list[int],
                          offset_scale: float, remove_center: bool, mask_softmax: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _extension(input.device).backward(input, offset, mask, grad_output, layout, offset_scale, remove_center,
                                              mask_softmax)
    return tuple(grads)


@dcnv3_backward_kernel.register_fake
def _(grad_output, input, offset, mask, layout, offset_scale, remove_center, mask_softmax):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask, *ctx.arguments = inputs
    ctx.save_for_backward(input, offset, mask)


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grads = dcnv3_backward_kernel(grad_output.contiguous(), input, offset, mask, *ctx.arguments)
    return (*grads, None, None, None, None)


torch.library.register_autograd("pretrain::dcnv3", _backward, setup_context=_setup_context)
