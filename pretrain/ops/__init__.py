"""The DCNv3 operator: one entry point over three backends.

'cuda' and 'cpu' are the fused kernels in csrc/dcnv3 (built by setup.py), 'reference' is the pure-PyTorch definition in
reference.py. With backend=None the fastest backend that handles the tensors' device and dtype runs, except that CUDA
tensors without the CUDA kernel are an error naming why it did not load (the reference only by name). Arguments follow the
public release's order, so code written against it ports unchanged; semantics are in the reference.
"""
import contextlib

import torch

from pretrain.ops.kernels import EXTENSIONS, KERNEL_DTYPES, dcnv3_kernel, not_loaded_reason
from pretrain.ops.reference import dcnv3_reference, output_size

BACKENDS = ("cuda", "cpu", "reference")
_default_backend: str | None = None  # what backend=None means; set by `default_backend`


@contextlib.contextmanager
def default_backend(name: str):
    """Within it, every dcnv3 call that names no backend runs on `name`: the whole model on one backend without
    touching its modules (the ONNX export traces the reference; the inference benchmark times each path)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown DCNv3 backend {name!r}; choose one of {BACKENDS}")
    previous, _default_backend = _default_backend, name
    try:
        yield
    finally:
        _default_backend = previous


def available_backends() -> list[str]:
    """The backends that can run here, fastest first: a kernel is listed when it is built and its device is present."""
    usable = {"cuda": EXTENSIONS["cuda"] is not None and torch.cuda.is_available(),
              "cpu": EXTENSIONS["cpu"] is not None, "reference": True}
    return [name for name in BACKENDS if usable[name]]


def dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
          group, group_channels, offset_scale, remove_center=False, *, backend=None, mask_softmax=False):
    """Deformable convolution v3 on channels-last tensors.

    input (N, H, W, group*group_channels), offset (N, H_out, W_out, group*P*2), mask (N, H_out, W_out, group*P) with
    P = kernel_h*kernel_w - remove_center. With mask_softmax=True, `mask` holds logits and each group's P weights are
    their softmax (fused into the kernels). Returns (N, H_out, W_out, group*group_channels).
    """
    layout = [int(v) for v in (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                               group, group_channels)]
    remove_center = bool(remove_center)
    _check_arguments(input, offset, mask, layout, remove_center)
    backend = _choose_backend(input, backend)
    if backend == "reference":
        return _reference(input, offset, mask, layout, float(offset_scale), remove_center, mask_softmax)
    return dcnv3_kernel(input, offset, mask, layout, float(offset_scale), remove_center, bool(mask_softmax))


def _reference(input, offset, mask, layout, offset_scale, remove_center, mask_softmax):
    if mask_softmax:
        n, h_out, w_out, _ = mask.shape
        group = layout[8]
        mask = torch.softmax(mask.view(n, h_out, w_out, group, -1), dim=-1).view(n, h_out, w_out, -1)
    return dcnv3_reference(input, offset, mask, *layout, offset_scale, remove_center)


def _kernel_handles(name: str, input: torch.Tensor) -> bool:
    return input.dtype in KERNEL_DTYPES[name] and EXTENSIONS[name] is not None


def _choose_backend(input: torch.Tensor, backend: str | None) -> str:
    device = input.device.type
    backend = backend or _default_backend
    if backend is None:
        if device == "meta":  # tracing: the kernels' fake implementation gives the shapes
            return "cpu"
        if device == "cuda" and EXTENSIONS["cuda"] is None:  # the reference on a GPU is 7-10x slower: never silently
            raise RuntimeError(f"{not_loaded_reason('cuda')}; or pass backend='reference' to run the slow reference")
        return device if device in KERNEL_DTYPES and _kernel_handles(device, input) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown DCNv3 backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return backend
    if EXTENSIONS[backend] is None:
        raise ValueError(f"{not_loaded_reason(backend)}; available backends: {available_backends()}")
    if device not in (backend, "meta"):
        raise ValueError(f"backend {backend!r} needs {backend} tensors, got tensors on {input.device}")
    if input.dtype not in KERNEL_DTYPES[backend]:
        raise TypeError(f"backend {backend!r} supports {KERNEL_DTYPES[backend]}, got {input.dtype}; "
                        "use backend='reference' for other dtypes")
    return backend


def _check_arguments(input, offset, mask, layout, remove_center):
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels = layout
    _check_tensors(input, offset, mask)
    if min(kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, group, group_channels) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError(f"DCNv3 needs positive kernel, stride, dilation, group and group_channels and non-negative "
                         f"padding, got {layout}")
    if remove_center and (kernel_h != kernel_w or kernel_h % 2 == 0):
        raise ValueError(f"remove_center needs a square kernel of odd size, got {kernel_h}x{kernel_w}")
    n, h_in, w_in, channels = input.shape
    if channels != group * group_channels:
        hint = " (input looks channels-first; DCNv3 takes (N, H, W, C))" if h_in == group * group_channels else ""
        raise ValueError(f"input has {channels} channels in its last dim, expected group*group_channels = "
                         f"{group * group_channels}{hint}")
    h_out = output_size(h_in, kernel_h, stride_h, pad_h, dilation_h)
    w_out = output_size(w_in, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"input of {h_in}x{w_in} is too small for this kernel, padding and dilation")
    points = kernel_h * kernel_w - int(remove_center)
    for name, tensor, per_group in (("offset", offset, 2 * points), ("mask", mask, points)):
        expected = (n, h_out, w_out, group * per_group)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} (N, H_out, W_out, "
                             f"group*{'P*2' if name == 'offset' else 'P'}) with P = {points}")


def _check_tensors(input, offset, mask):
    named = {"input": input, "offset": offset, "mask": mask}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"DCNv3 {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"DCNv3 {name} must be 4-d channels-last (N, H, W, C), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"DCNv3 {name} must be floating point, got {tensor.dtype}")
        if tensor.dtype != input.dtype:
            raise TypeError(f"DCNv3 {name} is {tensor.dtype} but input is {input.dtype}; all three must match")
        if tensor.device != input.device:
            raise ValueError(f"DCNv3 {name} is on {tensor.device} but input is on {input.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"DCNv3 {name} must be contiguous in channels-last (N, H, W, C) layout; "
                             "call .contiguous() on it")


__all__ = ["dcnv3", "dcnv3_reference", "available_backends", "default_backend"]
