// CUDA voxelization with the same semantics and bit-identical results as the CPU kernels (voxelize_cpu.cpp).
//
// hard_voxelize_cuda keeps the first-appearance order of the serial algorithm without any serial step:
//   1. per point: cell key (IEEE float32 arithmetic, as on the CPU), insert into an open-addressing hash table
//      (atomicCAS on the key), and atomicMax(n - i) so every slot ends up holding its cell's first point index;
//   2. a point is its voxel's leader when it is that first point; an exclusive scan of the leader flags (input order)
//      numbers the voxels in order of first appearance (a stable compaction by first index);
//   3. every point takes its voxel id from its slot (voxels past max_voxels get a sentinel id), and a stable radix
//      sort of (voxel id, point index) groups the points by voxel in input order: a point's rank inside its voxel is
//      its position minus the voxel's first position, so the first max_points points in input order are kept;
//   4. one thread per output element writes voxels [V, max_points, C] (zero padding included), one thread per voxel
//      writes coords and num_points.
// All integer atomics (CAS, max) have order-independent outcomes, so the result is deterministic.
#include "ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>

#include <limits>

namespace fusion_ops {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

__device__ __forceinline__ uint32_t hash_slot(int32_t key, int shift) {
  return (static_cast<uint32_t>(key) * 2654435761u) >> shift;
}

// Step 1. table_key holds key + 1 (0: empty); table_first holds n - (first point index) (0: none yet).
__global__ void insert_points_kernel(const float* __restrict__ points, int64_t n, int64_t stride, VoxelGridSpec grid,
                                     int32_t* __restrict__ table_key, int32_t* __restrict__ table_first,
                                     uint32_t mask, int shift, int32_t* __restrict__ slot_of_point) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* p = points + i * stride;
  const int32_t key = point_cell_key(p[0], p[1], p[2], grid);
  if (key < 0) {
    slot_of_point[i] = -1;
    return;
  }
  uint32_t slot = hash_slot(key, shift);
  while (true) {
    const int32_t previous = atomicCAS(table_key + slot, 0, key + 1);
    if (previous == 0 || previous == key + 1) break;
    slot = (slot + 1) & mask;
  }
  atomicMax(table_first + slot, static_cast<int32_t>(n - i));
  slot_of_point[i] = static_cast<int32_t>(slot);
}

// Step 2a. leader[i] = 1 when point i is the first point of its cell.
__global__ void leader_flags_kernel(const int32_t* __restrict__ slot_of_point, const int32_t* __restrict__ table_first,
                                    int64_t n, int32_t* __restrict__ leader) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t slot = slot_of_point[i];
  leader[i] = (slot >= 0 && table_first[slot] == static_cast<int32_t>(n - i)) ? 1 : 0;
}

// Step 2b. Leaders write their voxel id (their rank among leaders) into the slot, and the cell key of kept voxels.
__global__ void leader_voxels_kernel(const int32_t* __restrict__ slot_of_point, const int32_t* __restrict__ leader,
                                     const int32_t* __restrict__ leader_rank, const int32_t* __restrict__ table_key,
                                     int64_t n, int32_t num_voxels, int32_t* __restrict__ table_voxel,
                                     int32_t* __restrict__ voxel_key) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || !leader[i]) return;
  const int32_t slot = slot_of_point[i];
  const int32_t voxel = leader_rank[i];
  table_voxel[slot] = voxel;
  if (voxel < num_voxels) voxel_key[voxel] = table_key[slot] - 1;
}

// Step 3a. Voxel id of every point (num_voxels for dropped points and voxels past max_voxels), and its index.
__global__ void point_voxels_kernel(const int32_t* __restrict__ slot_of_point, const int32_t* __restrict__ table_voxel,
                                    int64_t n, int32_t num_voxels, uint32_t* __restrict__ point_voxel,
                                    int32_t* __restrict__ point_index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t slot = slot_of_point[i];
  int32_t voxel = slot >= 0 ? table_voxel[slot] : num_voxels;
  if (voxel > num_voxels) voxel = num_voxels;
  point_voxel[i] = static_cast<uint32_t>(voxel);
  point_index[i] = static_cast<int32_t>(i);
}

