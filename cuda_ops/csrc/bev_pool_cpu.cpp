// CPU BEV pooling (lift-splat "splat"): sum point features into their cells, deterministically.
//
// The same structure as the CUDA kernel: a stable counting sort groups the points by cell (input order within a
// cell), then every cell's sum is accumulated in that order (acc type: float, or double for float64 inputs) and
// written into the channel-major output [B, C, Z, H, W], 16 cells at a time. Threads own disjoint cell ranges, so the
// result is bit-identical for any number of threads, and to the CUDA kernel.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <sstream>

namespace fusion_ops {

namespace {

// int32 cell key per point; returns the first row whose coordinates are outside the grid, or -1.
template <typename index_t>
int64_t bev_keys(const index_t* coords, int64_t p, int64_t batch_size, int64_t depth, int64_t height,
                 int64_t width, int32_t* keys) {
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, p, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const index_t* row = coords + 4 * i;
      const int64_t b = row[0], z = row[1], y = row[2], x = row[3];
      if (b < 0 || b >= batch_size || z < 0 || z >= depth || y < 0 || y >= height || x < 0 || x >= width) {
        int64_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        keys[i] = 0;
        continue;
      }
      keys[i] = static_cast<int32_t>(((b * depth + z) * height + y) * width + x);
    }
  });
  const int64_t bad = first_bad.load();
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

// Stable counting sort of the points by cell: `order` lists the points cell by cell, in input order within a cell,
// and cell_start[cell] .. cell_start[cell + 1] is the cell's range in `order`. Threads count and place contiguous
// point ranges; part t's points of a cell go after parts 0..t-1's, so the order is the serial one.
void sort_by_cell(const int32_t* keys, int64_t p, int64_t cells, int64_t parts, std::vector<int32_t>& order,
                  std::vector<int32_t>& cell_start) {
  const int64_t chunk = (p + parts - 1) / parts;
  std::vector<int32_t> cursor(static_cast<size_t>(parts * cells), 0);  // p < 2^31: counts fit int32
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      int32_t* count = cursor.data() + part * cells;
      for (int64_t i = part * chunk; i < std::min(p, (part + 1) * chunk); ++i) ++count[keys[i]];
    }
  });
  cell_start.assign(static_cast<size_t>(cells + 1), 0);
  int32_t running = 0;
  for (int64_t cell = 0; cell < cells; ++cell) {
    cell_start[cell] = running;
    for (int64_t part = 0; part < parts; ++part) {
      const int32_t count = cursor[part * cells + cell];
      cursor[part * cells + cell] = running;
      running += count;
    }
  }
  cell_start[cells] = running;
  order.resize(static_cast<size_t>(p));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      int32_t* next = cursor.data() + part * cells;
      for (int64_t i = part * chunk; i < std::min(p, (part + 1) * chunk); ++i) {
        order[next[keys[i]]++] = static_cast<int32_t>(i);
      }
    }
  });
}

