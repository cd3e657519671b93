"""The targets of ``kdray bench scale`` (:mod:`kdray.bench.scale`) and its table: the variants
side by side, each mode's driver slope, the object store's peak at 8N against the bound that
holds at any N, spill, and the growth from N to 8N. Runs in the parent only (a variant may run
another checkout).

The object store's target is a bound that does not depend on N: Ray Data's budget for one
execution (its default share of the store), the limit its backpressure holds each phase's
queues to (a soft one: Ray may pass it by about a task's output), and which kdray's own
budgets (a scorer's records, :func:`kdray.pools.run.store_budget`) keep lower still. The 8N/N
ratio is printed too, but it is no test of growth: a short N run has not filled its queues when
8N has (``kdray bench scale --rows 64000 --factor 2``, docs/benchmarks.md: 177.7 MiB at 64,000
rows, 193.6 MiB at 128,000, both within the 256 MiB budget)."""

from __future__ import annotations

from typing import Any

TARGET_SLOPE_B = 2048
DRIVER_NOISE_B = 8 * 2**20  # runs of one variant differ this much (427.5-435.5 MiB): not a slope


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def print_results(results: list[dict[str, Any]], factor: int) -> set[str]:
    """Print the table and the targets; return the checkouts that missed one."""
    print(f"\n{'checkout':9} {'flow':8} {'mode':6} {'rows':>6} {'driver MiB':>10} {'store MiB':>9} {'spilled':>8} "
          f"{'B/token':>8} {'rows/s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['checkout']:9} {'':8} {r['mode']:6} {r['rows']:>6} failed")
            continue
        print(f"{r['checkout']:9} {r['flow']:8} {r['mode']:6} {r['rows']:>6} {_mb(r['driver_peak_bytes']):>10} "
              f"{_mb(r['store_peak_bytes']):>9} {_mb(r['spilled_bytes']):>8} {r['bytes_per_token']:>8.1f} "
              f"{r['ingest_rows_per_s']:>8.1f}")
    print()
    missed: set[str] = set()
    for label in dict.fromkeys(r["checkout"] for r in results):
        for mode in dict.fromkeys(r["mode"] for r in results):
            pair = [r for r in results if r["checkout"] == label and r["mode"] == mode and "error" not in r]
            if len(pair) != 2:
                continue
            small, large = sorted(pair, key=lambda r: r["rows"])
            grew = large["driver_peak_bytes"] - small["driver_peak_bytes"]
            slope = grew / (large["rows"] - small["rows"]) if grew > DRIVER_NOISE_B else 0.0
            growth = large["store_peak_bytes"] / max(small["store_peak_bytes"], 1)
            bound = large.get("data_budget_bytes")  # an older bench recorded none: no bound to hold
            bounded = bound is None or max(small["store_peak_bytes"], large["store_peak_bytes"]) <= bound
            if slope > TARGET_SLOPE_B or not bounded or large["spilled_bytes"]:
                missed.add(label)
            shown = f"{slope:,.0f} B/row" if slope else f"below the noise ({_mb(grew)} MiB)"
            print(f"{label:9} {mode:6} driver slope {shown} (target <= {TARGET_SLOPE_B}): "
                  f"{'ok' if slope <= TARGET_SLOPE_B else 'MISSED'}; object store peak at N and {factor}N "
                  f"within the bound of any N: {'ok' if bounded else 'MISSED'}; spilled at {factor}N "
                  f"{_mb(large['spilled_bytes'])} MiB: {'ok' if large['spilled_bytes'] == 0 else 'MISSED'}; "
                  f"object store {factor}N/N {growth:.2f}")
            phases = [p["phase"] for p in large.get("phases", []) if "phase_store_peak_bytes" in p]
            if phases:  # where the peak is: each phase's own, at N and 8N
                per = {r["rows"]: {p["phase"]: p["phase_store_peak_bytes"] for p in r.get("phases", [])}
                       for r in (small, large)}
                print(f"{'':9} {mode:6} object store peak per phase, N / {factor}N (MiB): " + "; ".join(
                    f"{name} {_mb(per[small['rows']].get(name, 0))} / {_mb(per[large['rows']][name])}"
                    for name in phases))
            if phases and all("seconds" in p for r in (small, large) for p in r["phases"]):  # older benches: none
                secs = {r["rows"]: {p["phase"]: p["seconds"] for p in r["phases"]} for r in (small, large)}
                print(f"{'':9} {mode:6} seconds per phase, N / {factor}N: " + "; ".join(
                    f"{name} {secs[small['rows']].get(name, 0):.1f} / {secs[large['rows']][name]:.1f}"
                    for name in phases))
            if bound:
                print(f"{'':9} {mode:6} object store peak at {factor}N {_mb(large['store_peak_bytes'])} MiB: "
                      f"{large['store_peak_bytes'] / bound:.0%} of the bound, Ray Data's budget of "
                      f"{_mb(bound)} MiB per execution")
    return missed
