"""Run the DuckDB benchmarks: ``python -m benchmarks [--quick] [--only latency|throughput|poll] [--rows N]
[--window-rows N] [--rounds N] [--busy-threads N]``.

Prints Markdown tables (reactive next to a hand-written reference measured in the same run)
and writes every figure as JSON. A full run takes a few minutes; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import sql_duckdb
from .common import busy_python, load_average, machine_info, machine_markdown, markdown_table, ms, rate, slower

RESULTS = Path(__file__).parent / "results"
BENCHMARKS = ("latency", "throughput", "poll")


def latency_markdown(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ours, ref = r["reactive"], r["reference"]
        rows.append(
            [
                f"{r['table_rows']:,}",
                r["inserts"],
                f"{ours['p50_ms']:.1f} ms",
                f"{ours['p99_ms']:.1f} ms",
                f"{ref['p50_ms']:.1f} ms",
                f"{ref['p99_ms']:.1f} ms",
                slower(ours["p50_ms"], ref["p50_ms"]),
                slower(ours["p99_ms"], ref["p99_ms"]),
                f"{ms(ours['mean_poll_cycle_seconds'])} / {ms(ref['mean_poll_cycle_seconds'])}",
            ]
        )
    table = markdown_table(
        [
            "rows in table",
            "inserts",
            "reactive p50",
            "reactive p99",
            "reference p50",
            "reference p99",
            "p50: reactive slower by",
            "p99: reactive slower by",
            "mean poll cycle, reactive / ref",
        ],
        rows,
    )
    missing = sum(r[side]["missing"] for r in results for side in ("reactive", "reference"))
    note = f"\n\n**{missing} inserts never got an output within the timeout.**" if missing else ""
    return (
        f"### Insert-to-output latency, light load (poll interval {sql_duckdb.POLL_INTERVAL * 1000:.0f} ms)\n\n"
        "Single-row inserts by a foreign client, 0.5-1.5 x poll interval apart; latency = output committed - "
        "INSERT returned. Reference: hand-written `WHERE id > last_seen` loop at the same interval "
        "(insert-only: it cannot see updates or deletes). A poll cycle is the time from one poll's start to "
        "the next one's: the interval plus the poll plus (reactive) the processing it waits for.\n\n" + table + note
    )


def throughput_markdown(results: dict[str, Any]) -> str:
    rows = []
    labels = {
        "bulk": "bulk insert, change capture running",
        "backfill": "backfill (`db.add` on a filled table)",
    }
    for key, label in labels.items():
        ours, ref, snap = (results[key][side] for side in ("reactive", "reference", "snapshot"))
        rows.append(
            [
                label,
                f"{ours['rows']:,}",
                f"{rate(ours['rows'], ours['seconds'])} ({ours['seconds']:.2f} s)",
                f"{rate(ref['rows'], ref['seconds'])} ({ref['seconds']:.2f} s)",
                slower(ours["seconds"], ref["seconds"]),
                f"{rate(snap['rows'], snap['seconds'])} ({snap['seconds']:.2f} s)",
                slower(ours["seconds"], snap["seconds"]),
            ]
        )
    table = markdown_table(
        [
            "scenario",
            "rows",
            "reactive",
            "reference",
            "reactive slower by",
            "reference keeping a snapshot",
            "reactive slower by",
        ],
        rows,
    )
    rounds = results.get("rounds", [])
    if rounds:
        ratios = {key: ", ".join(f"{sql_duckdb.throughput_ratio(r[key]):.2f}x" for r in rounds) for key in labels}
        table += (
            f"\n\nThe round of the median ratio of {len(rounds)} interleaved rounds; reactive's speed as a share "
            f"of the reference's in each round: bulk {ratios['bulk']}; backfill {ratios['backfill']}."
        )
    return (
        "### Throughput\n\n"
        "Bulk: one INSERT of all rows, then time until the last output is committed. Reference: the same "
        "hand-written loop (one fetch, one model call, one Arrow insert). Backfill reference: read all, compute, "
        "one Arrow insert. Reference keeping a snapshot: the same by hand, but it also sees updates and deletes "
        "(a full outer join of row hashes with a keyed snapshot, outputs and snapshot upserted in one "
        "transaction; `benchmarks.sql_duckdb.SnapshotLoop`).\n\n" + table
    )


def _found(figure: dict[str, Any], changed: int | None = None) -> str:
    of = f" of {changed:,}" if changed is not None else ""
    return f"{ms(figure['seconds'])} ({figure['found']:,}{of} found)"


def poll_markdown(results: list[dict[str, Any]]) -> str:
    rows = []
    scenarios = (("idle", "idle poll"), ("inserted_1pct", "1% rows inserted"), ("updated_1pct", "1% rows updated"))
    for r in results:
        n = f"{r['rows']:,}"
        setup = r["setup"]
        snapshot, copy = setup["reactive_snapshot"]["seconds"], setup["reference_copy"]["seconds"]
        rows.append(
            [
                n,
                "setup: snapshot / copy",
                ms(snapshot),
                "",
                ms(setup["watermark_max_id"]["seconds"]) + " (`max(id)`)",
                ms(copy) + " (copy table)",
                slower(snapshot, copy),
            ]
        )
        for key, label in scenarios:
            s = r[key]
            changed = s.get("changed")
            if changed is not None:
                label = f"{label} ({changed:,})"
            rows.append(
                [
                    n,
                    label,
                    _found(s["reactive_poll"], changed),
                    ms(s["reactive_diff"]["seconds"]),
                    _found(s["watermark"], changed),
                    _found(s["full_diff"], changed),
                    slower(s["reactive_poll"]["seconds"], s["full_diff"]["seconds"]),
                ]
            )
    table = markdown_table(
        [
            "rows",
            "measurement",
            "reactive poll",
            "its diff query",
            "ref: watermark `id > max`",
            "ref: full diff `EXCEPT` copy",
            "reactive slower than full diff by",
        ],
        rows,
    )
    return (
        "### Poll cost (one poll of a 5-column table; median)\n\n"
        "Reactive poll = full outer join of row fingerprints against the snapshot that streams the changed "
        "rows themselves, queued in packets (`IbisPollingListener._poll`); that statement alone, read to the end, "
        "is `snapshots.changed`. The watermark reference "
        "sees inserts only; the full-diff reference keeps a full copy of the table. All four are timed "
        "round-robin on the same table.\n\n" + table
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this benchmark (may be repeated)")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file to write (default: results/duckdb.json for a full run, results/duckdb-partial.json "
        "with --quick or --only)",
    )
    parser.add_argument("--rows", type=int, help="rows of the throughput runs (default 100,000)")
    parser.add_argument(
        "--window-rows", type=int, help="fixed batch_rows and page_size of the throughput runs (default: growing)"
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds of the throughput runs, reported at the median (default 1)"
    )
    parser.add_argument(
        "--busy-threads",
        type=int,
        help="threads running Python in the process through every benchmark run, reactive's and the references' "
        "(default 0)",
    )
    args = parser.parse_args(argv)
    selected = args.only or list(BENCHMARKS)
    sizes = sql_duckdb.Sizes.quick() if args.quick else sql_duckdb.Sizes()
    if args.rows is not None:
        sizes = dc.replace(sizes, bulk_rows=args.rows, backfill_rows=args.rows)
    if args.window_rows is not None:
        sizes = dc.replace(sizes, window_rows=args.window_rows)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        sizes = dc.replace(sizes, throughput_rounds=args.rounds)
    if args.busy_threads is not None:
        if args.busy_threads < 0:
            parser.error("--busy-threads must be 0 or more")
        sizes = dc.replace(sizes, busy_threads=args.busy_threads)
    partial = args.quick or args.only is not None or args.rows is not None or args.window_rows is not None
    partial = partial or bool(sizes.busy_threads)
    output = args.output or RESULTS / ("duckdb-partial.json" if partial else "duckdb.json")

    machine = machine_info()
    report: dict[str, Any] = {
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"quick": args.quick, "poll_interval": sql_duckdb.POLL_INTERVAL, "sizes": vars(sizes)},
    }
    print(machine_markdown(machine), flush=True)
    started = time.perf_counter()
    runners = {
        "latency": (sql_duckdb.bench_latency, latency_markdown),
        "throughput": (sql_duckdb.bench_throughput, throughput_markdown),
        "poll": (sql_duckdb.bench_poll, poll_markdown),
    }
    for name in BENCHMARKS:
        if name not in selected:
            continue
        bench, render = runners[name]
        print(f"\n<!-- running {name} ... -->", file=sys.stderr, flush=True)
        with busy_python(sizes.busy_threads):
            report[name] = bench(sizes)
        busy = f"\n\nWith {sizes.busy_threads} thread(s) of the process running Python throughout, for every run alike."
        print("\n" + render(report[name]) + (busy if sizes.busy_threads else ""), flush=True)
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = load_average()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=list) + "\n")
    print(f"\nTotal {report['total_seconds']:.0f} s; results written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
