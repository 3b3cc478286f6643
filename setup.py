"""Install the fusion framework.

The folders `datasets/` and `cuda_ops/` are installed as `fusion.datasets` and `fusion.cuda_ops` (package_dir), so
installing never creates a top-level `datasets` module that would shadow Hugging Face's package.

The compiled ops (`fusion.cuda_ops._C`) are built as a CUDAExtension when torch has CUDA (or FORCE_CUDA=1), for
sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise, and as a CppExtension otherwise. Install with
`pip install --no-build-isolation -e .` after torch is installed.
"""
import glob
import os

from setuptools import setup

PACKAGES = {
    "fusion": "fusion",
    "fusion.branches": "fusion/branches",
    "fusion.deploy": "fusion/deploy",
    "fusion.evaluation": "fusion/evaluation",
    "fusion.heads": "fusion/heads",
    "fusion.replay": "fusion/replay",
    "fusion.datasets": "datasets",
    "fusion.datasets.synthetic": "datasets/synthetic",
    "fusion.cuda_ops": "cuda_ops",
}


def compiled_extensions():
    """The cuda_ops extension: CUDA sources when torch can build them, the C++ sources always."""
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("cuda_ops", "csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("cuda_ops", "csrc", "*.cu")))
    if not cpp_sources:
        return []
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    # torch picks the C++ standard its headers need (C++20 for torch 2.13). No --use_fast_math: the voxel cell of a
    # point must come from IEEE float32 division on the GPU exactly as on the CPU (bit-identical results).
    cxx_flags = ["-O3", "-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return [CUDAExtension(
            name="fusion.cuda_ops._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=[os.path.join(here, "cuda_ops", "csrc")],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )]
    return [CppExtension(
        name="fusion.cuda_ops._C",
        sources=cpp_sources,
        include_dirs=[os.path.join(here, "cuda_ops", "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fusion",
    version="0.1.0",
    description="Camera, LiDAR, radar and GPS fusion in bird's-eye view, with a nuScenes reader and CPU/CUDA ops",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"fusion.cuda_ops": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h"]},
    ext_modules=compiled_extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