template <typename scalar_t>
torch::Tensor pool_cpu(const torch::Tensor& features, const int32_t* keys, int64_t batch_size,
                       int64_t cells_per_batch) {
  using acc_t = typename BevAcc<scalar_t>::type;
  const int64_t p = features.size(0), c = features.size(1);
  const int64_t cells = batch_size * cells_per_batch;
  // Parallel counting needs one histogram per part: fewer parts for huge grids (at most ~4M extra counters).
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                                                p / 65536 + 1, (int64_t{1} << 22) / cells + 1}));
  std::vector<int32_t> order;
  std::vector<int32_t> cell_start;
  sort_by_cell(keys, p, cells, parts, order, cell_start);

  auto out = torch::empty({batch_size, c, cells_per_batch}, features.options());
  const scalar_t* feat = features.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  constexpr int64_t kTile = 16, kPrefetch = 8;
  const int64_t tiles = (cells + kTile - 1) / kTile;
  // Tiles of 16 cells: sum each cell's rows in input order into a small buffer, then write the tile's 16 cells of
  // every channel (64 contiguous bytes for float). Threads take contiguous tile ranges with about equal point counts.
  const int64_t work_parts = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()) * 4,
                                                                     tiles, p / 16384 + 1}));
  std::vector<int64_t> tile_bounds(static_cast<size_t>(work_parts + 1), tiles);
  tile_bounds[0] = 0;
  for (int64_t part = 1; part < work_parts; ++part) {
    const int64_t target = p * part / work_parts;
    const int64_t cell = std::upper_bound(cell_start.begin(), cell_start.end() - 1, target) - cell_start.begin() - 1;
    tile_bounds[part] = std::max(tile_bounds[part - 1], std::min(tiles, std::max<int64_t>(0, cell) / kTile));
  }
  at::parallel_for(0, work_parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(static_cast<size_t>(kTile * c));
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t tile = tile_bounds[part]; tile < tile_bounds[part + 1]; ++tile) {
        const int64_t cell0 = tile * kTile, cell1 = std::min(cells, cell0 + kTile);
        std::fill(buffer.begin(), buffer.end(), acc_t(0));
        const int64_t last = cell_start[cell1];
        for (int64_t cell = cell0; cell < cell1; ++cell) {
          acc_t* dst = buffer.data() + (cell - cell0) * c;
          for (int64_t k = cell_start[cell]; k < cell_start[cell + 1]; ++k) {
            if (k + kPrefetch < last) {  // feature rows come in random order: fetch them a few points early
              const char* ahead = reinterpret_cast<const char*>(feat + static_cast<int64_t>(order[k + kPrefetch]) * c);
              for (int64_t byte = 0; byte < c * static_cast<int64_t>(sizeof(scalar_t)); byte += 64) {
                __builtin_prefetch(ahead + byte);
              }
            }
            const scalar_t* src = feat + static_cast<int64_t>(order[k]) * c;
            for (int64_t ch = 0; ch < c; ++ch) dst[ch] += static_cast<acc_t>(src[ch]);
          }
        }
        for (int64_t ch = 0; ch < c; ++ch) {
          for (int64_t cell = cell0; cell < cell1; ++cell) {
            const int64_t b = cell / cells_per_batch, s = cell % cells_per_batch;
            o[(b * c + ch) * cells_per_batch + s] = static_cast<scalar_t>(buffer[(cell - cell0) * c + ch]);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> bev_pool_forward_cpu(const torch::Tensor& features,
                                                              const torch::Tensor& coords, int64_t batch_size,
                                                              int64_t depth, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(features.device().is_cpu() && coords.device().is_cpu(), "bev_pool: expected CPU tensors");
  TORCH_CHECK_VALUE(features.dim() == 2 && features.is_contiguous(), "bev_pool: features must be [P, C] contiguous");
  TORCH_CHECK_VALUE(coords.dim() == 2 && coords.size(1) == 4 && coords.size(0) == features.size(0) &&
                        coords.is_contiguous(),
                    "bev_pool: coords must be [P, 4] contiguous with P = features.shape[0]");
  TORCH_CHECK_VALUE(batch_size >= 1 && depth >= 1 && height >= 1 && width >= 1, "bev_pool: empty grid");
  const int64_t cells_per_batch = depth * height * width;
  TORCH_CHECK_VALUE(batch_size * cells_per_batch <= std::numeric_limits<int32_t>::max(),
                    "bev_pool: more cells than int32 can index");
  const int64_t p = features.size(0);
  TORCH_CHECK_VALUE(p <= std::numeric_limits<int32_t>::max(), "bev_pool: at most 2^31 - 1 points");
  auto keys = torch::empty({p}, coords.options().dtype(torch::kInt32));
  int32_t* k = keys.data_ptr<int32_t>();
  int64_t bad = -1;
  AT_DISPATCH_INDEX_TYPES(coords.scalar_type(), "bev_pool_keys", [&] {
    bad = bev_keys<index_t>(coords.data_ptr<index_t>(), p, batch_size, depth, height, width, k);
  });
  if (bad >= 0) {
    auto row = coords[bad];
    std::ostringstream msg;
    msg << "bev_pool: coords row " << bad << " = (" << row[0].item<int64_t>() << ", " << row[1].item<int64_t>()
        << ", " << row[2].item<int64_t>() << ", " << row[3].item<int64_t>()
        << ") (batch, z, y, x) is outside [0, " << batch_size << ") x [0, " << depth << ") x [0, " << height
        << ") x [0, " << width << "); filter the points before pooling";
    TORCH_CHECK_VALUE(false, msg.str());
  }
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "bev_pool_cpu", [&] {
    out = pool_cpu<scalar_t>(features, k, batch_size, cells_per_batch);
  });
  return {out.view({batch_size, features.size(1), depth, height, width}), keys};
}

}  // namespace fusion_ops