__device__ __forceinline__ int64_t lower_bound(const uint32_t* __restrict__ sorted, int64_t n, uint32_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (sorted[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Step 4a. Per voxel: first position in the sorted order, number of points kept, (z, y, x).
__global__ void voxel_meta_kernel(const uint32_t* __restrict__ sorted_voxel, int64_t n,
                                  const int32_t* __restrict__ voxel_key, int32_t num_voxels, int32_t max_points,
                                  VoxelGridSpec grid, int32_t* __restrict__ voxel_start,
                                  int32_t* __restrict__ num_points, int32_t* __restrict__ coords) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= num_voxels) return;
  const int64_t start = lower_bound(sorted_voxel, n, static_cast<uint32_t>(v));
  const int64_t end = lower_bound(sorted_voxel, n, static_cast<uint32_t>(v + 1));
  voxel_start[v] = static_cast<int32_t>(start);
  num_points[v] = static_cast<int32_t>(end - start < max_points ? end - start : max_points);
  const int32_t key = voxel_key[v];
  coords[3 * v + 0] = key / (grid.grid[0] * grid.grid[1]);
  coords[3 * v + 1] = (key / grid.grid[0]) % grid.grid[1];
  coords[3 * v + 2] = key % grid.grid[0];
}

// Step 4b. One thread per output float: the rank-th point of voxel v (in input order), or 0.
__global__ void fill_voxels_kernel(const float* __restrict__ points, int64_t channels,
                                   const int32_t* __restrict__ sorted_index, const int32_t* __restrict__ voxel_start,
                                   const int32_t* __restrict__ num_points, int64_t max_points, int64_t total,
                                   float* __restrict__ voxels) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t feature = e % channels;
  const int64_t rank = (e / channels) % max_points;
  const int64_t v = e / (channels * max_points);
  float value = 0.0f;
  if (rank < num_points[v]) {
    value = points[static_cast<int64_t>(sorted_index[voxel_start[v] + rank]) * channels + feature];
  }
  voxels[e] = value;
}

__global__ void dynamic_voxelize_kernel(const float* __restrict__ points, int64_t n, int64_t stride,
                                        VoxelGridSpec grid, int32_t* __restrict__ coords) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* p = points + i * stride;
  const int32_t cx = axis_cell(p[0], grid.range_min[0], grid.voxel_size[0], grid.grid[0]);
  const int32_t cy = axis_cell(p[1], grid.range_min[1], grid.voxel_size[1], grid.grid[1]);
  const int32_t cz = axis_cell(p[2], grid.range_min[2], grid.voxel_size[2], grid.grid[2]);
  const bool keep = cx >= 0 && cy >= 0 && cz >= 0;
  coords[3 * i + 0] = keep ? cz : -1;
  coords[3 * i + 1] = keep ? cy : -1;
  coords[3 * i + 2] = keep ? cx : -1;
}

void check_points_cuda(const torch::Tensor& points) {
  TORCH_CHECK_VALUE(points.is_cuda(), "points must be a CUDA tensor here");
  TORCH_CHECK_VALUE(points.scalar_type() == torch::kFloat32, "points must be float32, got ", points.scalar_type());
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) >= 3, "points must be [N, C>=3], got ", points.sizes());
  TORCH_CHECK_VALUE(points.is_contiguous(), "points must be contiguous");
  TORCH_CHECK_VALUE(points.size(0) <= std::numeric_limits<int32_t>::max(), "too many points");
}

