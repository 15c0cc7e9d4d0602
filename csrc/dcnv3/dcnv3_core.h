// The DCNv3 sampling core: plain inline functions that the CPU kernel and the CUDA kernel both compile, so the two
// backends cannot disagree about where a point samples or how its bilinear weights and their derivatives are formed.
// Semantics: docs in ../../pretrain/ops/reference.py and the operator's reference note (dcnv3.md).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DCNV3_INLINE __host__ __device__ __forceinline__
#else
#define DCNV3_INLINE inline
#endif

namespace dcnv3 {

// Everything about one call that is not a tensor. Built once on the host and passed by value to the kernels.
struct Geometry {
  int batch, height_in, width_in, height_out, width_out;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int groups, group_channels, points;
  bool remove_center;
  double offset_scale;

  DCNV3_INLINE int channels() const { return groups * group_channels; }
  // One "item" is one (n, h_out, w_out, g): the unit that owns a row of P mask values and 2P offsets.
  DCNV3_INLINE long long items() const { return (long long)batch * height_out * width_out * groups; }
};

DCNV3_INLINE float exp_of(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);  // the hardware exp2: a couple of ulp, far inside float32 test tolerances, and many times cheaper
#else
  return expf(v);
#endif
}
DCNV3_INLINE double exp_of(double v) { return exp(v); }
DCNV3_INLINE float floor_of(float v) { return floorf(v); }
DCNV3_INLINE double floor_of(double v) { return floor(v); }

// Kernel-grid position (i along the width, j along the height) of point p: width-major, the centre skipped when removed.
DCNV3_INLINE bool is_removed_centre(const Geometry& g, int i, int j) {
  return g.remove_center && i == g.kernel_w / 2 && j == g.kernel_h / 2;
}

DCNV3_INLINE void point_position(const Geometry& g, int p, int& i, int& j) {
  const int centre = (g.kernel_w / 2) * g.kernel_h + g.kernel_h / 2;
  const int q = (g.remove_center && p >= centre) ? p + 1 : p;
  i = q / g.kernel_h;
  j = q % g.kernel_h;
}

// Steps (i, j) from point p to point p+1 without point_position's divisions, for loops that walk the points in order.
DCNV3_INLINE void next_point_position(const Geometry& g, int& i, int& j) {
  if (++j == g.kernel_h) j = 0, ++i;
  if (is_removed_centre(g, i, j) && ++j == g.kernel_h) j = 0, ++i;
}

// Where the point at kernel-grid position (i, j) of output pixel (h_out, w_out) samples, in pixel coordinates of the
// unpadded input. offset_scale scales the fixed grid together with the learned offset, as the release does.
template <typename acc_t>
DCNV3_INLINE void sample_location(const Geometry& g, int i, int j, int h_out, int w_out, acc_t dx, acc_t dy, acc_t& x,
                                  acc_t& y) {
  const int centre_w = (g.dilation_w * (g.kernel_w - 1)) / 2;
  const int centre_h = (g.dilation_h * (g.kernel_h - 1)) / 2;
  const acc_t scale = static_cast<acc_t>(g.offset_scale);
  x = static_cast<acc_t>(w_out * g.stride_w - g.pad_w + centre_w) + (static_cast<acc_t>(i * g.dilation_w - centre_w) + dx) * scale;
  y = static_cast<acc_t>(h_out * g.stride_h - g.pad_h + centre_h) + (static_cast<acc_t>(j * g.dilation_h - centre_h) + dy) * scale;
}

// The four neighbours of a sampling location, ordered (y0,x0), (y0,x1), (y1,x0), (y1,x1). Neighbours outside the image
// get weight 0 and derivative weight 0 and pixel -1, so callers treat them as zeros without branching on geometry.
template <typename acc_t>
struct Corners {
  int pixel[4];        // row-major pixel index within one image (H*W < 2^31), or -1
  acc_t weight[4];     // bilinear weight
  acc_t dweight_x[4];  // d weight / d x
  acc_t dweight_y[4];  // d weight / d y
  bool any;            // whether any neighbour is inside
};

