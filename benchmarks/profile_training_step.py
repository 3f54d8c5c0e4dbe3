"""Where the time of one training step goes: torch.profiler over a few steps, grouped.

    python benchmarks/profile_training_step.py --variant eager              # 64^3 on a CPU, fp32
    python benchmarks/profile_training_step.py --variant fused --size 32 --steps 2
    python benchmarks/profile_training_step.py --variant both --amp bf16    # both profiled, one process

The step, the model, the batch and the variants are those of ``test_bench_training_step.py`` (the
trainer's own step of the SLS framework with the MedMAP alignment; fused: ``fused=True``; eager:
``fused=False``, plain torch.nn and the reference ops). Every variant starts from the same weights.
After ``--warmup`` steps of each, the variants take turns for ``--steps`` steps timed without the
profiler (slow drifts of a shared machine hit both alike; both variants are timed unless
``--no-compare``), then ``--steps`` more of each variant profiled are profiled.

Grouping. Each top-level event of the profile (an op called from Python, a region named below, or
one autograd node of the backward) goes whole (its own time and its children's) into one group, by
the first rule that applies:

1. a region the script names while profiling: the fusion modules of every level ("fusion"), the
   alignment modules ("alignment"), the segmentation loss with deep supervision ("loss"), gradient
   clipping ("optimiser"), the trainer's logged training Dice and modality gap ("other");
2. a backward node: the group of the forward event that made it (matched by autograd sequence number),
   so the backward of a reference op inside the fusion region is fusion, that of a view inside
   instance_norm is norm+activation;
3. its name, then the names of the events inside it (the one with the most time decides), by this table:

   convolution      conv3d, conv_transpose3d, convolution(_backward), mkldnn / oneDNN / cudnn ops,
                    ConvolutionBackward
   norm+activation  instance_norm, batch_norm, group_norm (native and backward), leaky_relu,
                    medmap_fast norm_act ops
   fusion           medmap_fast masked_fusion ops (fuse_*, zero_concat, impute)
   alignment        medmap_fast anchor_align / gaussian_kl / moment_matching ops
   optimiser        Optimizer.step / Optimizer.zero_grad (AdamW's ops inside), _foreach_* ops
   other            everything else (masking the input, stacking the modality features, the
                    decoder's concatenations, gradient accumulation, the finite check, ...)

Times are the profiler's CPU time of each top-level event (self times of the event and everything
inside it; on a GPU its device time instead), per step. "outside any op" is the profiled wall-clock
time per step not inside any recorded event (Python between ops); percentages are of the profiled
wall-clock time. The bound: if only the non-convolution share s of the eager step could be made
faster (the convolutions being the same in every variant), no variant can be faster than
1/(1-s) = eager step / convolution time; the script prints it next to the fused step's speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_training_step import BATCH, Step, model_name  # noqa: E402

GROUPS = ("convolution", "norm+activation", "fusion", "alignment", "loss", "optimiser", "other")
OUTSIDE = "outside any op"

# region name -> group (rule 1)
REGIONS = {
    "region: fusion": "fusion",
    "region: alignment": "alignment",
    "region: loss": "loss",
    "region: gradient clipping": "optimiser",
    "region: logged metrics": "other",
}

# name patterns (rule 3), tried in this order
NAME_RULES = [
    ("convolution", re.compile(r"conv3d|conv_transpose|convolution|mkldnn|onednn|cudnn|ConvolutionBackward")),
    ("norm+activation", re.compile(r"instance_norm|batch_norm|group_norm|BatchNormBackward|GroupNormBackward|"
                                   r"leaky_relu|LeakyReluBackward|norm_act")),
    ("fusion", re.compile(r"medmap_fast.*(fuse|fusion|zero_concat|impute)")),
    ("alignment", re.compile(r"medmap_fast.*(anchor|gaussian_kl|moment)")),
    ("optimiser", re.compile(r"^Optimizer\.|_foreach_|_fused_adam")),
]

_BACKWARD = "autograd::engine::evaluate_function: "


def name_group(name: str) -> Optional[str]:
    if name in REGIONS:
        return REGIONS[name]
    for group, pattern in NAME_RULES:
        if pattern.search(name):
            return group
    return None


# ----------------------------------------------------------------------------------------------
# Regions: record_function ranges around the parts an op name cannot tell apart
# ----------------------------------------------------------------------------------------------


def _wrap(fn, label):
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def regions(step: Step):
    """Name the fusion and alignment modules, the loss, gradient clipping and the logged metrics."""
    from medmap_fast.training import frameworks, trainer as trainer_mod

    fw = step.trainer.framework
    handles, open_ranges = [], {}

    def enter(label):
        def hook(module, args):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_ranges.setdefault(id(module), []).append(rf)
        return hook

    def leave(module, args, output):
        open_ranges[id(module)].pop().__exit__(None, None, None)

    modules = [(m, "region: fusion") for m in fw.net.fusion] + [(m, "region: alignment") for m in fw.align.values()]
    for module, label in modules:
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    patches = [(frameworks, "_seg", "region: loss"), (trainer_mod, "hard_dice", "region: logged metrics"),
               (trainer_mod, "modality_gap", "region: logged metrics"),
               (torch.nn.utils, "clip_grad_norm_", "region: gradient clipping")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, label in patches:
            setattr(obj, attr, _wrap(getattr(obj, attr), label))
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------


def _own_time(e, cuda: bool) -> float:
    """Self time of one event in microseconds: CPU, or the device time of the kernels it launched."""
    return e.self_device_time_total if cuda else e.self_cpu_time_total


def _subtree(e):
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        stack.extend(x.cpu_children)


def _inner_group(root, cuda: bool) -> Optional[str]:
    """The group of the named events inside ``root`` holding the most time."""
    totals: Dict[str, float] = {}
    for x in _subtree(root):
        g = name_group(x.name)
        if g is not None:
            totals[g] = totals.get(g, 0.0) + sum(_own_time(y, cuda) for y in _subtree(x))
    return max(totals, key=totals.get) if totals else None


def _label(root, cuda: bool) -> str:
    """How a top-level event is listed: its name (a backward node's without the engine's prefix), and
    for a region or a generic one (e.g. a custom autograd Function) the op inside with the most self time."""
    name = root.name[len(_BACKWARD):] if root.name.startswith(_BACKWARD) else root.name
    if name in REGIONS or name_group(name) is None:
        inner = [x for x in _subtree(root) if "::" in x.name and not x.name.startswith(_BACKWARD)]
        if inner:
            top = max(inner, key=lambda x: _own_time(x, cuda))
            if top.name != name and _own_time(top, cuda) > 0:
                return f"{name} [{top.name}]"
    return name


def group_events(events, cuda: bool = False):
    """(group totals in microseconds, {group: {name: microseconds}} of the top-level events)."""
    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    # autograd sequence number -> group of the forward root that made that node. An op records the number
    # the next node will take, whether or not it makes one; the node is made by the last top-level event
    # to record its number (the counter moves on when the node is made), so later roots overwrite.
    forward_group: Dict[int, str] = {}
    groups: Dict[int, str] = {}
    for root in roots:
        if root.name.startswith(_BACKWARD):
            continue
        g = name_group(root.name) or _inner_group(root, cuda) or "other"
        groups[id(root)] = g
        for x in _subtree(root):
            if x.sequence_nr >= 0:
                forward_group[x.sequence_nr] = g
    for root in roots:
        if not root.name.startswith(_BACKWARD):
            continue
        node = root.name[len(_BACKWARD):]
        seqs = [x.sequence_nr for x in _subtree(root) if x.sequence_nr >= 0]
        g = next((forward_group[s] for s in seqs if s in forward_group), None)
        groups[id(root)] = g or name_group(node) or _inner_group(root, cuda) or "other"
    totals = {g: 0.0 for g in GROUPS}
    by_name: Dict[str, Dict[str, float]] = {g: {} for g in GROUPS}
    for root in roots:
        g = groups[id(root)]
        t = sum(_own_time(x, cuda) for x in _subtree(root))
        totals[g] += t
        by_name[g][_label(root, cuda)] = by_name[g].get(_label(root, cuda), 0.0) + t
    return totals, by_name


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def time_steps(step: Step, n: int) -> List[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step.step()
        times.append(time.perf_counter() - t0)
    return times


def profile_steps(step: Step, n: int, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with regions(step):
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                step.step()
            wall = time.perf_counter() - t0
    return prof, wall


def report(variant: str, prof, wall: float, steps: int, device: torch.device, top: int) -> Dict[str, float]:
    """Print the grouped profile of one variant; returns ms per step by group, and the total."""
    cuda = device.type == "cuda"
    totals, by_name = group_events(prof.events(), cuda)
    wall_ms = wall * 1e3 / steps
    ms = {g: totals[g] / 1e3 / steps for g in GROUPS}
    inside = sum(ms.values())
    ms[OUTSIDE] = max(wall_ms - inside, 0.0) if not cuda else 0.0
    total = wall_ms if not cuda else inside
    what = "device time" if cuda else "CPU time"
    print(f"\n{variant}: {steps} profiled steps, {wall_ms:.1f} ms per step wall-clock under the profiler "
          f"({inside:.1f} ms of it in recorded ops, {what})")
    print(f"  {'group':18s} {'ms/step':>9s} {'share':>7s}   largest top-level ops (ms/step)")
    for g in GROUPS + (OUTSIDE,):
        if g == OUTSIDE and cuda:
            continue
        names = sorted(by_name.get(g, {}).items(), key=lambda kv: -kv[1])[:top]
        detail = ", ".join(f"{n} {t / 1e3 / steps:.1f}" for n, t in names)
        print(f"  {g:18s} {ms[g]:9.1f} {ms[g] / total:7.1%}   {detail}")
    print(f"  {'total':18s} {total:9.1f} {1:7.1%}")
    ms["total"] = total
    return ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    dev_default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--size", type=int, default=None, help="patch side (default: 64 on a CPU, 128 on a GPU)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"samples per step (default {BATCH})")
    p.add_argument("--amp", choices=("fp32", "bf16"), default=None,
                   help="float32, or bfloat16 autocast (default: fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="steps timed, then steps profiled (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="steps before any timing (default 2)")
    p.add_argument("--variant", choices=("fused", "eager", "both"), default="both",
                   help="the variant(s) profiled (default both)")
    p.add_argument("--no-compare", action="store_true",
                   help="do not time the variant that is not profiled")
    p.add_argument("--device", default=dev_default, help=f"cpu or cuda (default {dev_default})")
    p.add_argument("--top", type=int, default=3, help="top-level ops listed per group (default 3)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or (128 if device.type == "cuda" else 64)
    amp = args.amp or ("bf16" if device.type == "cuda" else "fp32")
    profiled = ("eager", "fused") if args.variant == "both" else (args.variant,)
    timed = profiled if args.no_compare else ("eager", "fused")

    print(f"training step profile: SLS framework + MedMAP alignment, {device}, {size}^3, B={args.batch}, {amp}, "
          f"model {model_name(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}, load average {os.getloadavg()[0]:.2f}")
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        steps: Dict[str, Step] = {}
        initial = None
        for variant in timed:
            steps[variant] = Step(variant, device, size, amp, root, initial, batch=args.batch)
            initial = initial or steps[variant].initial_state()
            time_steps(steps[variant], args.warmup)
        times: Dict[str, List[float]] = {v: [] for v in timed}
        for _ in range(args.steps):  # in turns
            for variant in timed:
                times[variant] += time_steps(steps[variant], 1)
        medians = {v: statistics.median(t) for v, t in times.items()}
        for variant in timed:
            print(f"{variant}: {medians[variant] * 1e3:.1f} ms per step (median of {args.steps}, not profiled: "
                  + ", ".join(f"{t * 1e3:.0f}" for t in times[variant]) + ")", flush=True)
        for variant in profiled:
            prof, wall = profile_steps(steps[variant], args.steps, device)
            results[variant] = report(variant, prof, wall, args.steps, device, args.top)
        for step in steps.values():
            step.close()

    print()
    if "eager" in medians and "fused" in medians:
        print(f"fused step / eager step: {medians['fused'] / medians['eager']:.2f} "
              f"(speed-up {medians['eager'] / medians['fused']:.2f}x), unprofiled medians")
    if "eager" in results:
        r = results["eager"]
        s = 1 - r["convolution"] / r["total"]
        print(f"non-convolution share of the eager step: s = {s:.1%} ({r['total'] - r['convolution']:.1f} of "
              f"{r['total']:.1f} ms); best possible speed-up with the convolutions unchanged: "
              f"1/(1-s) = {1 / (1 - s):.2f}x")
        if "fused" in medians:
            ach = medians["eager"] / medians["fused"]
            print(f"the fused step: {ach:.2f}x (unprofiled medians), as if it removed {(1 - 1 / ach) / s:.0%} of the "
                  f"eager step's non-convolution time"
                  + (" (above the bound: within the step-to-step spread of the timed steps above)"
                     if ach > 1 / (1 - s) else ""))
    if "eager" in results and "fused" in results:
        e, f = results["eager"], results["fused"]
        print(f"\nprofiled, ms per step: {'group':18s} {'eager':>8s} {'fused':>8s} {'saved':>8s}")
        for g in GROUPS + (OUTSIDE, "total"):
            if g in e and g in f:
                print(f"                       {g:18s} {e[g]:8.1f} {f[g]:8.1f} {e[g] - f[g]:8.1f}")
    elif "fused" in results and "eager" in medians:
        conv = results["fused"]["convolution"]
        eager_ms = medians["eager"] * 1e3
        print(f"bound estimated from the fused profile's convolution time ({conv:.1f} ms, the same layers as "
              f"eager's) against the unprofiled eager step ({eager_ms:.1f} ms): 1/(1-s) = {eager_ms / conv:.2f}x; "
              f"--variant eager measures it on the eager profile")
    print("\ngroups: " + "; ".join(f"{g}: {pat.pattern}" for g, pat in NAME_RULES)
          + "; regions: " + ", ".join(f"{k[len('region: '):]} -> {v}" for k, v in REGIONS.items())
          + "; backward nodes take their forward op's group")


if __name__ == "__main__":
    main()
