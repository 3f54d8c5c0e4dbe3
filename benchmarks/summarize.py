"""Speed-up and bandwidth table from pytest-benchmark results.

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-23.json

Also used by benchmarks/conftest.py to print the same table at the end of a run. Results of
test_bench_op_sizes.py (op x size x pass) and of test_bench_training_step.py (a whole training step)
get tables of their own (:func:`size_table`, :func:`step_table`).
"""

import json
import sys


def table(rows, copy_bw):
    """rows: dicts with group, impl (fused/reference/compiled), median (s), bytes and optionally
    peak (bytes allocated at the peak of a forward + backward). Returns lines."""
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["impl"]] = r
    lines = [f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s",
             f"{'group':40s} {'fused ms':>9s} {'ref ms':>9s} {'compile ms':>10s} {'vs ref':>7s} {'vs comp':>7s} "
             f"{'GB/s':>7s} {'of copy':>7s} {'peak MB':>8s} {'vs ref':>7s}"]
    nan = float("nan")
    for group, impls in sorted(groups.items()):
        if "fused" not in impls:
            continue
        fused = impls["fused"]["median"]
        ref = impls.get("reference", {}).get("median", nan)
        comp = impls.get("compiled", {}).get("median", nan)
        bw = impls["fused"]["bytes"] / fused
        peak = impls["fused"].get("peak") or nan
        ref_peak = impls.get("reference", {}).get("peak") or nan
        lines.append(f"{group:40s} {fused * 1e3:9.2f} {ref * 1e3:9.2f} {comp * 1e3:10.2f} {ref / fused:6.1f}x "
                     f"{comp / fused:6.2f}x {bw / 1e9:7.1f} {bw / copy_bw:7.0%} {peak / 2**20:8.1f} "
                     f"{peak / ref_peak:6.2f}x")
    return lines


def size_table(rows):
    """rows: dicts with op, size, pass_, fused and reference (median seconds). Returns lines: ms per call
    and fused / eager (below 1.00 the fused op is faster), ops in the order first seen, sizes ascending."""
    nan = float("nan")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    by_key = {(r["op"], r["size"], r["pass_"]): r for r in rows}
    lines = [f"{'op':28s} {'size':>5s} {'pass':8s} {'fused ms':>10s} {'eager ms':>10s} {'fused/eager':>11s}"]
    for op in ops:
        for size in sorted({r["size"] for r in rows if r["op"] == op}):
            for pass_ in ("fwd", "fwd_bwd"):
                r = by_key.get((op, size, pass_))
                if r is None:
                    continue
                fused, ref = r.get("fused", nan), r.get("reference", nan)
                ratio = fused / ref
                flag = "  slower" if ratio > 1 else ""
                lines.append(f"{op:28s} {size:4d}³ {pass_:8s} {fused * 1e3:10.3f} {ref * 1e3:10.3f} "
                             f"{ratio:11.2f}{flag}")
    return lines


def size_rows(benchmarks):
    """(op, size, pass_, fused, reference) rows from (extra_info, median) pairs of test_bench_op_sizes.py."""
    rows = {}
    for extra, median in benchmarks:
        if "op" not in extra or "size" not in extra:
            continue
        key = (extra["op"], extra["size"], extra["pass_"])
        rows.setdefault(key, dict(op=key[0], size=key[1], pass_=key[2]))[extra["impl"]] = median
    return list(rows.values())


def step_rows(benchmarks):
    """Rows of :func:`step_table` from (group, extra_info, median) triples of test_bench_training_step.py."""
    rows = {}
    for group, extra, median in benchmarks:
        if "step" not in extra:
            continue
        row = rows.setdefault(group, dict(group=group, model=extra.get("model", ""), variants={}))
        row["variants"][extra["impl"]] = dict(median=median, peak=extra.get("peak_bytes"),
                                              state=extra.get("state_bytes"), load=extra.get("load_average"))
    return list(rows.values())


def step_table(rows):
    """Training steps: ms per step, eager and compiled against fused (above 1: fused is faster), the peak
    memory of a step above what it starts with (MB), the weights + AdamW state + batch it starts with
    (fused's, MB), and the highest load average seen at the end of a variant. Returns lines."""
    nan = float("nan")
    lines = [f"{'group':34s} {'fused ms':>9s} {'eager ms':>9s} {'compile ms':>10s} {'eager/fused':>11s} "
             f"{'comp/fused':>10s} {'peak MB: fused':>14s} {'eager':>7s} {'compile':>7s} {'state MB':>8s} {'load':>5s}"]
    for r in sorted(rows, key=lambda r: r["group"]):
        v = r["variants"]
        ms = {k: v[k]["median"] if k in v else nan for k in ("fused", "eager", "compiled")}
        mb = {k: (v[k]["peak"] if k in v and v[k]["peak"] is not None else nan) / 2**20
              for k in ("fused", "eager", "compiled")}
        state = next((x["state"] for x in v.values() if x.get("state") is not None), nan)
        load = max((x["load"] for x in v.values() if x.get("load") is not None), default=nan)
        lines.append(f"{r['group']:34s} {ms['fused'] * 1e3:9.1f} {ms['eager'] * 1e3:9.1f} {ms['compiled'] * 1e3:10.1f} "
                     f"{ms['eager'] / ms['fused']:10.2f}x {ms['compiled'] / ms['fused']:9.2f}x "
                     f"{mb['fused']:14.1f} {mb['eager']:7.1f} {mb['compiled']:7.1f} {state / 2**20:8.1f} {load:5.1f}")
    models = sorted({r["model"] for r in rows if r["model"]})
    if models:
        lines.append("model: " + "; ".join(models))
    return lines


def own_table(extra):
    """Results with a table of their own (per-op sizes, training steps), left out of :func:`table`."""
    return "op" in extra or "step" in extra


def rows_from_json(data):
    return [dict(group=b["group"], impl=b["extra_info"].get("impl", b["name"]), median=b["stats"]["median"],
                 bytes=b["extra_info"].get("bytes", 0), peak=b["extra_info"].get("peak_bytes"))
            for b in data["benchmarks"] if not own_table(b["extra_info"])]


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = data["machine_info"].get("medmap_fast", {})
    print(f"{info.get('device', '?')}: torch {info.get('torch')}, triton {info.get('triton')}, "
          f"{data['machine_info'].get('cpu', {}).get('brand_raw', '')}, {data['datetime']}")
    rows = rows_from_json(data)
    if rows:
        print("\n".join(table(rows, info.get("copy_bandwidth_GBps", float("nan")) * 1e9)))
    sized = size_rows((b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"])
    if sized:
        print("\n".join(size_table(sized)))
    steps = step_rows((b["group"], b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"])
    if steps:
        print("\n".join(step_table(steps)))


if __name__ == "__main__":
    main(sys.argv[1])
