// DCNv3 on the CPU. The forward is parallel over output items (n, h_out, w_out, g) and needs no atomics; the backward is
// parallel over (n, g) pairs, each of which owns a disjoint slice of the input gradient, so it needs none either.
// The inner loops run over one group's channels, which are contiguous in channels-last memory, so they vectorise.
#include <ATen/Parallel.h>

#include <vector>

#include "dcnv3_host.h"

namespace dcnv3 {
namespace {

// bfloat16 and float accumulate in float; float64 stays float64 so tests can compare to 1e-10.
template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// acc += the four neighbours' rows weighted by w: one pass over the channels per point, so the accumulator row is read
// and written once rather than once per neighbour. Neighbours outside the image point at a row of zeros (weight 0).
template <typename acc_t, typename scalar_t>
inline void add_bilinear(acc_t* __restrict acc, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                         const scalar_t* __restrict r2, const scalar_t* __restrict r3, const acc_t (&w)[4],
                         int channels) {
  for (int d = 0; d < channels; ++d)
    acc[d] += w[0] * static_cast<acc_t>(r0[d]) + w[1] * static_cast<acc_t>(r1[d]) + w[2] * static_cast<acc_t>(r2[d]) +
              w[3] * static_cast<acc_t>(r3[d]);
}

// The backward's two uses of the four neighbours in one pass: dots[k] = grad_out . row_k, grad_row_k += scale_k *
// grad_out. Neighbours outside the image read zeros and write to four separate scratch rows, so no two writes alias.
template <typename acc_t, typename scalar_t>
inline void bilinear_backward(const acc_t* __restrict grad_out, const scalar_t* __restrict r0,
                              const scalar_t* __restrict r1, const scalar_t* __restrict r2,
                              const scalar_t* __restrict r3, acc_t* __restrict g0, acc_t* __restrict g1,
                              acc_t* __restrict g2, acc_t* __restrict g3, const acc_t (&scale)[4], acc_t (&dots)[4],
                              int channels) {
  acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  for (int d = 0; d < channels; ++d) {
    const acc_t go = grad_out[d];
    d0 += go * static_cast<acc_t>(r0[d]);
    d1 += go * static_cast<acc_t>(r1[d]);
    d2 += go * static_cast<acc_t>(r2[d]);
    d3 += go * static_cast<acc_t>(r3[d]);
    g0[d] += scale[0] * go;
    g1[d] += scale[1] * go;
    g2[d] += scale[2] * go;
    g3[d] += scale[3] * go;
  }
  dots[0] = d0, dots[1] = d1, dots[2] = d2, dots[3] = d3;
}

// Splits a flat item index into its output pixel; the group is item % groups.
inline void item_position(const Geometry& g, int64_t item, int64_t& n, int& h_out, int& w_out) {
  int64_t pos = item / g.groups;
  w_out = pos % g.width_out;
  pos /= g.width_out;
  h_out = pos % g.height_out;
  n = pos / g.height_out;
}

// Kernel-grid position of every point, enumerated once per call instead of once per output pixel.
struct PointGrid {
  std::vector<int> i, j;
  explicit PointGrid(const Geometry& g) : i(g.points), j(g.points) {
    for (int p = 0; p < g.points; ++p) point_position(g, p, i[p], j[p]);
  }
};

template <typename scalar_t>
struct Tensors {
  const scalar_t* input;
  const scalar_t* offset;
  const scalar_t* mask;
};

template <typename scalar_t>
void forward_items(const Tensors<scalar_t>& t, scalar_t* output, const Geometry& g, const PointGrid& grid,
                   bool softmax, int64_t begin, int64_t end) {
  using acc_t = typename Accumulate<scalar_t>::type;
  const int channels = g.channels(), points = g.points;
  std::vector<acc_t> acc(g.group_channels), weights(points);
  const std::vector<scalar_t> zeros(g.group_channels, scalar_t(0));
  for (int64_t item = begin; item < end; ++item) {
    int64_t n;
    int h_out, w_out;
    item_position(g, item, n, h_out, w_out);
    const scalar_t* image = t.input + n * g.height_in * g.width_in * channels + (item % g.groups) * g.group_channels;
    const scalar_t* mask_row = t.mask + item * points;
    const scalar_t* offset_row = t.offset + item * points * 2;
    point_weights(mask_row, points, softmax, weights.data());
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int p = 0; p < points; ++p) {
      acc_t x, y;
      sample_location<acc_t>(g, grid.i[p], grid.j[p], h_out, w_out, offset_row[2 * p], offset_row[2 * p + 1], x, y);
      const Corners<acc_t> c = bilinear_corners(x, y, g.height_in, g.width_in);
      if (!c.any) continue;
      const scalar_t* rows[4];
      acc_t w[4];
      for (int k = 0; k < 4; ++k) {
        rows[k] = c.pixel[k] >= 0 ? image + (int64_t)c.pixel[k] * channels : zeros.data();
        w[k] = weights[p] * c.weight[k];
      }
      add_bilinear(acc.data(), rows[0], rows[1], rows[2], rows[3], w, g.group_channels);
    }
    scalar_t* out = output + item * g.group_channels;
    for (int d = 0; d < g.group_channels; ++d) out[d] = static_cast<scalar_t>(acc[d]);
  }
}

template <typename scalar_t>
struct Gradients {
  typename Accumulate<scalar_t>::type* input;  // accumulated at full precision, cast by the caller
  scalar_t* offset;
  scalar_t* mask;
};

// Backward for every output pixel of one (n, group) pair.
template <typename scalar_t>
void backward_group(const Tensors<scalar_t>& t, const scalar_t* grad_output, const Gradients<scalar_t>& grads,
                    const Geometry& g, const PointGrid& grid, bool softmax, int64_t n, int group) {
  using acc_t = typename Accumulate<scalar_t>::type;
  const int channels = g.channels(), points = g.points, group_channels = g.group_channels;
  const int64_t image_offset = n * g.height_in * g.width_in * channels + group * group_channels;
  const scalar_t* image = t.input + image_offset;
  acc_t* grad_image = grads.input + image_offset;
  const acc_t scale = static_cast<acc_t>(g.offset_scale);
  std::vector<acc_t> grad_out(group_channels), weights(points), grad_weights(points), scratch(4 * group_channels);
  const std::vector<scalar_t> zeros(group_channels, scalar_t(0));
  for (int h_out = 0; h_out < g.height_out; ++h_out) {
    for (int w_out = 0; w_out < g.width_out; ++w_out) {
      const int64_t item = ((n * g.height_out + h_out) * g.width_out + w_out) * g.groups + group;
      const scalar_t* mask_row = t.mask + item * points;
      const scalar_t* offset_row = t.offset + item * points * 2;
      for (int d = 0; d < group_channels; ++d) grad_out[d] = static_cast<acc_t>(grad_output[item * group_channels + d]);
      point_weights(mask_row, points, softmax, weights.data());
      for (int p = 0; p < points; ++p) {
        acc_t x, y;
        sample_location<acc_t>(g, grid.i[p], grid.j[p], h_out, w_out, offset_row[2 * p], offset_row[2 * p + 1], x, y);
        const Corners<acc_t> c = bilinear_corners(x, y, g.height_in, g.width_in);
        const acc_t m = weights[p];
        acc_t grad_m = 0, grad_x = 0, grad_y = 0;
        if (c.any) {
          const scalar_t* rows[4];
          acc_t* grad_rows[4];
          acc_t scale_k[4], dots[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t at = (int64_t)c.pixel[k] * channels;
            rows[k] = c.pixel[k] >= 0 ? image + at : zeros.data();
            grad_rows[k] = c.pixel[k] >= 0 ? grad_image + at : scratch.data() + k * group_channels;
            scale_k[k] = m * c.weight[k];
          }
          bilinear_backward(grad_out.data(), rows[0], rows[1], rows[2], rows[3], grad_rows[0], grad_rows[1],
                            grad_rows[2], grad_rows[3], scale_k, dots, group_channels);
          for (int k = 0; k < 4; ++k) {
            grad_m += c.weight[k] * dots[k];
            grad_x += c.dweight_x[k] * dots[k];
            grad_y += c.dweight_y[k] * dots[k];
          }
        }
        grads.offset[item * points * 2 + 2 * p] = static_cast<scalar_t>(grad_x * m * scale);
        grads.offset[item * points * 2 + 2 * p + 1] = static_cast<scalar_t>(grad_y * m * scale);
        grad_weights[p] = grad_m;
      }
      // Softmax backward: d logit_p = m_p * (d m_p - sum_q m_q d m_q).
      acc_t weighted = 0;
      if (softmax)
        for (int p = 0; p < points; ++p) weighted += weights[p] * grad_weights[p];
      for (int p = 0; p < points; ++p)
        grads.mask[item * points + p] =
            static_cast<scalar_t>(softmax ? weights[p] * (grad_weights[p] - weighted) : grad_weights[p]);
    }
  }
}

at::ScalarType accumulate_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, at::IntArrayRef layout,
                   double offset_scale, bool remove_center, bool mask_softmax) {
  TORCH_CHECK(input.device().is_cpu(), "dcnv3 cpu kernel: tensors must be on the CPU");
  const Geometry g = make_geometry(input, offset, mask, layout, offset_scale, remove_center);
  at::Tensor output = at::empty({g.batch, g.height_out, g.width_out, g.channels()}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dcnv3_cpu_forward", [&] {
    const Tensors<scalar_t> t{input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                              mask.const_data_ptr<scalar_t>()};
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    // Each item is P*4 row reads of group_channels; a grain of a few hundred keeps scheduling overhead negligible.
    const PointGrid grid(g);
    at::parallel_for(0, g.items(), 256, [&](int64_t begin, int64_t end) {
      forward_items(t, out, g, grid, mask_softmax, begin, end);
    });
  });
  return output;
}

