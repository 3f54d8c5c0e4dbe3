"""Triton kernels of medmap_fast (installed as ``medmap_fast.kernels``).

Importing this package never fails: when Triton is missing, ``TRITON_ERROR`` says why and the
kernel modules are not imported. ``INTERPRETED`` is true when ``TRITON_INTERPRET=1`` was set before
the first import, in which case the kernels run on CPU tensors through Triton's interpreter.
"""

import os

TRITON_ERROR = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # ImportError, or a broken install
    TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e}); pip install triton"

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
