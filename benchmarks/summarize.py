"""Speed-up and bandwidth table from pytest-benchmark results.

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-23.json

Also used by benchmarks/conftest.py to print the same table at the end of a run.
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


def rows_from_json(data):
    return [dict(group=b["group"], impl=b["extra_info"].get("impl", b["name"]), median=b["stats"]["median"],
                 bytes=b["extra_info"].get("bytes", 0), peak=b["extra_info"].get("peak_bytes"))
            for b in data["benchmarks"]]


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = data["machine_info"].get("medmap_fast", {})
    print(f"{info.get('device', '?')}: torch {info.get('torch')}, triton {info.get('triton')}, "
          f"{data['machine_info'].get('cpu', {}).get('brand_raw', '')}, {data['datetime']}")
    print("\n".join(table(rows_from_json(data), info.get("copy_bandwidth_GBps", float("nan")) * 1e9)))


if __name__ == "__main__":
    main(sys.argv[1])
