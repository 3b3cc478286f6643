// Python bindings of fusion.cuda_ops._C: one entry point per op, dispatching on the device of the input.
// The Python wrappers (cuda_ops/voxelize.py, cuda_ops/bev_pool.py) validate and normalise the arguments first; the
// checks here are a second line that turns misuse into a ValueError instead of a crash.
#include "ops.h"

namespace fusion_ops {
namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK_VALUE(false, op, ": got CUDA tensors but fusion.cuda_ops was built without CUDA. Rebuild with a "
                    "CUDA-enabled torch (or FORCE_CUDA=1): pip install --no-build-isolation -e .");
  throw;  // unreachable
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hard_voxelize(const torch::Tensor& points,
                                                                      const std::vector<double>& range_min,
                                                                      const std::vector<double>& voxel_size,
                                                                      const std::vector<int64_t>& grid,
                                                                      int64_t max_points, int64_t max_voxels) {
  const VoxelGridSpec spec = make_grid_spec(range_min, voxel_size, grid);
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return hard_voxelize_cuda(points, spec, max_points, max_voxels);
#else
    no_cuda("hard_voxelize");
#endif
  }
  return hard_voxelize_cpu(points, spec, max_points, max_voxels);
}

torch::Tensor dynamic_voxelize(const torch::Tensor& points, const std::vector<double>& range_min,
                               const std::vector<double>& voxel_size, const std::vector<int64_t>& grid) {
  const VoxelGridSpec spec = make_grid_spec(range_min, voxel_size, grid);
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return dynamic_voxelize_cuda(points, spec);
#else
    no_cuda("dynamic_voxelize");
#endif
  }
  return dynamic_voxelize_cpu(points, spec);
}

std::tuple<torch::Tensor, torch::Tensor> bev_pool_forward(const torch::Tensor& features, const torch::Tensor& coords,
                                                          int64_t batch_size, int64_t depth, int64_t height,
                                                          int64_t width) {
  TORCH_CHECK_VALUE(features.device() == coords.device(), "bev_pool: features and coords on different devices");
  if (features.is_cuda()) {
#ifdef WITH_CUDA
    return bev_pool_forward_cuda(features, coords, batch_size, depth, height, width);
#else
    no_cuda("bev_pool");
#endif
  }
  return bev_pool_forward_cpu(features, coords, batch_size, depth, height, width);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fusion_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusion.cuda_ops compiled kernels (CPU, and CUDA when built with it). Use the wrappers in fusion.cuda_ops.";
  m.def("hard_voxelize", &fusion_ops::hard_voxelize, "points, range_min, voxel_size, grid, max_points, max_voxels "
        "-> (voxels, coords, num_points)");
  m.def("dynamic_voxelize", &fusion_ops::dynamic_voxelize, "points, range_min, voxel_size, grid -> coords");
  m.def("bev_pool_forward", &fusion_ops::bev_pool_forward, "features, coords, B, Z, H, W -> (out, cell keys)");
  m.def("with_cuda", &fusion_ops::with_cuda, "whether the CUDA kernels were compiled in");
}