std::vector<at::Tensor> backward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                                 const at::Tensor& grad_output, at::IntArrayRef layout, double offset_scale,
                                 bool remove_center, bool mask_softmax) {
  TORCH_CHECK(input.device().is_cpu(), "dcnv3 cpu kernel: tensors must be on the CPU");
  const Geometry g = make_geometry(input, offset, mask, layout, offset_scale, remove_center);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.numel() == g.items() * g.group_channels,
              "dcnv3: grad_output must be a contiguous tensor shaped like the output");
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(accumulate_type(input.scalar_type())));
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "dcnv3_cpu_backward", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    const Tensors<scalar_t> t{input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                              mask.const_data_ptr<scalar_t>()};
    const Gradients<scalar_t> grads{grad_input.mutable_data_ptr<acc_t>(), grad_offset.mutable_data_ptr<scalar_t>(),
                                    grad_mask.mutable_data_ptr<scalar_t>()};
    const scalar_t* grad_out = grad_output.const_data_ptr<scalar_t>();
    const PointGrid grid(g);
    at::parallel_for(0, (int64_t)g.batch * g.groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair)
        backward_group(t, grad_out, grads, g, grid, mask_softmax, pair / g.groups, pair % g.groups);
    });
  });
  return {grad_input.to(input.scalar_type()), grad_offset, grad_mask};
}

}  // namespace
}  // namespace dcnv3

DCNV3_BIND_MODULE("DCNv3 CPU kernel (float32, float64, bfloat16)")
