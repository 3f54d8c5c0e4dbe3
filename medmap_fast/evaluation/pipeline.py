"""What ``predict`` and ``evaluate`` share: inference settings, their command-line options, one case's
segmentation, and how a case that cannot be read is reported."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..data import MODALITIES, spatial_size
from .inference import OUTPUTS, logits_to_labels, sliding_window_inference

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class InferenceSettings:
    window: tuple = (128, 128, 128)
    overlap: float = 0.5
    sigma_scale: Optional[float] = 0.125
    batch_size: int = 2
    amp: str = "none"
    device: str = "cpu"
    output: str = "classes"

    def as_json(self) -> dict:
        return dataclasses.asdict(self) | {"window": list(self.window)}


def parse_window(text: str) -> tuple:
    """'128' or '128,128,96' -> (d, h, w)."""
    try:
        vals = [int(p) for p in str(text).split(",")]
        return spatial_size(vals[0] if len(vals) == 1 else vals, "--window")
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"--window {text!r}: expected one positive int or three, 'D,H,W'") from None


def _overlap(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"--overlap {text!r}: expected a number in [0, 1)")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def _sigma(text: str) -> Optional[float]:
    if text.lower() in ("none", "0", "uniform"):
        return None
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(
            f"--sigma-scale {text!r}: expected a positive number, or 'none' for uniform weights"
        )
    return v


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model and inference")
    g.add_argument(
        "--model",
        required=required,
        metavar="M",
        help="TorchScript file, torch.export .pt2 file, or 'package.module:callable' returning the model "
        "(called with no arguments); called as model(x (n, 4, d, h, w), mask (n, 4) bool) -> logits (n, K, d, h, w)",
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="state_dict to load into the model (torch.save file, read with weights_only=True)",
    )
    g.add_argument(
        "--window",
        type=parse_window,
        default=(128, 128, 128),
        metavar="D[,H,W]",
        help="sliding-window size in voxels (default 128)",
    )
    g.add_argument(
        "--overlap",
        type=_overlap,
        default=0.5,
        help="fraction of a window shared by neighbours, in [0, 1) (default 0.5)",
    )
    g.add_argument(
        "--sigma-scale",
        type=_sigma,
        default=0.125,
        help="Gaussian weighting of window voxels, std = sigma_scale * window; 'none' for uniform (default 0.125)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=2, help="windows per model call (default 2)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument(
        "--amp", choices=tuple(AMP), default="none", help="autocast the model to bf16 or fp16 (default none)"
    )
    g.add_argument(
        "--output",
        choices=OUTPUTS,
        default=None,
        help="classes: K=4 softmax scores of labels 0,1,2,4 (argmax); regions: K=3 sigmoid scores of "
        "WT,TC,ET (threshold 0.5, nested) (default: the run's own for a model from medmap-fast train, else classes)",
    )


def resolve_device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: this machine has no CUDA GPU available to torch; use --device cpu")
    return str(dev)


def settings_from_args(args) -> InferenceSettings:
    return InferenceSettings(
        window=tuple(args.window),
        overlap=args.overlap,
        sigma_scale=args.sigma_scale,
        batch_size=args.batch_size,
        amp=args.amp,
        device=resolve_device(args.device),
        output=args.output or "classes",
    )


def output_of(model, given: Optional[str]) -> str:
    """The output mode: as given, else the one a model from ``medmap-fast train`` was trained for."""
    return given or getattr(model, "medmap_output", None) or "classes"


def segment(model, image: np.ndarray, mask: np.ndarray, s: InferenceSettings) -> np.ndarray:
    """uint8 (X, Y, Z) labels {0, 1, 2, 4} of one normalised (4, X, Y, Z) image, using the modalities in ``mask``.

    The channels outside ``mask`` are zeroed first: a model that ignores its mask argument still cannot
    see a modality it is meant to do without.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    m = torch.from_numpy(np.asarray(mask, dtype=bool))[None]
    x = x * m[:, :, None, None, None]
    logits = sliding_window_inference(
        model,
        x,
        m,
        window=s.window,
        overlap=s.overlap,
        sigma_scale=s.sigma_scale,
        batch_size=s.batch_size,
        autocast=AMP[s.amp],
        device=s.device,
        out_device="cpu",
    )
    return logits_to_labels(logits, s.output)[0].numpy()


def mask_names(mask) -> str:
    return ",".join(m for m, p in zip(MODALITIES, mask) if p) or "none"


def run_info() -> dict:
    """Date and versions for a run's config.json."""
    import matplotlib
    import nibabel
    import scipy

    from .. import __version__

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {
            "medmap_fast": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "nibabel": nibabel.__version__,
            "matplotlib": matplotlib.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


# What reading one case's files can raise (a corrupt or mismatched file, a missing label): such a case
# is reported and left out, and the other cases go on.
CASE_ERRORS = (ValueError, OSError)


class CaseFailures(ValueError):
    """Raised at the end of a run in which some cases could not be read (the others were processed).

    failures: (case name, error message) pairs.
    """

    def __init__(self, what: str, failures: List[Tuple[str, str]], total: int):
        self.failures = list(failures)
        lines = "".join(f"\n  {name}: {message}" for name, message in self.failures)
        super().__init__(f"{len(self.failures)} of {total} cases could not be {what}:{lines}")


def run_command(prog: str, body: Callable[[], object]) -> int:
    """Exit status of a command: 0, or 1 when ``body`` raises an error about the user's input (a file, an
    argument, a model that does not fit), printed as ``prog: error: ...`` rather than as a traceback."""
    try:
        body()
    except (ValueError, TypeError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def cli_text(doc: str) -> str:
    """A command module's docstring as --help text: without its ``medmap-fast X:`` prefix and the
    double backquotes of reST."""
    text = doc.strip().split(": ", 1)[1].replace("``", "")
    return text[0].upper() + text[1:]