int bits_for(uint32_t value) {  // number of bits needed to represent 0..value
  int bits = 1;
  while (bits < 32 && (value >> bits) != 0) ++bits;
  return bits;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hard_voxelize_cuda(const torch::Tensor& points,
                                                                           const VoxelGridSpec& grid,
                                                                           int64_t max_points, int64_t max_voxels) {
  check_points_cuda(points);
  TORCH_CHECK_VALUE(max_points >= 1 && max_voxels >= 1, "max_points and max_voxels must be >= 1");
  const c10::cuda::CUDAGuard guard(points.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = points.size(0), c = points.size(1);
  const auto int_options = points.options().dtype(torch::kInt32);
  if (n == 0) {
    return {torch::zeros({0, max_points, c}, points.options()), torch::zeros({0, 3}, int_options),
            torch::zeros({0}, int_options)};
  }

  // Hash table: capacity a power of two >= 2n; three int32 arrays (key + 1, n - first index, voxel id), zeroed.
  int64_t capacity = 16;
  int shift = 28;  // 32 - log2(capacity)
  while (capacity < 2 * n) {
    capacity <<= 1;
    --shift;
  }
  auto table = torch::zeros({3, capacity}, int_options);
  int32_t* table_key = table.data_ptr<int32_t>();
  int32_t* table_first = table_key + capacity;
  int32_t* table_voxel = table_first + capacity;
  auto slot_of_point = torch::empty({n}, int_options);
  insert_points_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      points.data_ptr<float>(), n, c, grid, table_key, table_first, static_cast<uint32_t>(capacity - 1), shift,
      slot_of_point.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto leader = torch::empty({n}, int_options);
  auto leader_rank = torch::empty({n}, int_options);
  leader_flags_kernel<<<blocks_for(n), kThreads, 0, stream>>>(slot_of_point.data_ptr<int32_t>(), table_first, n,
                                                               leader.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t scan_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, leader.data_ptr<int32_t>(),
                                               leader_rank.data_ptr<int32_t>(), static_cast<int>(n), stream));
  auto scan_temp = torch::empty({static_cast<int64_t>(scan_bytes)}, points.options().dtype(torch::kUInt8));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scan_temp.data_ptr(), scan_bytes, leader.data_ptr<int32_t>(),
                                               leader_rank.data_ptr<int32_t>(), static_cast<int>(n), stream));
  // The number of distinct cells decides the output size: the one host synchronisation.
  const int64_t distinct = (leader_rank[n - 1] + leader[n - 1]).item<int64_t>();
  const int32_t num_voxels = static_cast<int32_t>(std::min<int64_t>(distinct, max_voxels));

  auto voxels = torch::empty({num_voxels, max_points, c}, points.options());
  auto coords = torch::empty({num_voxels, 3}, int_options);
  auto num_points = torch::empty({num_voxels}, int_options);
  if (num_voxels == 0) return {voxels, coords, num_points};

  auto voxel_key = torch::empty({num_voxels}, int_options);
  leader_voxels_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      slot_of_point.data_ptr<int32_t>(), leader.data_ptr<int32_t>(), leader_rank.data_ptr<int32_t>(), table_key, n,
      num_voxels, table_voxel, voxel_key.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Step 3: group points by voxel id with a stable radix sort over the bits that can be set.
  auto point_voxel = torch::empty({2, n}, int_options);
  auto point_index = torch::empty({2, n}, int_options);
  uint32_t* voxel_in = reinterpret_cast<uint32_t*>(point_voxel.data_ptr<int32_t>());
  uint32_t* voxel_sorted = voxel_in + n;
  int32_t* index_in = point_index.data_ptr<int32_t>();
  int32_t* index_sorted = index_in + n;
  point_voxels_kernel<<<blocks_for(n), kThreads, 0, stream>>>(slot_of_point.data_ptr<int32_t>(), table_voxel, n,
                                                               num_voxels, voxel_in, index_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int end_bit = bits_for(static_cast<uint32_t>(num_voxels));
  size_t sort_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, voxel_in, voxel_sorted, index_in, index_sorted,
                                                 static_cast<int>(n), 0, end_bit, stream));
  auto sort_temp = torch::empty({static_cast<int64_t>(sort_bytes)}, points.options().dtype(torch::kUInt8));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp.data_ptr(), sort_bytes, voxel_in, voxel_sorted, index_in,
                                                 index_sorted, static_cast<int>(n), 0, end_bit, stream));

  // Step 4.
  auto voxel_start = torch::empty({num_voxels}, int_options);
  voxel_meta_kernel<<<blocks_for(num_voxels), kThreads, 0, stream>>>(
      voxel_sorted, n, voxel_key.data_ptr<int32_t>(), num_voxels, static_cast<int32_t>(max_points), grid,
      voxel_start.data_ptr<int32_t>(), num_points.data_ptr<int32_t>(), coords.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = static_cast<int64_t>(num_voxels) * max_points * c;
  fill_voxels_kernel<<<blocks_for(total), kThreads, 0, stream>>>(
      points.data_ptr<float>(), c, index_sorted, voxel_start.data_ptr<int32_t>(), num_points.data_ptr<int32_t>(),
      max_points, total, voxels.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {voxels, coords, num_points};
}

torch::Tensor dynamic_voxelize_cuda(const torch::Tensor& points, const VoxelGridSpec& grid) {
  check_points_cuda(points);
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t n = points.size(0), c = points.size(1);
  auto coords = torch::empty({n, 3}, points.options().dtype(torch::kInt32));
  if (n == 0) return coords;
  dynamic_voxelize_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      points.data_ptr<float>(), n, c, grid, coords.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return coords;
}

}  // namespace fusion_ops
