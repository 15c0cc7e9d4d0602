// Launchers of the DCNv3 CUDA kernels, called by the binding (dcnv3_cuda_bind.cpp) after it has checked the arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include "dcnv3_core.h"

namespace dcnv3 {

void launch_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& output,
                    const Geometry& g, bool mask_softmax);

// grad_input is a zeroed float32 tensor shaped like input: the kernel accumulates into it with atomics.
void launch_backward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                     const at::Tensor& grad_output, const at::Tensor& grad_input, const at::Tensor& grad_offset,
                     const at::Tensor& grad_mask, const Geometry& g, bool mask_softmax);

}  // namespace dcnv3
