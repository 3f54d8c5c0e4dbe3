"""What an ablation trains: one arm per (anchor, seed), every other setting shared (docs: ablation).

The plan is saved as ``ablation.json`` in the ablation folder. Running the command again with the same
shared settings continues the ablation (arms may be added or left out); other shared settings are an
error, since the finished arms would no longer be comparable with the new ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..data.atomic import atomic_write_text
from ..training.config import ANCHORS, TrainConfig

PLAN_FILE = "ablation.json"
RUNS = "runs"
WEIGHTS = ("last", "best")
#: settings that differ between arms; everything else is the plan's shared configuration
ARM_SETTINGS = ("anchor", "seed")


@dataclasses.dataclass(frozen=True)
class Arm:
    anchor: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.anchor}-seed{self.seed}"


@dataclasses.dataclass
class Plan:
    base: TrainConfig  # the shared settings (its anchor and seed are those of the first arm)
    anchors: List[str]
    seeds: List[int]
    test_data: Optional[str] = None  # scored on these cases instead of the held-out split
    weights: str = "last"

    def __post_init__(self):
        if not self.anchors:
            raise ValueError("--anchors: expected at least one anchor")
        unknown = [a for a in self.anchors if a not in ANCHORS]
        if unknown:
            raise ValueError(f"--anchors: unknown {unknown}; choose from {', '.join(ANCHORS)}")
        if len(set(self.anchors)) != len(self.anchors):
            raise ValueError(f"--anchors: each anchor once, got {self.anchors}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"--weights: expected one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        for anchor in self.anchors:  # an anchor that the shared settings cannot train fails now, not hours in
            self.arm_config(Arm(anchor, self.seeds[0]))

    @property
    def arms(self) -> List[Arm]:
        """Seed by seed, so that an interrupted ablation has whole seeds of every anchor first."""
        return [Arm(a, s) for s in self.seeds for a in self.anchors]

    def arm_config(self, arm: Arm) -> TrainConfig:
        return TrainConfig.from_json(dict(self.base.to_json(), anchor=arm.anchor, seed=arm.seed))

    def shared(self) -> Dict:
        """The settings every arm shares (the arm settings and the worker count, which changes nothing computed,
        left out)."""
        out = self.base.to_json()
        for k in ARM_SETTINGS + ("num_workers",):
            out.pop(k)
        out.update(test_data=self.test_data, weights=self.weights)
        return out

    def to_json(self) -> Dict:
        return {"shared": self.shared(), "anchors": list(self.anchors), "seeds": list(self.seeds),
                "framework": self.base.framework, "arms": [a.name for a in self.arms]}


def run_dir(out: Path, arm: Arm) -> Path:
    return Path(out) / RUNS / arm.name


def check_and_save_plan(out: Path, plan: Plan, write: bool = True) -> None:
    """Check the plan against the one an earlier invocation saved in ``out``, then (``write``) save it."""
    path = Path(out) / PLAN_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))["shared"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--out {str(out)!r}: cannot read its {PLAN_FILE} ({e}); choose another folder") from e
        now = plan.shared()
        diff = {k: (stored.get(k), now.get(k)) for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"--out {str(out)!r} holds an ablation with other shared settings ({shown}); its arms "
                             "would not be comparable with new ones: give the same settings, or another --out")
    if write:
        atomic_write_text(path, json.dumps(plan.to_json(), indent=2) + "\n")


def seeds_from(count: int, first: int) -> List[int]:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--seeds: expected a positive number of seeds, got {count!r}")
    return list(range(first, first + count))


def parse_anchors(text: str) -> List[str]:
    return [a.strip() for a in str(text).split(",") if a.strip()]
