"""What one poll costs with and without a version column, at 1M rows, on DuckDB, SQLite and PostgreSQL.

``python -m benchmarks.poll_version [--rows N] [--changes N] [--repeat N] [--quick]``

Per backend, a ``docs`` table of ``--rows`` rows (1,000,000 by default: ``id`` primary key,
``text``, ``lang``, ``views``, ``updated_at`` timestamp, one second apart) with an index on
``updated_at`` (a version column's index is the user's job; this benchmark creates it),
its snapshot (taken once, shared by both ways of polling), and a full copy of it for the
reference. Then a foreign client makes ``--changes`` changes (100 by default: half inserts,
half updates of existing rows, every one moving ``updated_at`` forward), and each way of
polling is timed round-robin on that same state (``benchmarks.common.interleaved``, medians
of ``--repeat`` calls after one warm-up):

- ``full_diff_poll``: ``IbisPollingListener._poll`` without a version column, exactly what
  the listener thread runs per table: the snapshot diff of the whole table with the changed rows
  and their fingerprints (on DuckDB in the same statement; elsewhere read by id after it), queued;
- ``version_poll``: the same with ``version_columns={"docs": "updated_at"}`` (default overlap of
  1 s): only the rows from the last version seen on are read and compared;
- ``poll_round``: the listener thread's whole round over its watched tables (here ``docs``,
  without a version column), its marks saved as once its packets are committed. Where the
  database counts other connections' commits (SQLite) a table nobody wrote to since its last
  diff is not diffed: idle, this is one ``PRAGMA data_version``;
- ``full_diff_query`` and ``version_query``: the diff statement(s) alone
  (``snapshots.changed``, ``snapshots.poll``), their rows read to the end;
- ``except_reference``: a hand-written full diff that sees every change, like reactive's:
  ``SELECT * FROM docs EXCEPT SELECT * FROM ref_copy`` plus an anti-join for deletes, against
  a full copy of the table.

The queue is drained and the packets released after each poll, so neither the snapshot nor
the version moves and every repetition sees the same changes. Each way is also timed idle
(before the changes). What a version poll costs once its changes are processed, saving the
version reached (one checkpoint upsert), is timed on its own (``save_mark``). With the default
``full_diff_every`` of 60 s and a 1 s poll interval, one poll in 60 is a full diff: the
``amortized`` figure is ``version_poll + full_diff_poll / 60``.

The machine is shared (two cores, other jobs' runs): the figures are noisy; the JSON keeps
every timing and the load average.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sqlite3
import time
from pathlib import Path
from typing import Any

import duckdb

from reactive.backends.base import TableInfo, VersionColumn
from reactive.backends.ibis.backend import IbisBackend
from reactive.backends.ibis.listener import READ_ROWS, IbisPollingListener
from reactive.backends.ibis.snapshots import SnapshotStore
from reactive.queue import CDCQueue

from .common import interleaved, machine_info, machine_markdown, markdown_table, ms, scratch_dir, write_results

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
BASE = _dt.datetime(2024, 1, 1)
FULL_DIFF_EVERY_POLLS = 60

EXCEPT_CHANGED = "SELECT * FROM docs EXCEPT SELECT * FROM ref_copy"
EXCEPT_DELETED = "SELECT c.id FROM ref_copy c WHERE NOT EXISTS (SELECT 1 FROM docs d WHERE d.id = c.id)"


class Client:
    """The foreign client: the engine's own driver, nothing from reactive."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        if kind == "duckdb":
            self.con: Any = duckdb.connect(target)
        elif kind == "sqlite":
            self.con = sqlite3.connect(target, isolation_level=None)
        else:
            import psycopg

            self.con = psycopg.connect(target, autocommit=True)

    def execute(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.kind == "postgres":
            sql = sql.replace("?", "%s")
        cur = self.con.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self.kind == "postgres":
            with self.con.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        elif self.kind == "sqlite":
            self.con.execute("BEGIN")
            self.con.executemany(sql, rows)
            self.con.execute("COMMIT")
        else:
            self.con.executemany(sql, rows)

    def close(self) -> None:
        self.con.close()


def create_docs(client: Client, rows: int) -> None:
    """``docs`` with ``rows`` rows, ``updated_at`` one second apart, its index, and the reference copy."""
    kind = client.kind
    if kind == "duckdb":
        client.execute(
            "CREATE TABLE docs (id BIGINT PRIMARY KEY, text VARCHAR, lang VARCHAR, views INTEGER, updated_at TIMESTAMP)"
        )
        client.execute(
            "INSERT INTO docs SELECT i, 'document number ' || i, CASE WHEN i % 3 = 0 THEN 'de' ELSE 'en' END, "
            "(i * 7) % 1000, TIMESTAMP '2024-01-01' + to_seconds(i) FROM range(?) AS r(i)",
            [rows],
        )
        client.execute("CHECKPOINT")
    elif kind == "sqlite":
        client.execute(
            "CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT, lang TEXT, views INTEGER, updated_at TIMESTAMP)"
        )
        client.executemany(
            "INSERT INTO docs VALUES (?, ?, ?, ?, ?)",
            [(i, f"document number {i}", "de" if i % 3 == 0 else "en", (i * 7) % 1000, stamp(i)) for i in range(rows)],
        )
    else:
        client.execute(
            "CREATE TABLE docs (id BIGINT PRIMARY KEY, text TEXT, lang TEXT, views INTEGER, updated_at TIMESTAMP)"
        )
        client.execute(
            "INSERT INTO docs SELECT i, 'document number ' || i, CASE WHEN i %% 3 = 0 THEN 'de' ELSE 'en' END, "
            "(i * 7) %% 1000, TIMESTAMP '2024-01-01' + i * INTERVAL '1 second' FROM generate_series(0, ? - 1) AS i",
            [rows],
        )
    client.execute("CREATE INDEX docs_updated_at ON docs (updated_at)")
    client.execute("CREATE TABLE ref_copy AS SELECT * FROM docs")
    if kind == "postgres":
        client.execute("VACUUM ANALYZE docs")
        client.execute("VACUUM ANALYZE ref_copy")


def stamp(i: int) -> Any:
    """The ``updated_at`` of row ``i`` as SQLite stores it (ISO text)."""
    return (BASE + _dt.timedelta(seconds=i)).isoformat(sep=" ")


def make_changes(client: Client, rows: int, changes: int) -> None:
    """``changes`` writes that move ``updated_at`` past every existing row: half inserts, half updates."""
    inserts = changes // 2
    updates = changes - inserts
    later = [BASE + _dt.timedelta(seconds=rows + 10 + k) for k in range(changes)]

    def value(k: int) -> Any:
        return later[k].isoformat(sep=" ") if client.kind == "sqlite" else later[k]

    client.executemany(
        "INSERT INTO docs VALUES (?, ?, 'en', 0, ?)",
        [(rows + k, f"new document {k}", value(k)) for k in range(inserts)],
    )
    step = max(1, rows // max(1, updates))
    client.executemany(
        "UPDATE docs SET text = text || ' (edited)', updated_at = ? WHERE id = ?",
        [(value(inserts + k), k * step) for k in range(updates)],
    )
    if client.kind == "postgres":
        client.execute("ANALYZE docs")


class Probe:
    """Both ways of polling ``docs`` over one connection, and the reference."""

    def __init__(self, uri: str, client: Client) -> None:
        self.client = client
        self.backend = IbisBackend.from_uri(uri)
        self.table: TableInfo = self.backend.source.describe("docs")
        self.versioned = SnapshotStore(
            self.backend.conn,
            decoded=self.backend.source.decoded,
            positions=self.backend.checkpoints,
            # No full diff on a timer: the version poll is timed, the full diff separately.
            versions={"docs": VersionColumn("updated_at", full_diff_every=None)},
        )
        self.queue = CDCQueue(max_rows=10**12)
        self.full = IbisPollingListener(self.backend.snapshots, self.queue)
        self.version = IbisPollingListener(self.versioned, self.queue)
        #: A listener watching ``docs`` without a version column (from :meth:`setup` on): its
        #: whole round is timed.
        self.watching = IbisPollingListener(self.backend.snapshots, self.queue)

    def setup(self) -> float:
        """The snapshot, and the version it starts from (read before it is filled); seconds."""
        started = time.perf_counter()
        self.versioned.ensure(self.table)
        seconds = time.perf_counter() - started
        self.watching.watch(self.table)  # after: the snapshot exists, the version it started from is kept
        return seconds

    def close(self) -> None:
        self.backend.close()

    def _drain(self, listener: IbisPollingListener) -> int:
        packets = self.queue.get_batch(max_rows=10**12, timeout=0)
        self.queue.task_done(len(packets))
        listener.release([p.position for p in packets])
        return sum(len(p) for p in packets)

    def full_diff_poll(self) -> int:
        self.full._poll(self.table)
        return self._drain(self.full)

    def version_poll(self) -> int:
        self.version._poll(self.table)
        return self._drain(self.version)

    def poll_round(self) -> int:
        """What the listener thread runs per poll for every watched table (here one): on SQLite
        a table is not diffed again while nobody committed since its last diff."""
        self.watching._poll_all()
        self.watching._save_marks(drained=True)
        return self._drain(self.watching)

    def full_diff_query(self) -> int:
        return sum(len(part.ids) for part in self.backend.snapshots.changed(self.table, READ_ROWS))

    def version_query(self) -> int:
        changes, _ = self.versioned.poll(self.table, READ_ROWS)
        return sum(len(part.ids) for part in changes)

    def except_reference(self) -> int:
        changed = self.client.execute(EXCEPT_CHANGED)
        deleted = self.client.execute(EXCEPT_DELETED)
        return len(changed) + len(deleted)

    def measure(self, repeat: int) -> dict[str, Any]:
        calls = {
            "full_diff_poll": self.full_diff_poll,
            "version_poll": self.version_poll,
            "poll_round": self.poll_round,
            "full_diff_query": self.full_diff_query,
            "version_query": self.version_query,
            "except_reference": self.except_reference,
        }
        timings = interleaved(calls, repeat=repeat)
        figures = {
            name: {"seconds": t["seconds"], "timings": t["timings"], "found": t["result"]}
            for name, t in timings.items()
        }
        figures["amortized"] = {
            "seconds": figures["version_poll"]["seconds"]
            + figures["full_diff_poll"]["seconds"] / FULL_DIFF_EVERY_POLLS,
            "what": f"version_poll + full_diff_poll / {FULL_DIFF_EVERY_POLLS}",
        }
        return figures

    def save_mark(self, repeat: int) -> dict[str, Any]:
        """Saving the version reached (what a poll that found changes costs once they are processed)."""
        _, mark = self.versioned.poll(self.table)
        mark = mark or self.versioned._mark("docs", self.versioned.versions["docs"])
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            self.versioned.save_mark("docs", mark)
            seconds.append(time.perf_counter() - started)
        return {"seconds": sorted(seconds)[len(seconds) // 2], "timings": seconds}


def pg_database() -> str:
    import psycopg

    name = f"bench_version_{int(time.time())}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def drop_pg(target: str) -> None:
    import psycopg

    name = target.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(kind: str, workdir: Path, rows: int, changes: int, repeat: int) -> dict[str, Any]:
    if kind == "postgres":
        target = pg_database()
        uri = target.replace("postgresql://", "postgres://")
    else:
        target = str(workdir / f"docs.{kind}")
        uri = f"{kind}:///{target}"
    client = Client(kind, target)
    try:
        started = time.perf_counter()
        create_docs(client, rows)
        result: dict[str, Any] = {"backend": kind, "rows": rows, "changes": changes}
        result["create_seconds"] = time.perf_counter() - started
        probe = Probe(uri, client)
        try:
            result["snapshot_seconds"] = probe.setup()
            result["idle"] = probe.measure(repeat)
            make_changes(client, rows, changes)
            result["changed"] = probe.measure(repeat)
            result["save_mark"] = probe.save_mark(repeat)
        finally:
            probe.close()
        # On SQLite only a round's first repetition diffs: nobody committed since (see poll_round).
        rounds = () if kind == "sqlite" else ("poll_round",)
        for name in ("full_diff_poll", "version_poll", *rounds, "except_reference"):
            found = result["changed"][name]["found"]
            if found != changes:
                raise RuntimeError(f"{kind}: {name} found {found} changes, not {changes}")
        return result
    finally:
        client.close()
        if kind == "postgres":
            drop_pg(target)


def summary(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for state in ("idle", "changed"):
            s = r[state]
            rows.append(
                [
                    r["backend"],
                    "idle" if state == "idle" else f"{r['changes']} changes",
                    ms(s["full_diff_poll"]["seconds"]),
                    ms(s["version_poll"]["seconds"]),
                    ms(s["version_query"]["seconds"]),
                    ms(s["amortized"]["seconds"]),
                    ms(s["poll_round"]["seconds"]),
                    ms(s["except_reference"]["seconds"]),
                ]
            )
    return markdown_table(
        [
            "backend",
            "state",
            "poll, full diff",
            "poll, version column",
            "its query alone",
            f"amortized (1 full diff in {FULL_DIFF_EVERY_POLLS})",
            "listener's round, no version column",
            "ref: EXCEPT full diff",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", action="append", choices=["duckdb", "sqlite", "postgres"])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 3 repetitions; no JSON written")
    args = parser.parse_args()
    rows, repeat = (100_000, 3) if args.quick else (args.rows, args.repeat)
    machine = machine_info()
    results = []
    with scratch_dir() as workdir:
        for kind in args.only or ["duckdb", "sqlite", "postgres"]:
            results.append(run(kind, workdir, rows, args.changes, repeat))
            r = results[-1]["changed"]
            print(
                f"{kind}: full diff poll {ms(r['full_diff_poll']['seconds'])}, "
                f"version poll {ms(r['version_poll']['seconds'])}, EXCEPT {ms(r['except_reference']['seconds'])}",
                flush=True,
            )
    print(machine_markdown(machine))
    print(summary(results))
    if not args.quick:
        note = "shared 2-core machine: figures are noisy; compare figures of one backend within this run"
        # A run of some backends only does not overwrite the figures of all three.
        name = "poll_version" if not args.only else "poll_version_" + "_".join(sorted(set(args.only)))
        write_results(
            name,
            {
                "machine": machine,
                "load_average_at_end": machine_info()["load_average"],
                "note": note,
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
