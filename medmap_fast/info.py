"""``python -m medmap_fast.info``: versions, and which backends this machine can use (and why not)."""

from __future__ import annotations

import platform

import torch

from . import _ext, dispatch
from .ops import _backends


def backend_table(build: bool = True) -> dict:
    """{device type: {backend: None (available) or the reason it is not}} for float32 inputs."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = {}
    for dev in devices:
        row = {}
        for name in dispatch.BACKENDS:
            if not build and name in ("cpu", "cuda") and name not in _ext._state:
                row[name] = "not loaded yet (compiled on first use)"
                continue
            row[name] = _backends.reason(name, dev, torch.float32, 4)
        table[dev.type] = row
    return table


def versions() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda or "none",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = str(torch.backends.cudnn.version())
    return info


def main(build: bool = True) -> None:
    for k, v in versions().items():
        print(f"{k:20s} {v}")
    print()
    for dev, row in backend_table(build).items():
        chosen = next((n for n in dispatch.PREFERENCE.get(dev, ()) if row.get(n) is None), None)
        print(f"{dev} tensors (automatic choice: {chosen}):")
        for name, why in row.items():
            print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")


if __name__ == "__main__":
    main()
