"""Voxelization, BEV pooling and segment reductions: compiled C++ (and CUDA) kernels with pure-torch references.

    from fusion.cuda_ops import hard_voxelize, dynamic_voxelize, bev_pool, scatter_reduce
    from fusion.cuda_ops import reference      # the pure-torch references (tests, debugging)

Importing never fails because of the build; calling a compiled op without the extension raises
CompiledOpsMissingError saying how to build it (`pip install --no-build-isolation -e .`).
"""
from fusion.cuda_ops import reference
from fusion.cuda_ops._extension import CompiledOpsMissingError, has_cuda_kernels, is_built
from fusion.cuda_ops.bev_pool import bev_pool
from fusion.cuda_ops.grid_spec import VoxelGridSpec, voxel_grid
from fusion.cuda_ops.scatter import scatter_reduce, torch_scatter_available
from fusion.cuda_ops.voxelize import dynamic_voxelize, hard_voxelize

__all__ = [
    "CompiledOpsMissingError", "VoxelGridSpec", "bev_pool", "dynamic_voxelize", "hard_voxelize", "has_cuda_kernels",
    "is_built", "reference", "scatter_reduce", "torch_scatter_available", "voxel_grid",
]
