"""The DCNv3 CUDA kernel: that it was compiled wherever nvcc is, and, where a GPU is present, that it matches the float64
reference in every storage dtype, for all three gradients and the fused softmax."""
import os
import shutil
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.ops import available_backends, dcnv3
from test_dcnv3_cpu import make_case, relative_error

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def nvcc_present() -> bool:
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and Path(h, "bin", "nvcc").exists() for h in homes)


@pytest.mark.skipif(not (torch.version.cuda and nvcc_present()), reason="torch without CUDA, or no nvcc")
def test_cuda_extension_was_compiled():
    built = list(Path(pretrain.__file__).parent.glob("_dcnv3_cuda*.so"))
    assert built, "setup.py did not build pretrain._dcnv3_cuda although nvcc is present"
    # Loading needs no GPU, only torch's CUDA libraries, so this also runs on CI machines without one.
    from pretrain import _dcnv3_cuda

    assert callable(_dcnv3_cuda.forward) and callable(_dcnv3_cuda.backward)


# (n, h_in, w_in, kernel, stride, pad, dilation, group, group_channels, remove_center, offset_range); the group_channels
# values reach every vector width (1, 2, 4, 8) and a team that loops over more chunks than a warp has lanes.
SHAPES = [
    (2, 14, 13, (3, 3), 1, 1, 1, 4, 16, False, 2.0),
    (1, 11, 12, (3, 3), 1, 1, 1, 3, 32, True, 3.0),
    (2, 9, 10, (5, 5), 2, 2, 1, 2, 6, False, 4.0),
    (1, 10, 9, (3, 3), 1, 2, 2, 3, 3, True, 50.0),
    (1, 7, 8, (3, 3), 1, 1, 1, 2, 264, False, 1.5),
    (2, 8, 8, (3, 5), 1, 1, 1, 5, 8, False, 2.0),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def kernel_and_reference(shape, dtype, mask_softmax, offset_scale=1.0, seed=0):
    """Outputs and gradients of the CUDA kernel, and of the float64 reference on the same dtype-rounded values."""
    tensors, layout = make_case(*shape, dtype=dtype, seed=seed)
    remove_center = shape[9]
    results = []
    for backend, device, cast in (("cuda", "cuda", dtype), ("reference", "cpu", torch.float64)):
        leaves = [t.to(device, cast).requires_grad_() for t in tensors]
        out = dcnv3(*leaves, *layout, offset_scale, remove_center, backend=backend, mask_softmax=mask_softmax)
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad_output.to(device, cast))
        results.append((out, *grads))
    return results


@needs_gpu
def test_cuda_backend_is_available_and_default():
    assert available_backends()[0] == "cuda"
    tensors, layout = make_case(*SHAPES[0], dtype=torch.float32)
    cuda = [t.cuda() for t in tensors]
    assert relative_error(dcnv3(*cuda, *layout, 1.0), dcnv3(*cuda, *layout, 1.0, backend="cuda")) == 0


@needs_gpu
@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"G{s[7]}D{s[8]}k{s[3][0]}x{s[3][1]}s{s[4]}")
def test_matches_float64_reference(shape, dtype, mask_softmax):
    kernel, reference = kernel_and_reference(shape, dtype, mask_softmax, offset_scale=1.0 if shape[8] != 6 else 1.7)
    assert kernel[0].dtype == dtype
    for name, actual, expected in zip(("output", "input", "offset", "mask"), kernel, reference):
        assert torch.isfinite(actual).all(), name
        error = relative_error(actual.cpu(), expected)
        assert error < TOLERANCE[dtype], f"{name}: {error:.3g}"


@needs_gpu
def test_every_output_written():
    """Freeing a NaN-filled block of exactly the output's size makes the caching allocator hand that block to the
    kernel's output, so an element the kernel skipped would read NaN."""
    tensors, layout = make_case(*SHAPES[2], dtype=torch.bfloat16)
    cuda = [t.cuda() for t in tensors]
    shape = dcnv3(*cuda, *layout, 1.0, backend="cuda").shape
    for _ in range(3):
        poison = torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
        del poison
        assert torch.isfinite(dcnv3(*cuda, *layout, 1.0, backend="cuda")).all()


@needs_gpu
def test_compiled_graph_on_gpu():
    tensors, layout = make_case(*SHAPES[0], dtype=torch.float32)
    leaves = [t.cuda().requires_grad_() for t in tensors]
    compiled = torch.compile(lambda *a: dcnv3(*a, *layout, 1.0, mask_softmax=True), backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    out.sum().backward()
    assert relative_error(out, dcnv3(*[t.detach() for t in leaves], *layout, 1.0, mask_softmax=True)) == 0
