"""Loading the C++ (CPU) and CUDA extension libraries.

The libraries register their kernels with the torch dispatcher (namespaces ``medmap_fast_C`` and
``medmap_fast_cuda``); nothing is imported as a Python module. Two ways to get them:

1. ahead of time: ``MEDMAP_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles them
   next to the package (``medmap_fast/_C*.so``, ``medmap_fast/_C_cuda*.so``);
2. just in time (the default): the first op that needs a library compiles it with
   ``torch.utils.cpp_extension.load`` into a cache keyed by the sources, torch version and flags,
   so later processes load it in milliseconds.

A failure never raises here: it is recorded as the reason the backend is unavailable, which the
dispatcher reports when no backend can take an input.

Environment switches:
    MEDMAP_FAST_NO_JIT=1        never compile at run time (only prebuilt libraries are used)
    MEDMAP_FAST_CACHE_DIR=DIR   where JIT builds go (default ~/.cache/medmap_fast)
    MEDMAP_FAST_CUDA_ARCHS      CUDA archs for JIT builds, e.g. "8.0;9.0" (the default)
    MEDMAP_FAST_DEBUG=1         build with -O0 -g and device debug info
    MEDMAP_FAST_VERBOSE_BUILD=1 show the compiler's output
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

_PKG_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict = {}

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def csrc_dir() -> Optional[Path]:
    """The C++/CUDA sources: packaged as ``medmap_fast._csrc``, or ``csrc/`` of a source checkout."""
    candidates = [_PKG_DIR / "_csrc", _PKG_DIR.parent / "csrc"]
    try:
        import medmap_fast._csrc as packaged  # mapped from csrc/ by setup.py

        candidates.insert(0, Path(packaged.__file__).resolve().parent)
    except ImportError:
        pass
    for c in candidates:
        if (c / "cpu").is_dir():
            return c
    return None


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _sources(kind: str) -> list:
    root = csrc_dir()
    if root is None:
        return []
    if kind == "cpu":
        pats = ["cpu/*.cpp"]
    else:
        pats = ["cuda/*.cpp", "cuda/*.cu"]
    return sorted(str(p) for pat in pats for p in glob.glob(str(root / pat)))


def cpu_flags() -> Tuple[list, list]:
    cflags = ["-O0", "-g"] if _flag("MEDMAP_FAST_DEBUG") else ["-O3"]
    # at::parallel_for only runs in parallel when the caller is compiled with OpenMP.
    # No FMA contraction: results stay bitwise the same whatever -march the compiler targets.
    return cflags + ["-fopenmp", "-ffp-contract=off"], ["-fopenmp"]


def cuda_flags() -> list:
    archs = os.environ.get("MEDMAP_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    flags = ["-O3", "-lineinfo"] if not _flag("MEDMAP_FAST_DEBUG") else ["-O0", "-G"]
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _prebuilt(stem: str) -> Optional[str]:
    hits = sorted(glob.glob(str(_PKG_DIR / f"{stem}.*so"))) + sorted(glob.glob(str(_PKG_DIR / f"{stem}.*pyd")))
    return hits[0] if hits else None


def _cache_root() -> Path:
    return Path(os.environ.get("MEDMAP_FAST_CACHE_DIR", Path.home() / ".cache" / "medmap_fast"))


def _build_key(sources: list, extra: list) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(Path(s).name.encode())
        h.update(Path(s).read_bytes())
        for header in sorted(Path(s).parent.glob("*.h")):
            h.update(header.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join(extra).encode())
    return h.hexdigest()[:16]


def _jit(name: str, sources: list, cflags: list, ldflags: list, cuda_cflags: Optional[list]) -> str:
    from torch.utils.cpp_extension import load

    key = _build_key(sources, cflags + ldflags + (cuda_cflags or []))
    build_dir = _cache_root() / f"{name}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = _flag("MEDMAP_FAST_VERBOSE_BUILD")
    if not (build_dir / f"{name}.so").exists():
        print(f"medmap_fast: compiling the {name} extension (first use; cached in {build_dir})", file=sys.stderr)
    load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_cuda_cflags=cuda_cflags,
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(build_dir),
        with_cuda=cuda_cflags is not None,
        is_python_module=False,
        verbose=verbose,
    )
    return str(build_dir / f"{name}.so")


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    picked = (errors or lines)[:3]
    return " | ".join(ln.strip()[:200] for ln in picked)


def _load(kind: str) -> Tuple[bool, str]:
    """Returns (loaded, where-or-reason)."""
    stem = "_C" if kind == "cpu" else "_C_cuda"
    if kind == "cuda":
        if torch.version.cuda is None:
            return False, f"this torch ({torch.__version__}) is a CPU-only build"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
    pre = _prebuilt(stem)
    if pre is not None:
        try:
            torch.ops.load_library(pre)
            return True, pre
        except Exception as e:  # a stale build for another torch: fall through to JIT
            prebuilt_error = _short(e)
    else:
        prebuilt_error = None
    if _flag("MEDMAP_FAST_NO_JIT"):
        why = "MEDMAP_FAST_NO_JIT=1 and no prebuilt library"
        return False, why + (f" that loads ({prebuilt_error})" if prebuilt_error else "")
    sources = _sources(kind)
    if not sources:
        return False, "the C++ sources (csrc/) are not installed with the package"
    try:
        if kind == "cpu":
            cflags, ldflags = cpu_flags()
            path = _jit("medmap_fast_C", sources, cflags, ldflags, None)
        else:
            from torch.utils.cpp_extension import CUDA_HOME

            if CUDA_HOME is None:
                return False, "nvcc/CUDA_HOME not found, so the CUDA extension cannot be compiled"
            path = _jit("medmap_fast_cuda", sources, ["-O3"], [], cuda_flags())
        torch.ops.load_library(path)
        return True, path
    except Exception as e:
        return False, f"building the {kind} extension failed: {_short(e)}"


def library(kind: str) -> Tuple[bool, str]:
    """Load (once per process) the ``cpu`` or ``cuda`` library: (loaded, path or reason)."""
    if kind in _state:  # lock-free once loaded, so that torch.compile traces through it
        return _state[kind]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind not in _state:
            _state[kind] = _load(kind)
        return _state[kind]


def build_all(verbose: bool = True) -> dict:
    """Compile (or load) every extension this machine can use; returns {kind: (loaded, info)}."""
    result = {k: library(k) for k in ("cpu", "cuda")}
    if verbose:
        for k, (ok, info) in result.items():
            print(f"{k:5s}: {'ok' if ok else 'unavailable'}: {info}")
    return result
