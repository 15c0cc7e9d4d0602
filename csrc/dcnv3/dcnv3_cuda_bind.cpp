// Python binding of the DCNv3 CUDA kernels: argument checks and output allocation; the kernels are in dcnv3_cuda.cu.
#include "dcnv3_cuda.h"
#include "dcnv3_host.h"

namespace dcnv3 {
namespace {

void check_cuda(const at::Tensor& input, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(input.is_cuda(), "dcnv3 cuda kernel: tensors must be on a CUDA device");
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device() == input.device(), "dcnv3 cuda kernel: all tensors must be on ", input.device());
}

// The kernels load each (dx, dy) pair as one vector; an offset tensor that starts mid-pair (a view at an odd element)
// is copied into a fresh, aligned allocation.
at::Tensor pair_aligned(const at::Tensor& offset) {
  const bool aligned = reinterpret_cast<uintptr_t>(offset.const_data_ptr()) % (2 * offset.element_size()) == 0;
  return aligned ? offset : offset.clone();
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, at::IntArrayRef layout,
                   double offset_scale, bool remove_center, bool mask_softmax) {
  check_cuda(input, {&offset, &mask});
  const Geometry g = make_geometry(input, offset, mask, layout, offset_scale, remove_center);
  at::Tensor output = at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  launch_forward(input, pair_aligned(offset), mask, output, g, mask_softmax);
  return output;
}

std::vector<at::Tensor> backward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                                 const at::Tensor& grad_output, at::IntArrayRef layout, double offset_scale,
                                 bool remove_center, bool mask_softmax) {
  check_cuda(input, {&offset, &mask, &grad_output});
  const Geometry g = make_geometry(input, offset, mask, layout, offset_scale, remove_center);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.numel() == g.items() * g.group_channels,
              "dcnv3: grad_output must be a contiguous tensor shaped like the output");
  // Neighbours are shared between output pixels, so the input gradient is accumulated with float32 atomics.
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(at::kFloat));
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  launch_backward(input, pair_aligned(offset), mask, grad_output, grad_input, grad_offset, grad_mask, g, mask_softmax);
  return {grad_input.to(input.scalar_type()), grad_offset, grad_mask};
}

}  // namespace
}  // namespace dcnv3

DCNV3_BIND_MODULE("DCNv3 CUDA kernel (float32, float16, bfloat16 with float32 accumulation)")
