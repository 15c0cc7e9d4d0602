// DCNv3 on CUDA: float32, float16 and bfloat16 storage, float32 arithmetic.
//
// Work split: one "item" is one (n, h_out, w_out, g), owning a row of P mask values, 2P offsets and group_channels
// outputs. A team of `lanes` consecutive threads (a power of two up to a warp) shares an item; each thread owns chunks of
// VEC consecutive channels, loaded and stored as one vector. Teams never straddle a warp, so the backward sums a team's
// partial offset and mask gradients with shuffles, and only the input gradient (scattered to four neighbours) is atomic.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dcnv3_cuda.h"

namespace dcnv3 {
namespace {

constexpr int kBlockThreads = 256;

#define DCNV3_DISPATCH(TYPE, NAME, ...)                                                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                          \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
constexpr int kWarp = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

// Where an item's team lives: the item it works on and the thread's place in the team.
struct Team {
  long long item;
  int lane;
  int n, h_out, w_out, group;
};

__device__ __forceinline__ Team team_of_thread(const Geometry& g, int lanes) {
  const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  Team t;
  t.item = thread / lanes;
  t.lane = thread % lanes;
  long long pos = t.item;
  t.group = pos % g.groups;
  pos /= g.groups;
  t.w_out = pos % g.width_out;
  pos /= g.width_out;
  t.h_out = pos % g.height_out;
  t.n = pos / g.height_out;
  return t;
}

// Sampling location of the team's point at grid position (i, j); its (dx, dy) pair is one aligned load.
template <typename scalar_t>
__device__ __forceinline__ void locate_point(const Geometry& g, const Team& t, const scalar_t* offset_row, int p, int i,
                                             int j, float& x, float& y) {
  const auto d = load_pack<scalar_t, 2>(offset_row + 2 * p);
  sample_location<float>(g, i, j, t.h_out, t.w_out, d.v[0], d.v[1], x, y);
}

template <typename scalar_t>
struct Inputs {
  const scalar_t* __restrict__ input;
  const scalar_t* __restrict__ offset;
  const scalar_t* __restrict__ mask;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(Inputs<scalar_t> in, scalar_t* __restrict__ output, Geometry g, int lanes, bool softmax) {
  const Team t = team_of_thread(g, lanes);
  if (t.item >= g.items()) return;
  const int channels = g.channels(), points = g.points;
  const scalar_t* image = in.input + (long long)t.n * g.height_in * g.width_in * channels + t.group * g.group_channels;
  const scalar_t* mask_row = in.mask + t.item * points;
  const scalar_t* offset_row = in.offset + t.item * points * 2;
  float max_logit = 0.f, inv_sum = 1.f;
  if (softmax) softmax_stats(mask_row, points, max_logit, inv_sum);

  for (int chunk = t.lane; chunk * VEC < g.group_channels; chunk += lanes) {
    float acc[VEC] = {};
    for (int p = 0, i = 0, j = 0; p < points; ++p, next_point_position(g, i, j)) {
      float x, y;
      locate_point(g, t, offset_row, p, i, j, x, y);
      const Corners<float> c = bilinear_corners(x, y, g.height_in, g.width_in);
      if (!c.any) continue;
      const float m = point_weight(mask_row, p, softmax, max_logit, inv_sum);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c.pixel[k] < 0) continue;
        const auto v = load_pack<scalar_t, VEC>(image + (long long)c.pixel[k] * channels + chunk * VEC);
        const float w = m * c.weight[k];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += w * static_cast<float>(v.v[e]);
      }
    }
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<scalar_t>(acc[e]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(output + t.item * g.group_channels + chunk * VEC) = out;
  }
}

// Sum over a team; every lane of the warp must call it, and every lane gets the team's total.
__device__ __forceinline__ float team_sum(float v, int lanes) {
  for (int s = lanes / 2; s > 0; s /= 2) v += __shfl_xor_sync(0xffffffffu, v, s);
  return v;
}

// grad[0..VEC) += w * values; Hopper adds float2/float4 in one atomic, which halves or quarters the atomic traffic.
template <int VEC>
__device__ __forceinline__ void atomic_add_scaled(float* grad, float w, const float (&values)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4)
      atomicAdd(reinterpret_cast<float4*>(grad + e),
                make_float4(w * values[e], w * values[e + 1], w * values[e + 2], w * values[e + 3]));
    return;
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(grad), make_float2(w * values[0], w * values[1]));
    return;
  }
