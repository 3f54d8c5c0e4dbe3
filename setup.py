"""Install medmap_fast.

    pip install -e .                       # pure-Python install; C++/CUDA compile on first use (cached)
    MEDMAP_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .   # compile the extensions now

Switches for the ahead-of-time build (they need torch in the build environment, hence
--no-build-isolation, so that pip does not fetch a torch of its own):
    MEDMAP_FAST_BUILD_EXT=1     build the C++ extension (and the CUDA one when possible)
    MEDMAP_FAST_SKIP_CUDA=1     never build the CUDA extension
    MEDMAP_FAST_FORCE_CUDA=1    build the CUDA extension even when no GPU is visible (needs nvcc)
    MEDMAP_FAST_CUDA_ARCHS      e.g. "8.0;9.0" (the default)
    MEDMAP_FAST_DEBUG=1         -O0 -g builds
"""

import glob
import os

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if not _flag("MEDMAP_FAST_BUILD_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "MEDMAP_FAST_BUILD_EXT=1 needs torch importable while building: install torch first, then "
            "`MEDMAP_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .`"
        ) from e
    debug = _flag("MEDMAP_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    rel = lambda pats: sorted(os.path.relpath(p, here) for pat in pats for p in glob.glob(os.path.join(csrc, pat)))
    exts = [
        CppExtension(
            "medmap_fast._C",
            rel(["cpu/*.cpp"]),
            include_dirs=[csrc],
            extra_compile_args=opt + ["-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = not _flag("MEDMAP_FAST_SKIP_CUDA") and torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda and (torch.cuda.is_available() or _flag("MEDMAP_FAST_FORCE_CUDA")):
        archs = os.environ.get("MEDMAP_FAST_CUDA_ARCHS", "8.0;9.0")
        gencode = [
            f"-gencode=arch=compute_{a},code=sm_{a}"
            for a in (x.strip().replace(".", "") for x in archs.replace(",", ";").split(";"))
            if a
        ]
        exts.append(
            CUDAExtension(
                "medmap_fast._C_cuda",
                rel(["cuda/*.cpp", "cuda/*.cu"]),
                include_dirs=[csrc],
                extra_compile_args={"cxx": opt, "nvcc": (["-O0", "-G"] if debug else ["-O3", "-lineinfo"]) + gencode},
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="medmap_fast",
    version="0.1.0",
    description="Fast fused PyTorch ops for missing-modality brain-tumour segmentation (MedMAP alignment)",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "medmap_fast",
        "medmap_fast.ops",
        "medmap_fast.nn",
        "medmap_fast.data",
        "medmap_fast.evaluation",
        "medmap_fast.training",
        "medmap_fast.models",
        "medmap_fast.kernels",
        "medmap_fast._csrc",
    ],
    package_dir={"medmap_fast.kernels": "kernels", "medmap_fast._csrc": "csrc"},
    package_data={"medmap_fast._csrc": ["*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cpp", "cuda/*.h"]},
    include_package_data=False,
    # torch is not pinned: keep whatever torch is installed (>= 2.4 for torch.library.custom_op).
    # nibabel reads and writes NIfTI; scipy gives distance transforms (HD95) and smoothing; matplotlib the PNG table.
    install_requires=["torch>=2.4", "numpy", "ninja", "nibabel>=5", "scipy", "matplotlib", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        # the ICBM152 2009a template (shipped inside nilearn) gives the synthetic data real anatomy
        "anatomy": ["nilearn>=0.10"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.6", "nilearn>=0.10"],
    },
    entry_points={"console_scripts": ["medmap-fast=medmap_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
