// CPU voxelization: hard (spconv PointToVoxel / mmcv deterministic semantics) and dynamic.
//
// hard_voxelize_cpu runs in three phases:
//   A (parallel)  per-point int32 cell key, -1 for dropped points;
//   B (serial)    walk the points in input order: cell key -> voxel id through a hash table (or a dense table for
//                 small grids), new voxels numbered in order of first appearance, each voxel keeping its first
//                 max_points points; the output slot of every kept point is recorded;
//   C (parallel)  copy the kept points into their slots, zero the padding, decode the voxel coordinates.
// Only phase B depends on the order of the points and it is serial, so the result does not depend on the number of
// threads. Phase B touches 8 bytes per point in a table sized to the point count (or the grid, when that is smaller)
// and prefetches table entries a few points ahead, which is what makes it faster than a dense grid-sized table.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <memory>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fusion_ops {

VoxelGridSpec make_grid_spec(const std::vector<double>& range_min, const std::vector<double>& voxel_size,
                             const std::vector<int64_t>& grid) {
  TORCH_CHECK_VALUE(range_min.size() == 3 && voxel_size.size() == 3 && grid.size() == 3,
                    "voxel grid: range_min, voxel_size and grid must have 3 entries (x, y, z)");
  VoxelGridSpec spec;
  int64_t cells = 1;
  for (int a = 0; a < 3; ++a) {
    spec.range_min[a] = static_cast<float>(range_min[a]);
    spec.voxel_size[a] = static_cast<float>(voxel_size[a]);
    TORCH_CHECK_VALUE(spec.voxel_size[a] > 0.0f, "voxel grid: voxel_size must be positive, got ", voxel_size[a]);
    TORCH_CHECK_VALUE(grid[a] >= 1, "voxel grid: every axis needs at least one cell, got ", grid[a]);
    cells *= grid[a];
    TORCH_CHECK_VALUE(cells <= std::numeric_limits<int32_t>::max(), "voxel grid: more cells than int32 can index");
    spec.grid[a] = static_cast<int32_t>(grid[a]);
  }
  return spec;
}

namespace {

void check_points(const torch::Tensor& points) {
  TORCH_CHECK_VALUE(points.device().is_cpu(), "points must be a CPU tensor here");
  TORCH_CHECK_VALUE(points.scalar_type() == torch::kFloat32, "points must be float32, got ", points.scalar_type());
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) >= 3, "points must be [N, C>=3], got ", points.sizes());
  TORCH_CHECK_VALUE(points.is_contiguous(), "points must be contiguous");
}

// Per-point cell keys (phase A), -1 for dropped points. Returns the number of kept points.
int64_t compute_keys(const float* pts, int64_t n, int64_t stride, const VoxelGridSpec& g, int32_t* keys) {
  // A few chunks per thread, none smaller than 16k points (small inputs run inline, without a parallel region).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, n / 16384));
  std::vector<int64_t> valid_per_chunk(static_cast<size_t>(chunks), 0);
  const int64_t chunk_size = (n + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t lo = chunk * chunk_size, hi = std::min(n, lo + chunk_size);
      int64_t valid = 0;
      int64_t i = lo;
#if defined(__SSE2__)
      // x, y, z (and one more float, ignored) of a point in one register: one divps instead of three divss, the
      // same IEEE float32 results lane by lane as axis_cell.
      const __m128 lower = _mm_setr_ps(g.range_min[0], g.range_min[1], g.range_min[2], 0.0f);
      const __m128 size = _mm_setr_ps(g.voxel_size[0], g.voxel_size[1], g.voxel_size[2], 1.0f);
      const __m128 zero = _mm_setzero_ps(), limit = _mm_set1_ps(kIntLimit);
      const __m128i cells = _mm_setr_epi32(g.grid[0], g.grid[1], g.grid[2], 1);
      const int64_t vector_end = stride >= 4 ? hi : std::min(hi, n - 1);  // never read past the last float
      for (; i < vector_end; ++i) {
        const __m128 scaled = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(pts + i * stride), lower), size);
        const __m128 in_range = _mm_and_ps(_mm_cmpge_ps(scaled, zero), _mm_cmplt_ps(scaled, limit));
        const __m128i cell = _mm_cvttps_epi32(scaled);
        const __m128 inside = _mm_and_ps(in_range, _mm_castsi128_ps(_mm_cmplt_epi32(cell, cells)));
        const int32_t cx = _mm_cvtsi128_si32(cell);
        const int32_t cy = _mm_cvtsi128_si32(_mm_shuffle_epi32(cell, 1));
        const int32_t cz = _mm_cvtsi128_si32(_mm_shuffle_epi32(cell, 2));
        const bool keep = (_mm_movemask_ps(inside) & 7) == 7;
        keys[i] = keep ? (cz * g.grid[1] + cy) * g.grid[0] + cx : -1;
        valid += keep;
      }
