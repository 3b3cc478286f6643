// Declarations shared by the CPU (.cpp) and CUDA (.cu) implementations of fusion.cuda_ops.
//
// Conventions (see cuda_ops/voxelize.py and cuda_ops/bev_pool.py for the Python side, which validates arguments):
// - points [N, C] float32 contiguous, columns (x, y, z, ...) in meters, ego frame.
// - A voxel grid is given by its lower corner `range_min` (x, y, z, meters), `voxel_size` (x, y, z, meters) and its
//   number of cells `grid` (x, y, z). A point's cell along axis a is floor((p_a - range_min_a) / voxel_size_a),
//   evaluated in IEEE float32 (one rounded subtraction, one rounded division, as spconv's CPU PointToVoxel does).
//   The point is dropped when that value is NaN, outside [0, grid_a), or the coordinate is not finite.
// - Cell keys are int32: key = (z * grid_y + y) * grid_x + x; the caller guarantees grid_x * grid_y * grid_z < 2^31.
// - Coordinates are returned as int32 (z, y, x).
#pragma once

#include <torch/extension.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fusion_ops {

// The grid description passed from Python (float32 copies of the Python floats, int grid sizes). Plain arrays, so
// that the struct can be passed by value to CUDA kernels.
struct VoxelGridSpec {
  float range_min[3];   // x, y, z lower corner (meters)
  float voxel_size[3];  // x, y, z cell size (meters)
  int32_t grid[3];      // x, y, z number of cells
};

VoxelGridSpec make_grid_spec(const std::vector<double>& range_min, const std::vector<double>& voxel_size,
                             const std::vector<int64_t>& grid);

// The cell index of one coordinate along one axis, or -1 when the point is dropped. Identical on host and device:
// IEEE float32 subtraction and division (no fused or approximate operations). spconv takes floor(scaled) and keeps
// the point when 0 <= floor(scaled) < cells; that holds exactly when 0 <= scaled and trunc(scaled) < cells, and
// floor and trunc agree on non-negative values, so the floor is not needed. NaN fails the comparisons.
constexpr float kIntLimit = 2147483648.0f;  // 2^31: values at or above do not convert to int32
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int32_t axis_cell(float value, float lower, float size, int32_t cells) {
#if defined(__CUDA_ARCH__)
  const float scaled = __fdiv_rn(__fsub_rn(value, lower), size);
#else
  const float scaled = (value - lower) / size;
#endif
  if (!(scaled >= 0.0f) || !(scaled < kIntLimit)) return -1;
  const int32_t cell = static_cast<int32_t>(scaled);
  return cell < cells ? cell : -1;
}

// The int32 cell key of point (x, y, z), or -1 when it is dropped.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int32_t point_cell_key(float x, float y, float z, const VoxelGridSpec& g) {
  const int32_t cx = axis_cell(x, g.range_min[0], g.voxel_size[0], g.grid[0]);
  const int32_t cy = axis_cell(y, g.range_min[1], g.voxel_size[1], g.grid[1]);
  const int32_t cz = axis_cell(z, g.range_min[2], g.voxel_size[2], g.grid[2]);
  if (cx < 0 || cy < 0 || cz < 0) return -1;
  return (cz * g.grid[1] + cy) * g.grid[0] + cx;
}

// Accumulation type of bev_pool: float for float32 / float16 / bfloat16 inputs, double for float64. The same on CPU
// and CUDA, so that both sum every cell in input order with the same rounding and give bit-identical results.
template <typename T> struct BevAcc { using type = float; };
template <> struct BevAcc<double> { using type = double; };

// ---- CPU ----
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hard_voxelize_cpu(const torch::Tensor& points,
                                                                          const VoxelGridSpec& grid,
                                                                          int64_t max_points, int64_t max_voxels);
torch::Tensor dynamic_voxelize_cpu(const torch::Tensor& points, const VoxelGridSpec& grid);
std::tuple<torch::Tensor, torch::Tensor> bev_pool_forward_cpu(const torch::Tensor& features,
                                                              const torch::Tensor& coords, int64_t batch_size,
                                                              int64_t depth, int64_t height, int64_t width);

// ---- CUDA (compiled only with WITH_CUDA) ----
#ifdef WITH_CUDA
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hard_voxelize_cuda(const torch::Tensor& points,
                                                                           const VoxelGridSpec& grid,
                                                                           int64_t max_points, int64_t max_voxels);
torch::Tensor dynamic_voxelize_cuda(const torch::Tensor& points, const VoxelGridSpec& grid);
std::tuple<torch::Tensor, torch::Tensor> bev_pool_forward_cuda(const torch::Tensor& features,
                                                               const torch::Tensor& coords, int64_t batch_size,
                                                               int64_t depth, int64_t height, int64_t width);
#endif

}  // namespace fusion_ops
