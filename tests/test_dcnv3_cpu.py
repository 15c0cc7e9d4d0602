"""The DCNv3 CPU kernel against the pure-PyTorch reference, plus the operator's registration and argument checks."""
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.ops import available_backends, dcnv3
from pretrain.ops.kernels import dcnv3_kernel
from pretrain.ops.reference import output_size


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖, and 0 when both are exactly zero (every point sampled outside the image)."""
    difference = (actual.double() - expected.double()).norm().item()
    return 0.0 if difference == 0 else difference / max(expected.double().norm().item(), 1e-300)


def make_case(n, h_in, w_in, kernel, stride, pad, dilation, group, group_channels, remove_center, offset_range,
              dtype=torch.float64, seed=0):
    """Random inputs, offsets spread over ±offset_range pixels and mask weights or logits, all channels-last."""
    generator = torch.Generator().manual_seed(seed)
    kernel_h, kernel_w = kernel
    h_out = output_size(h_in, kernel_h, stride, pad, dilation)
    w_out = output_size(w_in, kernel_w, stride, pad, dilation)
    points = kernel_h * kernel_w - int(remove_center)
    input = torch.randn(n, h_in, w_in, group * group_channels, generator=generator, dtype=torch.float64)
    offset = (torch.rand(n, h_out, w_out, group * points * 2, generator=generator, dtype=torch.float64) * 2 - 1)
    mask = torch.randn(n, h_out, w_out, group * points, generator=generator, dtype=torch.float64)
    offset = (offset * offset_range).to(dtype)
    if offset_range > 0:
        # Coarse dtypes round some offsets to integers, putting points on the kink of bilinear sampling where the
        # derivative is one-sided; move those off it so the offset gradient is well defined.
        offset = torch.where(offset == offset.round(), offset + 1 / 32, offset)
    tensors = [input.to(dtype), offset, mask.to(dtype)]
    layout = (kernel_h, kernel_w, stride, stride, pad, pad, dilation, dilation, group, group_channels)
    return tensors, layout


def run_with_grads(tensors, layout, offset_scale, remove_center, backend, mask_softmax, grad_output=None, upcast=False):
    leaves = [t.detach().double().requires_grad_() if upcast else t.detach().requires_grad_() for t in tensors]
    out = dcnv3(*leaves, *layout, offset_scale, remove_center, backend=backend, mask_softmax=mask_softmax)
    if grad_output is None:
        grad_output = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype))
    return out, grads, grad_output


def assert_matches_reference(tensors, layout, offset_scale, remove_center, mask_softmax, tolerance, upcast=False,
                             compared=("output", "input", "offset", "mask")):
    out, grads, grad_output = run_with_grads(tensors, layout, offset_scale, remove_center, "cpu", mask_softmax)
    ref, ref_grads, _ = run_with_grads(tensors, layout, offset_scale, remove_center, "reference", mask_softmax,
                                       grad_output, upcast=upcast)
    assert out.dtype == tensors[0].dtype
    for name, actual, expected in zip(("output", "input", "offset", "mask"), (out, *grads), (ref, *ref_grads)):
        if name not in compared:
            continue
        assert relative_error(actual, expected) < tolerance, f"{name}: {relative_error(actual, expected):.3g}"


def test_cpu_kernel_is_built():
    assert "cpu" in available_backends()


@pytest.mark.skipif(importlib.util.find_spec("pretrain._dcnv3_cpu_avx2") is None, reason="no AVX2 build (not x86-64)")
def test_avx2_and_baseline_builds_agree():
    """pretrain.ops uses one of the two builds; this checks the other computes the same."""
    from pretrain import _dcnv3_cpu, _dcnv3_cpu_avx2

    tensors, layout = make_case(2, 7, 6, (3, 3), 1, 1, 1, 3, 5, True, 2.0, seed=29)
    grad_output = torch.randn(2, 7, 6, 15, dtype=torch.float64)
    results = [(build.forward(*tensors, list(layout), 1.5, True, True),
                *build.backward(*tensors, grad_output, list(layout), 1.5, True, True))
               for build in (_dcnv3_cpu, _dcnv3_cpu_avx2)]
    for baseline, avx2 in zip(*results):
        assert relative_error(avx2, baseline) < 1e-13


@st.composite
def geometries(draw):
    kernel_size = draw(st.sampled_from([3, 5]))
    remove_center = draw(st.booleans())
    kernel_w = kernel_size if remove_center else draw(st.sampled_from([kernel_size, 3]))
    stride, pad, dilation = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    reach_h = dilation * (kernel_size - 1) + 1 - 2 * pad
    reach_w = dilation * (kernel_w - 1) + 1 - 2 * pad
    return dict(n=draw(st.integers(1, 2)), h_in=max(1, reach_h) + draw(st.integers(0, 4)),
                w_in=max(1, reach_w) + draw(st.integers(0, 4)), kernel=(kernel_size, kernel_w), stride=stride,
                pad=pad, dilation=dilation, group=draw(st.integers(1, 3)), group_channels=draw(st.integers(1, 7)),
                remove_center=remove_center, offset_range=draw(st.sampled_from([1.5, 4.0, 300.0])))


@settings(max_examples=60, deadline=None)
@given(geometry=geometries(), offset_scale=st.sampled_from([1.0, 0.5, 2.0, 1.7]), mask_softmax=st.booleans(),
       seed=st.integers(0, 2**16))
def test_float64_matches_reference(geometry, offset_scale, mask_softmax, seed):
    tensors, layout = make_case(**geometry, seed=seed)
    assert_matches_reference(tensors, layout, offset_scale, geometry["remove_center"], mask_softmax, 1e-10)


def test_zero_offsets_match_reference():
    """The state at initialisation: every point on a pixel centre. The offset gradient is left out because bilinear
    sampling has a kink there, where the kernel takes the right derivative and grid_sample either side by rounding."""
    tensors, layout = make_case(2, 6, 7, (3, 3), 1, 1, 1, 2, 5, False, 0.0, seed=23)
    assert_matches_reference(tensors, layout, 1.0, False, True, 1e-10, compared=("output", "input", "mask"))


@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("remove_center", [False, True])
def test_gradcheck(remove_center, mask_softmax):
    tensors, layout = make_case(1, 4, 5, (3, 3), 1, 1, 1, 2, 3, remove_center, 2.0, seed=3)
    leaves = [t.requires_grad_() for t in tensors]

    def op(*args):
        return dcnv3(*args, *layout, 1.3, remove_center, backend="cpu", mask_softmax=mask_softmax)

    assert torch.autograd.gradcheck(op, leaves)


@pytest.mark.parametrize("mask_softmax", [False, True])
def test_bfloat16_within_bfloat16_tolerance(mask_softmax):
    tensors, layout = make_case(2, 9, 8, (3, 3), 1, 1, 1, 4, 16, False, 2.0, dtype=torch.bfloat16, seed=5)
    # The reference runs in float64 on the same bf16-rounded values: the gap is the kernel's own rounding.
    assert_matches_reference(tensors, layout, 1.0, False, mask_softmax, 1e-2, upcast=True)


def test_float32_matches_reference():
    tensors, layout = make_case(2, 8, 9, (5, 5), 2, 2, 1, 3, 8, True, 3.0, dtype=torch.float32, seed=7)
    assert_matches_reference(tensors, layout, 1.0, True, True, 1e-5, upcast=True)


def test_mask_softmax_equals_explicit_softmax():
    (input, offset, logits), layout = make_case(1, 6, 6, (3, 3), 1, 1, 1, 2, 4, False, 2.0, seed=11)
    weights = torch.softmax(logits.view(1, 6, 6, 2, 9), -1).view(1, 6, 6, 18)
    fused = dcnv3(input, offset, logits, *layout, 1.0, backend="cpu", mask_softmax=True)
    explicit = dcnv3(input, offset, weights, *layout, 1.0, backend="cpu")
    assert relative_error(fused, explicit) < 1e-12


def test_default_backend_is_the_cpu_kernel_and_agrees():
    tensors, layout = make_case(1, 5, 5, (3, 3), 1, 1, 1, 1, 4, False, 1.0, seed=13)
    assert relative_error(dcnv3(*tensors, *layout, 1.0), dcnv3(*tensors, *layout, 1.0, backend="cpu")) == 0
    # float16 has no CPU kernel: the default falls back to the reference instead of failing.
    half = [t.half() for t in tensors]
    assert dcnv3(*half, *layout, 1.0).dtype == torch.float16


def test_fake_kernel_gives_shapes_on_meta_and_under_compile():
    tensors, layout = make_case(2, 9, 7, (3, 3), 2, 1, 1, 2, 3, False, 1.0, seed=17)
    meta = [t.to("meta") for t in tensors]
    out = dcnv3(*meta, *layout, 1.0)
    assert out.device.type == "meta" and out.shape == (2, 5, 4, 6)

    leaves = [t.requires_grad_() for t in tensors]
    compiled = torch.compile(lambda *a: dcnv3(*a, *layout, 1.0, mask_softmax=True), backend="aot_eager",
                             fullgraph=True)
    out = compiled(*leaves)
    out.square().sum().backward()
    eager = dcnv3(*[t.detach() for t in tensors], *layout, 1.0, mask_softmax=True)
    assert relative_error(out, eager) < 1e-12 and all(t.grad is not None for t in leaves)


def test_opcheck_registration():
    tensors, layout = make_case(1, 5, 4, (3, 3), 1, 1, 1, 2, 3, True, 2.0, seed=19)
    leaves = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(dcnv3_kernel, (*leaves, list(layout), 1.0, True, True))


def good_arguments():
    (input, offset, mask), layout = make_case(1, 5, 5, (3, 3), 1, 1, 1, 2, 4, False, 1.0)
    return [input, offset, mask, *layout, 1.0]


def replaced(index, value):
    arguments = good_arguments()
    arguments[index] = value(arguments[index]) if callable(value) else value
    return arguments


@pytest.mark.parametrize("arguments, error, message", [
    (replaced(0, lambda t: t[0]), ValueError, "4-d"),
    (replaced(0, lambda t: t.permute(0, 3, 1, 2).contiguous()), ValueError, "channels"),
    (replaced(0, lambda t: t.permute(0, 2, 1, 3)), ValueError, "contiguous"),
    (replaced(1, lambda t: t.float()), TypeError, "float32"),
    (replaced(2, lambda t: t.long()), TypeError, "floating point"),
    (replaced(1, lambda t: t[..., :-2].contiguous()), ValueError, "offset has shape"),
    (replaced(2, lambda t: t[:, :4].contiguous()), ValueError, "mask has shape"),
    (replaced(3, 4) + [True], ValueError, "remove_center"),
    (replaced(4, 5) + [True], ValueError, "remove_center"),
    (replaced(12, 0), ValueError, "group_channels"),
    (replaced(0, "not a tensor"), TypeError, "must be a tensor"),
])
def test_clear_errors(arguments, error, message):
    with pytest.raises(error, match=message):
        dcnv3(*arguments)


def test_backend_errors():
    arguments = good_arguments()
    with pytest.raises(ValueError, match="unknown DCNv3 backend"):
        dcnv3(*arguments, backend="tpu")
    with pytest.raises(TypeError, match="supports"):
        dcnv3(*[a.half() if isinstance(a, torch.Tensor) else a for a in arguments], backend="cpu")
    if "cuda" in available_backends():
        with pytest.raises(ValueError, match="needs cuda tensors"):
            dcnv3(*arguments, backend="cuda")


def test_cuda_tensor_without_the_cuda_kernel_is_an_error_naming_the_import_error(monkeypatch):
    """A GPU run without the built kernel must stop, not fall back to the 7-10x slower reference; the tensor is a
    stand-in with a CUDA device, as the choice reads only device and dtype."""
    from types import SimpleNamespace

    from pretrain.ops import _choose_backend, kernels

    monkeypatch.setitem(kernels.EXTENSIONS, "cuda", None)
    monkeypatch.setitem(kernels.LOAD_ERRORS, "_dcnv3_cuda", ImportError("undefined symbol: _ZN3c10abi"))
    cuda_tensor = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"did not load \(_dcnv3_cuda: undefined symbol: _ZN3c10abi\).*pip install"):
        _choose_backend(cuda_tensor, None)
    assert _choose_backend(cuda_tensor, "reference") == "reference"
    with pytest.raises(ValueError, match="undefined symbol"):
        _choose_backend(cuda_tensor, "cuda")
