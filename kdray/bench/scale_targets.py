"""The targets of ``kdray bench scale`` (:mod:`kdray.bench.scale`) and its table: the variants
side by side, each mode's driver slope, object-store growth from N to 8N, spill, and the 8N
peak against Ray Data's budget. Runs in the parent only (a variant may run another checkout)."""

from __future__ import annotations

from typing import Any

TARGET_SLOPE_B, TARGET_STORE_GROWTH = 2048, 1.5
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
            if slope > TARGET_SLOPE_B or growth > TARGET_STORE_GROWTH or large["spilled_bytes"]:
                missed.add(label)
            shown = f"{slope:,.0f} B/row" if slope else f"below the noise ({_mb(grew)} MiB)"
            print(f"{label:9} {mode:6} driver slope {shown} (target <= {TARGET_SLOPE_B}): "
                  f"{'ok' if slope <= TARGET_SLOPE_B else 'MISSED'}; object store {factor}N/N {growth:.2f} "
                  f"(target <= {TARGET_STORE_GROWTH}): {'ok' if growth <= TARGET_STORE_GROWTH else 'MISSED'}; "
                  f"spilled at {factor}N {_mb(large['spilled_bytes'])} MiB: "
                  f"{'ok' if large['spilled_bytes'] == 0 else 'MISSED'}")
            phases = [p["phase"] for p in large.get("phases", []) if "phase_store_peak_bytes" in p]
            if phases:  # where the peak is: each phase's own, at N and 8N
                per = {r["rows"]: {p["phase"]: p["phase_store_peak_bytes"] for p in r.get("phases", [])}
                       for r in (small, large)}
                print(f"{'':9} {mode:6} object store peak per phase, N / {factor}N (MiB): " + "; ".join(
                    f"{name} {_mb(per[small['rows']].get(name, 0))} / {_mb(per[large['rows']][name])}"
                    for name in phases))
            if large.get("data_budget_bytes"):  # what bounds the peak at any N (an older bench: none)
                print(f"{'':9} {mode:6} object store peak at {factor}N {_mb(large['store_peak_bytes'])} MiB: "
                      f"{large['store_peak_bytes'] / large['data_budget_bytes']:.0%} of Ray Data's budget of "
                      f"{_mb(large['data_budget_bytes'])} MiB per execution")
    return missed
