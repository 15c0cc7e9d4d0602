"""The DCNv3 operator. Until the fused kernels land, every call runs the pure-PyTorch reference."""
from pretrain.ops.reference import dcnv3_reference


def available_backends() -> list[str]:
    return ["reference"]


def dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
          group, group_channels, offset_scale, remove_center=False, *, backend=None):
    if backend not in (None, "reference"):
        raise ValueError(f"DCNv3 backend {backend!r} is not available; available: {available_backends()}")
    return dcnv3_reference(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


__all__ = ["dcnv3", "dcnv3_reference", "available_backends"]
