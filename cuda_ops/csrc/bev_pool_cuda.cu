// CUDA BEV pooling, deterministic and bit-identical to the CPU kernel (bev_pool_cpu.cpp).
//
//   1. per point: int32 cell key (b, z, y, x) -> ((b * Z + z) * H + y) * W + x, checking the range (the first bad row
//      is found with an integer atomicMin and reported as a ValueError);
//   2. stable radix sort of (cell key, point index) over the bits that can be set: each cell's points are contiguous
//      and in input order;
//   3. cell_start[cell] = lower_bound(sorted keys, cell) for every cell (one binary search per cell, no gaps to fill);
//   4. one block per tile of 32 cells x 32 channels: a warp reads one point's 32 channels at a time (coalesced rows),
//      sums each cell in input order in the accumulation type, stages the tile in shared memory and writes it
//      transposed, so that consecutive threads write consecutive cells of the channel-major output [B, C, Z, H, W].
//      Empty cells are written as 0: no memset and no float atomics.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>

#include <limits>
#include <sstream>

namespace fusion_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;      // cells and channels per block tile
constexpr int kRows = 8;       // warps per block

template <typename index_t>
__global__ void bev_keys_kernel(const index_t* __restrict__ coords, int64_t p, int64_t batch_size, int64_t depth,
                                int64_t height, int64_t width, uint32_t* __restrict__ keys,
                                int32_t* __restrict__ order, unsigned long long* __restrict__ first_bad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p) return;
  const int64_t b = coords[4 * i + 0], z = coords[4 * i + 1], y = coords[4 * i + 2], x = coords[4 * i + 3];
  order[i] = static_cast<int32_t>(i);
  if (b < 0 || b >= batch_size || z < 0 || z >= depth || y < 0 || y >= height || x < 0 || x >= width) {
    atomicMin(first_bad, static_cast<unsigned long long>(i));
    keys[i] = 0;
    return;
  }
  keys[i] = static_cast<uint32_t>(((b * depth + z) * height + y) * width + x);
}

__global__ void cell_start_kernel(const uint32_t* __restrict__ sorted_keys, int64_t p, int64_t cells,
                                  int32_t* __restrict__ cell_start) {
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cell > cells) return;
  int64_t lo = 0, hi = p;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(sorted_keys[mid]) < cell) lo = mid + 1; else hi = mid;
  }
  cell_start[cell] = static_cast<int32_t>(lo);
}

template <typename scalar_t>
__global__ void pool_kernel(const scalar_t* __restrict__ features, int64_t channels,
                            const int32_t* __restrict__ sorted_index, const int32_t* __restrict__ cell_start,
                            int64_t cells, int64_t cells_per_batch, scalar_t* __restrict__ out) {
  using acc_t = typename BevAcc<scalar_t>::type;
  __shared__ acc_t tile[kTile][kTile + 1];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t cell0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t channel0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t channel = channel0 + lane;
  for (int j = row; j < kTile; j += kRows) {
    const int64_t cell = cell0 + j;
    acc_t sum = acc_t(0);
    if (cell < cells && channel < channels) {
      const int32_t begin = cell_start[cell], end = cell_start[cell + 1];
      for (int32_t k = begin; k < end; ++k) {
        sum += static_cast<acc_t>(features[static_cast<int64_t>(sorted_index[k]) * channels + channel]);
      }
    }
    tile[j][lane] = sum;
  }
  __syncthreads();
  for (int k = row; k < kTile; k += kRows) {
    const int64_t out_channel = channel0 + k;
    const int64_t cell = cell0 + lane;
    if (out_channel < channels && cell < cells) {
      const int64_t b = cell / cells_per_batch, s = cell % cells_per_batch;
      out[(b * channels + out_channel) * cells_per_batch + s] = static_cast<scalar_t>(tile[lane][k]);
    }
  }
}

