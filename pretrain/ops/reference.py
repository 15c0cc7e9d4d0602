"""Pure-PyTorch DCNv3: the operator's semantics written with grid_sample.

Slow and memory-hungry (it materialises every sampled point), but simple enough to trust: the fused kernels are tested
against it. It computes in the input's dtype throughout, so float64 inputs give a float64 reference.
"""
import torch
import torch.nn.functional as F


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def kernel_points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, device, dtype):
    """(P,) x and y displacements of the fixed kernel grid around its centre, in the operator's width-major order."""
    i, j = torch.meshgrid(torch.arange(kernel_w, device=device), torch.arange(kernel_h, device=device), indexing="ij")
    x = (i * dilation_w - (dilation_w * (kernel_w - 1)) // 2).flatten()
    y = (j * dilation_h - (dilation_h * (kernel_h - 1)) // 2).flatten()
    if remove_center:
        keep = torch.ones_like(x, dtype=torch.bool)
        keep[(kernel_w // 2) * kernel_h + kernel_h // 2] = False
        x, y = x[keep], y[keep]
    return x.to(dtype), y.to(dtype)


def dcnv3_reference(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center=False):
    n, h_in, w_in, _ = input.shape
    h_out = output_size(h_in, kernel_h, stride_h, pad_h, dilation_h)
    w_out = output_size(w_in, kernel_w, stride_w, pad_w, dilation_w)
    points = kernel_h * kernel_w - int(remove_center)
    dtype, device = input.dtype, input.device

    kx, ky = kernel_points(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, device, dtype)
    centre_x = torch.arange(w_out, device=device, dtype=dtype) * stride_w - pad_w + (dilation_w * (kernel_w - 1)) // 2
    centre_y = torch.arange(h_out, device=device, dtype=dtype) * stride_h - pad_h + (dilation_h * (kernel_h - 1)) // 2
    off = offset.reshape(n, h_out, w_out, group, points, 2)
    x = centre_x.view(1, 1, w_out, 1, 1) + (kx + off[..., 0]) * offset_scale
    y = centre_y.view(1, h_out, 1, 1, 1) + (ky + off[..., 1]) * offset_scale

    # grid_sample with align_corners=False puts pixel k's centre at (2k+1)/size - 1; zeros outside the image.
    grid = torch.stack(((2 * x + 1) / w_in - 1, (2 * y + 1) / h_in - 1), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out, points, 2)
    value = input.reshape(n, h_in * w_in, group, group_channels).permute(0, 2, 3, 1)
    value = value.reshape(n * group, group_channels, h_in, w_in)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    weights = mask.reshape(n, h_out * w_out, group, points).permute(0, 2, 1, 3).reshape(n * group, 1, h_out * w_out, points)
    out = (sampled * weights).sum(-1)  # (n*group, group_channels, h_out*w_out)
    return out.reshape(n, group * group_channels, h_out * w_out).transpose(1, 2).reshape(n, h_out, w_out, -1)