template <typename acc_t>
DCNV3_INLINE Corners<acc_t> bilinear_corners(acc_t x, acc_t y, int height, int width) {
  Corners<acc_t> c;
  // Written as a negated inside-test so that NaN and far-away locations (which must not reach the int casts) fall out.
  c.any = (x > static_cast<acc_t>(-1) && y > static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) &&
           y < static_cast<acc_t>(height));
  const acc_t x_floor = c.any ? floor_of(x) : static_cast<acc_t>(0);
  const acc_t y_floor = c.any ? floor_of(y) : static_cast<acc_t>(0);
  const acc_t fx = x - x_floor, fy = y - y_floor;
  const int x0 = static_cast<int>(x_floor), y0 = static_cast<int>(y_floor);
  const acc_t one = static_cast<acc_t>(1);
  const acc_t wx[2] = {one - fx, fx}, wy[2] = {one - fy, fy};
  const acc_t sign[2] = {-one, one};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int dy = k >> 1, dx = k & 1;
    const int xk = x0 + dx, yk = y0 + dy;
    const bool inside = c.any && xk >= 0 && xk < width && yk >= 0 && yk < height;
    c.pixel[k] = inside ? yk * width + xk : -1;
    c.weight[k] = inside ? wy[dy] * wx[dx] : static_cast<acc_t>(0);
    c.dweight_x[k] = inside ? wy[dy] * sign[dx] : static_cast<acc_t>(0);
    c.dweight_y[k] = inside ? sign[dy] * wx[dx] : static_cast<acc_t>(0);
  }
  return c;
}

// Softmax over one group's P mask logits, as (max, 1/sum(exp(l - max))) so each weight is exp(l - max) * inv_sum.
template <typename acc_t, typename scalar_t>
DCNV3_INLINE void softmax_stats(const scalar_t* logits, int points, acc_t& max_logit, acc_t& inv_sum) {
  max_logit = static_cast<acc_t>(logits[0]);
  for (int p = 1; p < points; ++p) {
    const acc_t l = static_cast<acc_t>(logits[p]);
    max_logit = l > max_logit ? l : max_logit;
  }
  acc_t sum = 0;
  for (int p = 0; p < points; ++p) sum += exp_of(static_cast<acc_t>(logits[p]) - max_logit);
  inv_sum = static_cast<acc_t>(1) / sum;
}

// The weight of point p: the mask as given, or its softmax when the mask holds logits.
template <typename acc_t, typename scalar_t>
DCNV3_INLINE acc_t point_weight(const scalar_t* mask_row, int p, bool softmax, acc_t max_logit, acc_t inv_sum) {
  const acc_t m = static_cast<acc_t>(mask_row[p]);
  return softmax ? exp_of(m - max_logit) * inv_sum : m;
}

// All P weights of one item at once, each exp computed once: for callers with room for a row of P.
template <typename acc_t, typename scalar_t>
DCNV3_INLINE void point_weights(const scalar_t* mask_row, int points, bool softmax, acc_t* weights) {
  if (!softmax) {
    for (int p = 0; p < points; ++p) weights[p] = static_cast<acc_t>(mask_row[p]);
    return;
  }
  acc_t max_logit = static_cast<acc_t>(mask_row[0]);
  for (int p = 1; p < points; ++p) {
    const acc_t l = static_cast<acc_t>(mask_row[p]);
    max_logit = l > max_logit ? l : max_logit;
  }
  acc_t sum = 0;
  for (int p = 0; p < points; ++p) sum += (weights[p] = exp_of(static_cast<acc_t>(mask_row[p]) - max_logit));
  const acc_t inv_sum = static_cast<acc_t>(1) / sum;
  for (int p = 0; p < points; ++p) weights[p] *= inv_sum;
}

}  // namespace dcnv3