#endif
#pragma unroll
  for (int e = 0; e < VEC; ++e) atomicAdd(grad + e, w * values[e]);
}

template <typename scalar_t>
struct Grads {
  float* __restrict__ input;
  scalar_t* __restrict__ offset;
  scalar_t* __restrict__ mask;
};

// Shared memory holds each team's P mask gradients in float32 when the softmax backward needs all of them at the end.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(Inputs<scalar_t> in, const scalar_t* __restrict__ grad_output, Grads<scalar_t> grads, Geometry g,
                    int lanes, bool softmax) {
  extern __shared__ float mask_grad_scratch[];
  Team t = team_of_thread(g, lanes);
  // Threads past the end stay to take part in the shuffles: they redo the last item's arithmetic and write nothing.
  const bool active = t.item < g.items();
  if (!active) t = Team{g.items() - 1, t.lane, g.batch - 1, g.height_out - 1, g.width_out - 1, g.groups - 1};
  const int channels = g.channels(), points = g.points;
  const long long image_offset = (long long)t.n * g.height_in * g.width_in * channels + t.group * g.group_channels;
  const scalar_t* image = in.input + image_offset;
  float* grad_image = grads.input + image_offset;
  const scalar_t* mask_row = in.mask + t.item * points;
  const scalar_t* offset_row = in.offset + t.item * points * 2;
  const scalar_t* grad_out = grad_output + t.item * g.group_channels;
  float* my_mask_grads = mask_grad_scratch + (threadIdx.x / lanes) * points;
  const float scale = static_cast<float>(g.offset_scale);
  float max_logit = 0.f, inv_sum = 1.f;
  if (softmax) softmax_stats(mask_row, points, max_logit, inv_sum);

  float weighted = 0.f;  // sum_p m_p * dL/dm_p, for the softmax backward
  for (int p = 0, i = 0, j = 0; p < points; ++p, next_point_position(g, i, j)) {
    float x, y;
    locate_point(g, t, offset_row, p, i, j, x, y);
    const Corners<float> c = bilinear_corners(x, y, g.height_in, g.width_in);
    const float m = point_weight(mask_row, p, softmax, max_logit, inv_sum);
    float grad_m = 0.f, grad_x = 0.f, grad_y = 0.f;
    for (int chunk = t.lane; active && c.any && chunk * VEC < g.group_channels; chunk += lanes) {
      const auto go_pack = load_pack<scalar_t, VEC>(grad_out + chunk * VEC);
      float go[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) go[e] = static_cast<float>(go_pack.v[e]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c.pixel[k] < 0) continue;
        const long long at = (long long)c.pixel[k] * channels + chunk * VEC;
        const auto v = load_pack<scalar_t, VEC>(image + at);
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += go[e] * static_cast<float>(v.v[e]);
        atomic_add_scaled<VEC>(grad_image + at, m * c.weight[k], go);
        grad_m += c.weight[k] * dot;
        grad_x += c.dweight_x[k] * dot;
        grad_y += c.dweight_y[k] * dot;
      }
    }
    grad_m = team_sum(grad_m, lanes);
    grad_x = team_sum(grad_x, lanes);
    grad_y = team_sum(grad_y, lanes);
    if (active && t.lane == 0) {
      grads.offset[t.item * points * 2 + 2 * p] = static_cast<scalar_t>(grad_x * m * scale);
      grads.offset[t.item * points * 2 + 2 * p + 1] = static_cast<scalar_t>(grad_y * m * scale);
      if (softmax)
        my_mask_grads[p] = grad_m;
      else
        grads.mask[t.item * points + p] = static_cast<scalar_t>(grad_m);
    }
    weighted += m * grad_m;
  }
  if (!(softmax && active && t.lane == 0)) return;
  // d logit_p = m_p * (d m_p - sum_q m_q d m_q); the scratch row was written by this same thread.
  for (int p = 0; p < points; ++p) {
    const float m = point_weight(mask_row, p, true, max_logit, inv_sum);
    grads.mask[t.item * points + p] = static_cast<scalar_t>(m * (my_mask_grads[p] - weighted));
  }
}

