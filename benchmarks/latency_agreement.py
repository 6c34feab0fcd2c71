"""Do two runs of the evaluate stage agree on every trained model's batch-1 latency?

    python -m benchmarks.latency_agreement RUN_A/results.json RUN_B/results.json [--json out.json]

Reads the deployment tables (`data/evaluation/results.json`, `deployment.models`) of two runs on the same
machine and prints, per model, both latencies with their intervals, their ratio, and whether the intervals
overlap (the two runs agree within their intervals); then how many agree, and whether the machine
reference (a fixed workload timed in the same rounds, `perception.evaluation.deployment.machine_reference`)
agrees: where it does not, the machine itself ran at another speed, and the models' latencies are not
expected to agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.evaluation.results import read_results


def compare(a: Path, b: Path) -> dict:
    first, second = read_results(a).deployment.models, read_results(b).deployment.models
    if set(first) != set(second):
        raise SystemExit(f"the runs timed different models: {sorted(set(first) ^ set(second))}")
    rows = {}
    for name in sorted(first):
        x, y = first[name], second[name]
        rows[name] = {
            "a": [x.latency_ms, x.latency_ms_lo, x.latency_ms_hi],
            "b": [y.latency_ms, y.latency_ms_lo, y.latency_ms_hi],
            "ratio": y.latency_ms / x.latency_ms,
            "agree": max(x.latency_ms_lo, y.latency_ms_lo) <= min(x.latency_ms_hi, y.latency_ms_hi),
        }
    ref_a, ref_b = read_results(a).deployment.reference_ms, read_results(b).deployment.reference_ms
    reference = {
        "a": list(ref_a),
        "b": list(ref_b),
        "ratio": ref_b[0] / ref_a[0],
        "agree": max(ref_a[1], ref_b[1]) <= min(ref_a[2], ref_b[2]),
    }
    agree = sum(r["agree"] for r in rows.values())
    return {"models": rows, "agree": agree, "total": len(rows), "reference": reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = compare(args.a, args.b)
    print(f"{'model':28s} {'run A, ms':>24s} {'run B, ms':>24s}  B/A   agree")
    for name, row in out["models"].items():
        a, b = (f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in (row["a"], row["b"]))
        print(f"{name:28s} {a:>24s} {b:>24s}  {row['ratio']:.2f}  {'yes' if row['agree'] else 'NO'}")
    ref = out["reference"]
    a, b = (f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in (ref["a"], ref["b"]))
    same = "yes" if ref["agree"] else "NO"
    print(f"{'(machine reference)':28s} {a:>24s} {b:>24s}  {ref['ratio']:.2f}  {same}")
    print(f"{out['agree']} of {out['total']} models agree within their intervals")
    if not ref["agree"]:
        print(
            f"the machine reference moved by x{ref['ratio']:.2f}: the two runs ran on a machine of two "
            "speeds (another host, or a busier one), so their latencies compare two machines"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
