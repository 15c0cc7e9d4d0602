"""The DCNv3 CUDA kernel: that it was compiled wherever nvcc is, and, where a GPU is present, that it matches the float64
reference and the CPU kernel in every storage dtype, for all three gradients, the fused softmax and every geometry the
operator takes (remove_center, stride 2, dilation 2, kernel 5, offset_scale != 1); views it must accept or refuse; and
whether two backward passes agree bit for bit."""
import os
import shutil
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.ops import available_backends, dcnv3
from pretrain.ops.reference import output_size
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


def shape_id(s):
    return f"G{s[7]}D{s[8]}k{s[3][0]}x{s[3][1]}s{s[4]}d{s[6]}" + ("rc" if s[9] else "")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("output", "input", "offset", "mask")


@needs_gpu
@pytest.mark.parametrize("offset_scale", [1.0, 1.7])
@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_reference(shape, dtype, mask_softmax, offset_scale):
    kernel, reference = kernel_and_reference(shape, dtype, mask_softmax, offset_scale)
    assert kernel[0].dtype == dtype
    for name, actual, expected in zip(NAMES, kernel, reference):
        assert torch.isfinite(actual).all(), name
        error = relative_error(actual.cpu(), expected)
        assert error < TOLERANCE[dtype], f"{name}: {error:.3g}"


def outputs_and_grads(tensors, layout, offset_scale, remove_center, mask_softmax, backend, grad_output):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = dcnv3(*leaves, *layout, offset_scale, remove_center, backend=backend, mask_softmax=mask_softmax)
    return (out, *torch.autograd.grad(out, leaves, grad_output))


@needs_gpu
@pytest.mark.parametrize("offset_scale", [1.0, 0.6])
@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_cpu_kernel(shape, dtype, mask_softmax, offset_scale):
    """Both kernels share one sampling core and differ only in accumulation order; each is within TOLERANCE of the
    float64 reference, so they are within twice that of each other. The CPU kernel has no float16: for that dtype it
    runs in float32 on the same float16-rounded values."""
    tensors, layout = make_case(*shape, dtype=dtype, seed=7)
    cpu_dtype = torch.float32 if dtype == torch.float16 else dtype
    n, h_in, w_in, kernel, stride, pad, dilation, group, group_channels = shape[:9]
    out_shape = (n, output_size(h_in, kernel[0], stride, pad, dilation), output_size(w_in, kernel[1], stride, pad,
                                                                                      dilation), group * group_channels)
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cuda = outputs_and_grads([t.cuda() for t in tensors], layout, offset_scale, shape[9], mask_softmax, "cuda",
                             grad_output.to("cuda", dtype))
    cpu = outputs_and_grads([t.to(cpu_dtype) for t in tensors], layout, offset_scale, shape[9], mask_softmax, "cpu",
                            grad_output.to(cpu_dtype))
    for name, on_gpu, on_cpu in zip(NAMES, cuda, cpu):
        error = relative_error(on_gpu.cpu(), on_cpu)
        assert error < 2 * TOLERANCE[dtype], f"{name}: {error:.3g}"


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


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that starts one element into its storage: aligned for no vector width above 1."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_give_the_same_results(dtype):
    """The kernels pick their vector width from the pointers' alignment; views into a larger allocation (a slice of a
    fused projection, say) must take the narrow path, not fault or read across elements."""
    tensors, layout = make_case(*SHAPES[0], dtype=dtype, seed=11)
    cuda = [t.cuda() for t in tensors]
    grad_output = torch.randn(dcnv3(*cuda, *layout, 1.0).shape, device="cuda", dtype=dtype)
    views = [misaligned(t) for t in (*cuda, grad_output)]
    assert all(v.is_contiguous() and v.data_ptr() % (2 * v.element_size()) for v in views)
    fresh = outputs_and_grads(cuda, layout, 1.0, False, True, "cuda", grad_output)
    shifted = outputs_and_grads(views[:3], layout, 1.0, False, True, "cuda", views[3])
    for name, a, b in zip(NAMES, fresh, shifted):
        assert relative_error(b, a) < TOLERANCE[dtype], name


@needs_gpu
def test_non_contiguous_grad_output_is_accepted():
    """Losses hand the backward expanded or transposed gradients (out.sum() gives a stride-0 one)."""
    tensors, layout = make_case(*SHAPES[0], dtype=torch.float32, seed=13)
    cuda = [t.cuda() for t in tensors]
    out_shape = dcnv3(*cuda, *layout, 1.0).shape
    expanded = torch.ones(1, 1, 1, 1, device="cuda").expand(out_shape)
    transposed = torch.randn(out_shape[0], out_shape[2], out_shape[1], out_shape[3], device="cuda").transpose(1, 2)
    for grad_output in (expanded, transposed):
        assert not grad_output.is_contiguous()
        strided = outputs_and_grads(cuda, layout, 1.0, False, True, "cuda", grad_output)
        dense = outputs_and_grads(cuda, layout, 1.0, False, True, "cuda", grad_output.contiguous())
        for name, a, b in zip(NAMES, strided, dense):
            assert relative_error(a, b) < 1e-6, name


@needs_gpu
@pytest.mark.parametrize("which", [0, 1, 2], ids=["input", "offset", "mask"])
def test_strided_inputs_are_refused(which):
    """The op reads channels-last rows directly, so a permuted view is refused with the fix, on the GPU as on CPU."""
    tensors, layout = make_case(*SHAPES[0], dtype=torch.float32)
    cuda = [t.cuda() for t in tensors]
    cuda[which] = cuda[which].transpose(1, 2).contiguous().transpose(1, 2)  # same values, H and W strides swapped
    assert not cuda[which].is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        dcnv3(*cuda, *layout, 1.0)


def backward_grads(cuda, layout, grad_output):
    return outputs_and_grads(cuda, layout, 1.0, False, True, "cuda", grad_output)[1:]


@needs_gpu
@pytest.mark.xfail(strict=True, reason="the CUDA backward adds input gradients with float32 atomics, whose order "
                                       "varies between runs (issue 11: a deterministic backward is still to come)")
def test_backward_is_bitwise_deterministic():
    """Two backward passes on the same inputs must give bit-identical gradients. A T stage-1 batch at float32, with
    offsets that send many points to the same pixels, gives the atomics many collisions, so an order-dependent sum
    shows; strict: once the backward is deterministic this passes, and the marker must go."""
    tensors, layout = make_case(8, 56, 56, (3, 3), 1, 1, 1, 4, 16, False, 1.0, dtype=torch.float32, seed=17)
    cuda = [t.cuda() for t in tensors]
    grad_output = torch.randn(cuda[0].shape, device="cuda", generator=torch.Generator("cuda").manual_seed(18))
    first = backward_grads(cuda, layout, grad_output)
    for _ in range(4):
        for name, a, b in zip(NAMES[1:], first, backward_grads(cuda, layout, grad_output)):
            assert torch.equal(a, b), f"{name} gradient differs between two runs"