// Widest vector (at most max_vec elements) that divides group_channels and keeps every access aligned.
template <typename scalar_t>
int pick_vector_width(const Geometry& g, std::initializer_list<const void*> pointers, int max_vec) {
  for (int vec = max_vec; vec > 1; vec /= 2) {
    bool aligned = g.group_channels % vec == 0;
    for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) == 0;
    if (aligned) return vec;
  }
  return 1;
}

// Smallest power of two covering the item's chunks, at most a warp: a thread loops over chunks beyond that.
int pick_lanes(int chunks) {
  int lanes = 1;
  while (lanes < chunks && lanes < kWarp) lanes *= 2;
  return lanes;
}

struct Launch {
  int lanes;
  dim3 grid;
};

Launch launch_shape(const Geometry& g, int vec) {
  const int lanes = pick_lanes((g.group_channels + vec - 1) / vec);
  const long long threads = g.items() * lanes;
  return {lanes, dim3(static_cast<unsigned>((threads + kBlockThreads - 1) / kBlockThreads))};
}

// Instantiates `body` for the vector widths up to kMaxVec among 1, 2, 4, 8 and 16.
template <int kMaxVec, typename Body>
void with_vector_width(int vec, Body&& body) {
  if constexpr (kMaxVec >= 16)
    if (vec == 16) return body(std::integral_constant<int, 16>());
  if constexpr (kMaxVec >= 8)
    if (vec == 8) return body(std::integral_constant<int, 8>());
  if (vec == 4) return body(std::integral_constant<int, 4>());
  if (vec == 2) return body(std::integral_constant<int, 2>());
  return body(std::integral_constant<int, 1>());
}

}  // namespace

void launch_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& output,
                    const Geometry& g, bool mask_softmax) {
  if (g.items() == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DCNV3_DISPATCH(input.scalar_type(), "dcnv3_cuda_forward", [&] {
    const Inputs<scalar_t> in{input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                              mask.const_data_ptr<scalar_t>()};
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    // Up to two 16-byte vectors per thread: fewer lanes per item repeat the per-point location and weight arithmetic.
    constexpr int kMaxVec = 32 / sizeof(scalar_t);
    const int vec = pick_vector_width<scalar_t>(g, {in.input, out}, kMaxVec);
    const Launch shape = launch_shape(g, vec);
    with_vector_width<kMaxVec>(vec, [&](auto width) {
      forward_kernel<scalar_t, decltype(width)::value>
          <<<shape.grid, kBlockThreads, 0, stream>>>(in, out, g, shape.lanes, mask_softmax);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                     const at::Tensor& grad_output, const at::Tensor& grad_input, const at::Tensor& grad_offset,
                     const at::Tensor& grad_mask, const Geometry& g, bool mask_softmax) {
  if (g.items() == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DCNV3_DISPATCH(input.scalar_type(), "dcnv3_cuda_backward", [&] {
    const Inputs<scalar_t> in{input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                              mask.const_data_ptr<scalar_t>()};
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const Grads<scalar_t> grads{grad_input.mutable_data_ptr<float>(), grad_offset.mutable_data_ptr<scalar_t>(),
                                grad_mask.mutable_data_ptr<scalar_t>()};
    // A float4 atomic is the widest: owning more channels than 4 would halve the threads without saving atomics.
    constexpr int kMaxVec = 4;
    const int vec = pick_vector_width<scalar_t>(g, {in.input, go}, kMaxVec);
    const Launch shape = launch_shape(g, vec);
    const size_t scratch = mask_softmax ? (kBlockThreads / shape.lanes) * g.points * sizeof(float) : 0;
    TORCH_CHECK(scratch <= 48 * 1024, "dcnv3 cuda kernel: mask_softmax backward supports up to ",
                48 * 1024 * shape.lanes / (kBlockThreads * sizeof(float)), " points here, got ", g.points,
                "; softmax the mask outside the operator instead");
    with_vector_width<kMaxVec>(vec, [&](auto width) {
      backward_kernel<scalar_t, decltype(width)::value>
          <<<shape.grid, kBlockThreads, scratch, stream>>>(in, go, grads, g, shape.lanes, mask_softmax);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace dcnv3
