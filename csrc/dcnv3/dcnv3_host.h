// Host-side glue shared by the CPU and CUDA extensions: argument checks and the Geometry of a call.
// The Python wrapper (pretrain/ops) already raises friendly errors; these checks only keep a direct caller from crashing.
#pragma once

#include <torch/extension.h>

#include "dcnv3_core.h"

namespace dcnv3 {

inline int output_size(int size, int kernel, int stride, int pad, int dilation) {
  return (size + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// `layout` is the release's integer arguments in its order: kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
// dilation_h, dilation_w, group, group_channels.
inline Geometry make_geometry(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                              at::IntArrayRef layout, double offset_scale, bool remove_center) {
  TORCH_CHECK(layout.size() == 10, "dcnv3: layout takes 10 integers");
  const int kernel_h = layout[0], kernel_w = layout[1], stride_h = layout[2], stride_w = layout[3], pad_h = layout[4],
            pad_w = layout[5], dilation_h = layout[6], dilation_w = layout[7], groups = layout[8],
            group_channels = layout[9];
  TORCH_CHECK(input.dim() == 4 && offset.dim() == 4 && mask.dim() == 4, "dcnv3: input, offset and mask must be 4-d");
  TORCH_CHECK(input.is_contiguous() && offset.is_contiguous() && mask.is_contiguous(),
              "dcnv3: input, offset and mask must be contiguous channels-last tensors");
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() && mask.scalar_type() == input.scalar_type(),
              "dcnv3: input, offset and mask must share a dtype");
  Geometry g;
  g.batch = input.size(0);
  g.height_in = input.size(1);
  g.width_in = input.size(2);
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  g.groups = groups;
  g.group_channels = group_channels;
  g.remove_center = remove_center;
  g.points = kernel_h * kernel_w - (remove_center ? 1 : 0);
  g.offset_scale = offset_scale;
  g.height_out = output_size(g.height_in, kernel_h, stride_h, pad_h, dilation_h);
  g.width_out = output_size(g.width_in, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK(input.size(3) == g.channels(), "dcnv3: input has ", input.size(3), " channels, expected group*group_channels");
  const std::vector<int64_t> out_hw = {g.batch, g.height_out, g.width_out};
  TORCH_CHECK(offset.sizes().slice(0, 3).vec() == out_hw && offset.size(3) == 2LL * groups * g.points,
              "dcnv3: offset must be (N, H_out, W_out, group*P*2)");
  TORCH_CHECK(mask.sizes().slice(0, 3).vec() == out_hw && mask.size(3) == (int64_t)groups * g.points,
              "dcnv3: mask must be (N, H_out, W_out, group*P)");
  return g;
}

}  // namespace dcnv3

// The Python module of each extension: the same two functions, whichever device they run on.
#define DCNV3_BIND_MODULE(DOC)                                                                                        \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                                                          \
    m.doc() = DOC;                                                                                                    \
    m.def("forward", &dcnv3::forward, "DCNv3 forward", pybind11::arg("input"), pybind11::arg("offset"),               \
          pybind11::arg("mask"), pybind11::arg("layout"), pybind11::arg("offset_scale"),                             \
          pybind11::arg("remove_center"), pybind11::arg("mask_softmax"));                                            \
    m.def("backward", &dcnv3::backward, "DCNv3 backward: grads of input, offset and mask (logits if mask_softmax)",  \
          pybind11::arg("input"), pybind11::arg("offset"), pybind11::arg("mask"), pybind11::arg("grad_output"),     \
          pybind11::arg("layout"), pybind11::arg("offset_scale"), pybind11::arg("remove_center"),                   \
          pybind11::arg("mask_softmax"));                                                                            \
  }