#endif
      for (; i < hi; ++i) {
        const float* p = pts + i * stride;
        const int32_t key = point_cell_key(p[0], p[1], p[2], g);
        keys[i] = key;
        valid += key >= 0;
      }
      valid_per_chunk[chunk] = valid;
    }
  });
  int64_t total = 0;
  for (int64_t v : valid_per_chunk) total += v;
  return total;
}

inline uint32_t hash_key(int32_t key, int shift) {
  return (static_cast<uint32_t>(key) * 2654435761u) >> shift;
}

constexpr int32_t kUnseen = std::numeric_limits<int32_t>::min();

struct Slot {
  int32_t key;    // -1: empty
  int32_t voxel;  // voxel id; kUnseen before the cell's first point; -1 for a cell past max_voxels
};

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t size) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(size, 1))]);
}

// Phase B: walk the points in input order. lookup(i, key) returns a reference to the voxel id stored for the cell
// (kUnseen on first sight). slot_of_point[i] = voxel * max_points + rank for the kept points, -1 for the others.
template <typename Lookup>
int32_t assign_voxels(const int32_t* keys, int64_t n, int64_t max_points, int64_t max_voxels, Lookup&& lookup,
                      int32_t* counts, int32_t* voxel_keys, int64_t* slot_of_point) {
  int32_t voxel_num = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = keys[i];
    slot_of_point[i] = -1;
    if (key < 0) continue;
    int32_t& voxel = lookup(i, key);
    if (voxel == kUnseen) {  // first point of this cell
      if (voxel_num < max_voxels) {
        voxel = voxel_num;
        voxel_keys[voxel_num] = key;
        counts[voxel_num] = 0;
        ++voxel_num;
      } else {
        voxel = -1;  // arrived after max_voxels voxels: dropped with all its points
      }
    }
    if (voxel < 0) continue;
    const int32_t count = counts[voxel];
    if (count < max_points) {
      slot_of_point[i] = static_cast<int64_t>(voxel) * max_points + count;
      counts[voxel] = count + 1;
    }
  }
  return voxel_num;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hard_voxelize_cpu(const torch::Tensor& points,
                                                                          const VoxelGridSpec& g,
                                                                          int64_t max_points, int64_t max_voxels) {
  check_points(points);
  TORCH_CHECK_VALUE(max_points >= 1 && max_voxels >= 1, "max_points and max_voxels must be >= 1");
  const int64_t n = points.size(0), c = points.size(1);
  const float* pts = points.data_ptr<float>();

  auto keys = uninitialized<int32_t>(n);
  const int64_t kept = compute_keys(pts, n, c, g, keys.get());
  if (kept == 0) {
    const auto int_options = points.options().dtype(torch::kInt32);
    return {torch::zeros({0, max_points, c}, points.options()), torch::zeros({0, 3}, int_options),
            torch::zeros({0}, int_options)};
  }
  const int64_t voxel_cap = std::min<int64_t>(kept, max_voxels);
  auto counts = uninitialized<int32_t>(voxel_cap);
  auto voxel_keys = uninitialized<int32_t>(voxel_cap);
  auto slot_of_point = uninitialized<int64_t>(n);

  constexpr int64_t kPrefetch = 16;
  int64_t capacity = 16;
  while (capacity < 2 * kept) capacity <<= 1;
  const int64_t cells = static_cast<int64_t>(g.grid[0]) * g.grid[1] * g.grid[2];
  int32_t voxel_num = 0;
  if (cells <= 2 * capacity) {
    // Small grid (pillars): a dense table of one int32 per cell is smaller than the hash table would be.
    std::vector<int32_t> table(static_cast<size_t>(cells), kUnseen);
    int32_t* t = table.data();
    const int32_t* k = keys.get();
    auto lookup = [&](int64_t i, int32_t key) -> int32_t& {
      if (i + kPrefetch < n && k[i + kPrefetch] >= 0) __builtin_prefetch(t + k[i + kPrefetch], 1);
      return t[key];
    };
    voxel_num = assign_voxels(k, n, max_points, max_voxels, lookup, counts.get(), voxel_keys.get(),
                              slot_of_point.get());
  } else {
    // Open addressing with linear probing, at most half full.
    int shift = 32;
    for (int64_t cap = capacity; cap > 1; cap >>= 1) --shift;
    const uint32_t mask = static_cast<uint32_t>(capacity - 1);
    std::vector<Slot> table(static_cast<size_t>(capacity), Slot{-1, kUnseen});
    Slot* t = table.data();
    const int32_t* k = keys.get();
    auto lookup = [&](int64_t i, int32_t key) -> int32_t& {
      if (i + kPrefetch < n && k[i + kPrefetch] >= 0) __builtin_prefetch(t + hash_key(k[i + kPrefetch], shift), 1);
      uint32_t h = hash_key(key, shift);
      while (true) {
        Slot& slot = t[h];
        if (slot.key == key) return slot.voxel;
        if (slot.key == -1) {
          slot.key = key;
          return slot.voxel;  // kUnseen
        }
        h = (h + 1) & mask;
      }
    };
    voxel_num = assign_voxels(k, n, max_points, max_voxels, lookup, counts.get(), voxel_keys.get(),
                              slot_of_point.get());
  }

  auto voxels = torch::empty({voxel_num, max_points, c}, points.options());
  auto coords = torch::empty({voxel_num, 3}, points.options().dtype(torch::kInt32));
  auto num_points = torch::empty({voxel_num}, points.options().dtype(torch::kInt32));
  float* vox = voxels.data_ptr<float>();
  int32_t* crd = coords.data_ptr<int32_t>();
  int32_t* num = num_points.data_ptr<int32_t>();
  const int64_t row_floats = max_points * c;

  // Phase C: padding and coordinates per voxel, then the points into their slots (disjoint writes).
  at::parallel_for(0, voxel_num, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int32_t count = counts[v];
      std::fill(vox + v * row_floats + count * c, vox + (v + 1) * row_floats, 0.0f);
      num[v] = count;
      const int32_t key = voxel_keys[v];
      crd[3 * v + 0] = key / (g.grid[0] * g.grid[1]);
      crd[3 * v + 1] = (key / g.grid[0]) % g.grid[1];
      crd[3 * v + 2] = key % g.grid[0];
    }
  });
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = slot_of_point[i];
      if (slot >= 0) std::copy(pts + i * c, pts + (i + 1) * c, vox + slot * c);
    }
  });
  return {voxels, coords, num_points};
}

torch::Tensor dynamic_voxelize_cpu(const torch::Tensor& points, const VoxelGridSpec& g) {
  check_points(points);
  const int64_t n = points.size(0), c = points.size(1);
  auto coords = torch::empty({n, 3}, points.options().dtype(torch::kInt32));
  const float* pts = points.data_ptr<float>();
  int32_t* crd = coords.data_ptr<int32_t>();
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* p = pts + i * c;
      const int32_t cx = axis_cell(p[0], g.range_min[0], g.voxel_size[0], g.grid[0]);
      const int32_t cy = axis_cell(p[1], g.range_min[1], g.voxel_size[1], g.grid[1]);
      const int32_t cz = axis_cell(p[2], g.range_min[2], g.voxel_size[2], g.grid[2]);
      const bool keep = cx >= 0 && cy >= 0 && cz >= 0;
      crd[3 * i + 0] = keep ? cz : -1;
      crd[3 * i + 1] = keep ? cy : -1;
      crd[3 * i + 2] = keep ? cx : -1;
    }
  });
  return coords;
}

}  // namespace fusion_ops