int bits_for(uint32_t value) {
  int bits = 1;
  while (bits < 32 && (value >> bits) != 0) ++bits;
  return bits;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> bev_pool_forward_cuda(const torch::Tensor& features,
                                                               const torch::Tensor& coords, int64_t batch_size,
                                                               int64_t depth, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(features.is_cuda() && coords.is_cuda(), "bev_pool: expected CUDA tensors");
  TORCH_CHECK_VALUE(features.dim() == 2 && features.is_contiguous(), "bev_pool: features must be [P, C] contiguous");
  TORCH_CHECK_VALUE(coords.dim() == 2 && coords.size(1) == 4 && coords.size(0) == features.size(0) &&
                        coords.is_contiguous(),
                    "bev_pool: coords must be [P, 4] contiguous with P = features.shape[0]");
  TORCH_CHECK_VALUE(batch_size >= 1 && depth >= 1 && height >= 1 && width >= 1, "bev_pool: empty grid");
  const int64_t cells_per_batch = depth * height * width;
  const int64_t cells = batch_size * cells_per_batch;
  TORCH_CHECK_VALUE(cells <= std::numeric_limits<int32_t>::max(), "bev_pool: more cells than int32 can index");
  const int64_t p = features.size(0), channels = features.size(1);
  TORCH_CHECK_VALUE(p <= std::numeric_limits<int32_t>::max(), "bev_pool: too many points");
  const c10::cuda::CUDAGuard guard(features.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto int_options = coords.options().dtype(torch::kInt32);

  auto keys = torch::empty({2, p}, int_options);  // row 0: keys in input order, row 1: sorted
  auto order = torch::empty({2, p}, int_options);
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  uint32_t* keys_sorted = keys_in + p;
  int32_t* order_in = order.data_ptr<int32_t>();
  int32_t* order_sorted = order_in + p;
  auto first_bad = torch::full({1}, std::numeric_limits<int64_t>::max(), coords.options().dtype(torch::kInt64));
  if (p > 0) {
    AT_DISPATCH_INDEX_TYPES(coords.scalar_type(), "bev_pool_keys_cuda", [&] {
      bev_keys_kernel<index_t><<<static_cast<unsigned int>((p + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          coords.data_ptr<index_t>(), p, batch_size, depth, height, width, keys_in, order_in,
          reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t bad = first_bad.item<int64_t>();
    if (bad != std::numeric_limits<int64_t>::max()) {
      auto row = coords[bad].cpu();
      std::ostringstream msg;
      msg << "bev_pool: coords row " << bad << " = (" << row[0].item<int64_t>() << ", " << row[1].item<int64_t>()
          << ", " << row[2].item<int64_t>() << ", " << row[3].item<int64_t>()
          << ") (batch, z, y, x) is outside [0, " << batch_size << ") x [0, " << depth << ") x [0, " << height
          << ") x [0, " << width << "); filter the points before pooling";
      TORCH_CHECK_VALUE(false, msg.str());
    }
    const int end_bit = bits_for(static_cast<uint32_t>(cells - 1));
    size_t sort_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_sorted, order_in, order_sorted,
                                                   static_cast<int>(p), 0, end_bit, stream));
    auto sort_temp = torch::empty({static_cast<int64_t>(sort_bytes)}, coords.options().dtype(torch::kUInt8));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp.data_ptr(), sort_bytes, keys_in, keys_sorted, order_in,
                                                   order_sorted, static_cast<int>(p), 0, end_bit, stream));
  }
  auto cell_start = torch::empty({cells + 1}, int_options);
  cell_start_kernel<<<static_cast<unsigned int>((cells + 1 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      keys_sorted, p, cells, cell_start.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto out = torch::empty({batch_size, channels, depth, height, width}, features.options());
  if (channels > 0) {
    const dim3 block(kTile, kRows);
    const dim3 grid(static_cast<unsigned int>((cells + kTile - 1) / kTile),
                    static_cast<unsigned int>((channels + kTile - 1) / kTile));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "bev_pool_cuda", [&] {
      pool_kernel<scalar_t><<<grid, block, 0, stream>>>(features.data_ptr<scalar_t>(), channels, order_sorted,
                                                        cell_start.data_ptr<int32_t>(), cells, cells_per_batch,
                                                        out.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, keys[0]};
}

}  // namespace fusion_ops
