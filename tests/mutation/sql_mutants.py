"""The SQL mutation campaign: `python -m tests.mutation.sql_mutants [--only ID] [--list] ...`.

1. Copies the repository (tasker_pg/, sql/, tests/, pyproject.toml) into a temporary directory
   per worker job: mutants are applied there only, so a crash never leaves one in the checkout.
2. Starts one embedded PostgreSQL for the campaign (every pytest run below gets it through
   TASKER_TEST_DSN and migrates its own template database from the copy's sql/).
3. Coverage map, once per run (cached in .mutation/coverage.json while sql/ and tests/ are
   unchanged, reused by --only and --resume): the SQL-level tests run with
   `-p tests.mutation.coverage_plugin`, which records
   per test the tasker functions its database called (track_functions = 'all') and those its
   statements named (a call that raises leaves no statistics). Tests that fail without any
   mutant are left out of every selection.
4. Per mutant (see `sqlmut` for the operators and ids): the mutated file is first migrated into
   a scratch database; a failing migrate makes the mutant `invalid`. Else the tests that called
   or named its function, plus those that named a function calling it (transitively) whose
   call raised (a refusal raised inside the mutated helper leaves no statistics for either;
   for an uncounted function, an inlined SQL function or a view: the
   tests of the functions that reference it; outside any function, e.g. the grants file's DO
   block: the tests of the modules naming the file) run with `-x`, fastest first, under a
   timeout. Any failure kills the mutant; a timeout is reported as `timeout` (detected,
   separately); a mutant no test reaches is `survived` with no tests.
Results go to .mutation/sql-results.jsonl (one line per mutant, resumable: `--resume` skips
mutants already there) and the summary to .mutation/sql-summary.json.

The whole SQL set is large; by default at most `--max-per-operator` mutants of each operator
are run, drawn with `--seed` (deterministic), and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.mutation.sqlmut import Mutant, function_spans, generate

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".mutation"
PYTHON = sys.executable
COVERAGE_TARGETS = ["tests/sql", "tests/worker"]
# slow property / crash tests are left out of the coverage map (minutes each)
COVERAGE_DESELECT = "not slow"
COPY_ITEMS = ["tasker_pg", "sql", "tests", "pyproject.toml", "examples", "docs", "README.md"]


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in {"__pycache__", ".pytest_cache", ".hypothesis", "mutants"}}


def make_copy(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for item in COPY_ITEMS:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=_ignore)
        elif src.exists():
            shutil.copy2(src, dest / item)
    return dest


def fingerprint() -> str:
    h = hashlib.sha256()
    for base in ("sql", "tests", "tasker_pg"):
        for p in sorted((ROOT / base).rglob("*")):
            if (
                p.is_file()
                and "__pycache__" not in p.parts
                and "mutation" not in p.parts
                and p.suffix in {".sql", ".py", ".yaml"}
            ):
                h.update(p.relative_to(ROOT).as_posix().encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


# --- the campaign's server ------------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        from tasker_pg.embedded import EmbeddedCluster

        self.home = Path(tempfile.mkdtemp(prefix="tasker-mutation-pg-"))
        self.home.chmod(0o755)
        self.cluster = EmbeddedCluster(self.home, durable=False)
        dsn = self.cluster.start()
        from tests.support.pgserver import with_database

        self.dsn = with_database(dsn, "postgres")
        self._n = 0
        self._lock = threading.Lock()

    def scratch_name(self) -> str:
        with self._lock:
            self._n += 1
            return f"mutation_check_{os.getpid()}_{self._n}"

    def close(self) -> None:
        try:
            self.cluster.destroy()
        except Exception as exc:  # pragma: no cover - best effort
            print(f"warning: could not destroy the campaign cluster: {exc}", file=sys.stderr)


async def _migrate_check(server: Server, sql_root: Path) -> str | None:
    """None when the SQL at sql_root migrates into a fresh database, else the error."""
    import asyncpg

    from tasker_pg import db, migrations
    from tests.support.pgserver import with_database

    name = server.scratch_name()
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        conn = await db.connect(with_database(server.dsn, name), check_schema=False)
        try:
            await migrations.migrate(conn, directory=sql_root)
        finally:
            await conn.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        admin = await asyncpg.connect(server.dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    return None


def _env(server: Server, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TASKER_TEST_DOCKER", None)
    env["TASKER_TEST_DSN"] = server.dsn
    env["HYPOTHESIS_PROFILE"] = "ci"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


# --- coverage -------------------------------------------------------------------------------


def coverage_map(server: Server, copy: Path, refresh: bool) -> dict[str, Any]:
    key = fingerprint()
    cache = OUT / "coverage.json"
    if cache.exists() and not refresh:
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == key:
            print(f"coverage map: cached ({len(data['tests'])} tests, {cache})")
            return dict(data)
    print(f"coverage map: running {' '.join(COVERAGE_TARGETS)} (-m '{COVERAGE_DESELECT}') ...")
    started = time.monotonic()
    raw = Path(tempfile.mkdtemp(prefix="tasker-mutation-cov-")) / "coverage.json"
    cmd = [
        PYTHON,
        "-m",
        "pytest",
        "-p",
        "tests.mutation.coverage_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "-m",
        COVERAGE_DESELECT,
        *COVERAGE_TARGETS,
    ]
    proc = subprocess.run(
        cmd,
        cwd=copy,
        env=_env(server, TASKER_MUTATION_COVERAGE=str(raw)),
        capture_output=True,
        text=True,
    )
    tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
    print(
        f"coverage map: pytest exited {proc.returncode}"
        f" after {time.monotonic() - started:.0f} s: {tail}"
    )
    if not raw.exists():
        raise SystemExit(
            f"the coverage run wrote no map:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    data = json.loads(raw.read_text())
    data["fingerprint"] = key
    data["seconds"] = round(time.monotonic() - started, 1)
    OUT.mkdir(exist_ok=True)
    cache.write_text(json.dumps(data, indent=1, sort_keys=True))
    return dict(data)


def references(root: Path) -> dict[str, set[str]]:
    """For each tasker object defined in sql/functions: the objects whose definition names it."""
    bodies: dict[str, str] = {}
    for path in sorted((root / "sql" / "functions").glob("*.sql")):
        text = path.read_text()
        for start, end, _kind, name in function_spans(text):
            bodies[name] = text[start:end]
    referenced_by: dict[str, set[str]] = defaultdict(set)
    for name in bodies:
        rx = re.compile(r"\b" + re.escape(name) + r"\b")
        for other, body in bodies.items():
            if other != name and rx.search(body.split("\n", 1)[1] if "\n" in body else ""):
                referenced_by[name].add(other)
    return referenced_by


def select_tests(
    function: str | None, cov: dict[str, Any], refs: dict[str, set[str]], file: str = ""
) -> tuple[list[str], str]:
    """The passing tests that reach `function` of `file` (fastest first) and how they were
    found."""
    tests = {k: v for k, v in cov["tests"].items() if v.get("outcome") == "passed"}

    def fastest(found: set[str]) -> list[str]:
        return sorted(found, key=lambda k: (tests[k].get("duration", 1.0), k))

    if function is None:
        # a top-level statement (the grants file's DO block): the tests of the modules that
        # name its file (tests/sql/test_roles.py names 99_grants.sql)
        name = Path(file).name
        if not name:
            return [], "outside any function"
        files = {k.split("::", 1)[0] for k in tests}
        named = {f for f in files if name in (ROOT / f).read_text()}
        return fastest({k for k in tests if k.split("::", 1)[0] in named}), "tests naming its file"

    def direct(f: str) -> set[str]:
        # called: function statistics; named: a statement the test sent names it (a call
        # that raises leaves no statistics, see coverage_plugin)
        return {
            k for k, v in tests.items() if f in v.get("functions", []) or f in v.get("named", [])
        }

    def raised_in(f: str) -> set[str]:
        # named f but no call of it was counted: the call raised, maybe inside `function`
        return {
            k
            for k, v in tests.items()
            if f in v.get("named", []) and f not in v.get("functions", [])
        }

    found = direct(function)
    how = "called or named it"
    if found:
        # a helper that raises (a refusal) leaves no statistics, nor does its caller: the
        # refusal tests of its callers, transitively, which named a caller whose call raised
        seen, todo = {function}, list(refs.get(function, ()))
        while todo:
            f = todo.pop()
            if f not in seen:
                seen.add(f)
                extra = raised_in(f) - found
                if extra:
                    found |= extra
                    how = "called or named it, or named a caller whose call raised"
                todo.extend(refs.get(f, ()))
    if not found:
        # inlined SQL function or a view: the tests of what references it, transitively
        seen, todo = {function}, list(refs.get(function, ()))
        while todo:
            f = todo.pop()
            if f in seen:
                continue
            seen.add(f)
            hits = direct(f)
            if hits:
                found |= hits
            else:
                todo.extend(refs.get(f, ()))
        how = "via its callers"
    if not found:
        # called by tests only (check_invariants, the views): the tests of the modules naming it
        short = function.split(".", 1)[1]
        files = {k.split("::", 1)[0] for k in tests}
        named = {f for f in files if short in (ROOT / f).read_text()}
        found = {k for k in tests if k.split("::", 1)[0] in named}
        how = "tests naming it"
    return fastest(found), how


# --- running mutants ------------------------------------------------------------------------


def run_mutant(
    m: Mutant, copy: Path, server: Server, cov: dict[str, Any], refs: dict[str, set[str]]
) -> dict[str, Any]:
    target = copy / m.file
    original = target.read_text()
    record: dict[str, Any] = {
        "id": m.id,
        "file": m.file,
        "line": m.line,
        "operator": m.operator,
        "function": m.function,
        "diff": m.diff(original),
    }
    started = time.monotonic()
    try:
        target.write_text(m.apply(original))
        error = asyncio.run(_migrate_check(server, copy / "sql"))
        if error is not None:
            record.update(status="invalid", detail=error)
            return record
        tests, how = select_tests(m.function, cov, refs, m.file)
        record["tests"] = len(tests)
        record["selection"] = how
        if not tests:
            record.update(status="survived", detail="no test reaches this function")
            return record
        budget = sum(cov["tests"][t].get("duration", 1.0) for t in tests)
        per_test = max(30, int(5 * max(cov["tests"][t].get("duration", 1.0) for t in tests)))
        limit = 60 + 4 * budget
        cmd = [
            PYTHON,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            "-o",
            f"timeout={per_test}",
            *tests,
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=copy, env=_env(server), capture_output=True, text=True, timeout=limit
            )
        except subprocess.TimeoutExpired:
            record.update(status="timeout", detail=f"no verdict within {limit:.0f} s")
            return record
        out = proc.stdout
        if proc.returncode == 0:
            record.update(status="survived", detail=f"{len(tests)} tests ({how}) passed")
        elif "Timeout" in out and "+++++" in out:
            record.update(status="timeout", detail=f"a test exceeded {per_test} s")
        elif proc.returncode == 1:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
            record.update(status="killed", detail=", ".join(failed[:3]) or "a test failed")
        else:
            record.update(
                status="killed" if proc.returncode in (1, 2) else "error",
                detail=f"pytest exited {proc.returncode}: {out.strip().splitlines()[-1:]!s}",
            )
        return record
    finally:
        target.write_text(original)
        record["seconds"] = round(time.monotonic() - started, 1)


def sample(mutants: list[Mutant], cap: int, seed: int) -> tuple[list[Mutant], dict[str, int]]:
    """At most `cap` mutants per operator, drawn deterministically with `seed`."""
    by_op: dict[str, list[Mutant]] = defaultdict(list)
    for m in mutants:
        by_op[m.operator].append(m)
    chosen: list[Mutant] = []
    dropped: dict[str, int] = {}
    for op, ms in sorted(by_op.items()):
        if cap and len(ms) > cap:
            chosen.extend(random.Random(f"{seed}:{op}").sample(ms, cap))
            dropped[op] = len(ms) - cap
        else:
            chosen.extend(ms)
    order = {m.id: i for i, m in enumerate(mutants)}
    return sorted(chosen, key=lambda m: order[m.id]), dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.mutation.sql_mutants",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ID",
        help="run only this mutant (repeatable); ids as listed by --list",
    )
    ap.add_argument(
        "--list", action="store_true", help="list the mutants (and the sample) and exit"
    )
    ap.add_argument(
        "--max-per-operator",
        type=int,
        default=int(os.environ.get("SQL_MUTANTS_CAP", "5")),
        help="run at most this many mutants per operator, 0 = all (default 5)",
    )
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SQL_MUTANTS_SEED", "17")))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("SQL_MUTANTS_JOBS", "2")))
    ap.add_argument(
        "--resume", action="store_true", help="skip mutants already in the results file"
    )
    ap.add_argument("--refresh-coverage", action="store_true")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="write the summary from the results file of an interrupted run (runs nothing;"
        " selected mutants without a result are reported as not run)",
    )
    args = ap.parse_args(argv)

    all_mutants = generate(ROOT)
    if args.only:
        wanted = set(args.only)
        mutants = [m for m in all_mutants if m.id in wanted]
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            print(f"unknown mutant ids: {sorted(unknown)}", file=sys.stderr)
            return 2
        dropped: dict[str, int] = {}
    else:
        mutants, dropped = sample(all_mutants, args.max_per_operator, args.seed)
    if args.list:
        chosen = {m.id for m in mutants}
        for m in all_mutants:
            print(f"{'*' if m.id in chosen else ' '} {m.id:40} {m.function}")
        print(f"{len(all_mutants)} mutants, {len(mutants)} selected (*)")
        return 0

    OUT.mkdir(exist_ok=True)
    results_path = OUT / "sql-results.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if args.resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            rec = json.loads(line)
            done[rec["id"]] = rec
    elif not (args.only or args.summary_only):
        results_path.write_text("")
    if args.summary_only:
        for line in results_path.read_text().splitlines() if results_path.exists() else []:
            rec = json.loads(line)
            done[rec["id"]] = rec
        missing = [m.id for m in mutants if m.id not in done]
        summary = _summary(all_mutants, mutants, args, dropped, done, {}, None)
        summary["interrupted_not_run"] = missing
        (OUT / "sql-summary.json").write_text(json.dumps(summary, indent=1))
        print(f"summary of {len(summary['results'])} results; not run: {len(missing)}")
        return 0
    todo = [m for m in mutants if m.id not in done]
    print(
        f"SQL mutants: {len(all_mutants)} generated, {len(mutants)} selected"
        f" (cap {args.max_per_operator}/operator, seed {args.seed}), {len(todo)} to run"
    )

    run_started = time.monotonic()
    # a TERM (e.g. a CI or make interrupt) unwinds like Ctrl-C: the cluster and copies are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="tasker-mutation-"))
    server = Server()
    results: dict[str, dict[str, Any]] = dict(done)
    write_lock = threading.Lock()
    try:
        copies = [make_copy(work / f"copy{i}") for i in range(max(1, args.jobs))]
        probe = subprocess.run(
            [PYTHON, "-c", "import tasker_pg, sys; print(tasker_pg.__file__)"],
            cwd=copies[0],
            capture_output=True,
            text=True,
            check=True,
        )
        if not probe.stdout.strip().startswith(str(copies[0])):
            raise SystemExit(f"the copy does not import its own tasker_pg: {probe.stdout}")
        # a full run maps coverage afresh; --only / --resume reuse the map while it is current
        refresh = args.refresh_coverage or not (args.only or args.resume)
        cov = coverage_map(server, copies[0], refresh)
        refs = references(ROOT)
        free = list(copies)
        started = time.monotonic()

        def one(m: Mutant) -> dict[str, Any]:
            with write_lock:
                copy = free.pop()
            try:
                return run_mutant(m, copy, server, cov, refs)
            finally:
                with write_lock:
                    free.append(copy)

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for n, rec in enumerate(pool.map(one, todo), 1):
                results[rec["id"]] = rec
                with write_lock, results_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(
                    f"[{n}/{len(todo)} {time.monotonic() - started:5.0f}s] {rec['status']:8} "
                    f"{rec['id']:38} {rec.get('detail', '')[:90]}",
                    flush=True,
                )
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    summary = _summary(
        all_mutants, mutants, args, dropped, results, cov, round(time.monotonic() - run_started)
    )
    summary_path = OUT / "sql-summary.json"
    if not args.only:
        summary_path.write_text(json.dumps(summary, indent=1))
    elif summary_path.exists():
        # a mutant re-run (after writing the test that kills it) replaces its record in the
        # full run's summary, which lists it as re-run
        full = json.loads(summary_path.read_text())
        fresh = {r["id"]: r for r in summary["results"]}
        full["results"] = [fresh.get(r["id"], r) for r in full["results"]]
        full["rerun"] = sorted(
            set(full.get("rerun", [])) | (fresh.keys() & {r["id"] for r in full["results"]})
        )
        summary_path.write_text(json.dumps(full, indent=1))
    for rec in summary["results"]:
        if args.only:
            print(rec["diff"])
    return 0


def _summary(
    all_mutants: list[Mutant],
    mutants: list[Mutant],
    args: argparse.Namespace,
    dropped: dict[str, int],
    results: dict[str, dict[str, Any]],
    cov: dict[str, Any],
    seconds: int | None,
) -> dict[str, Any]:
    return {
        "generated": len(all_mutants),
        "generated_per_operator": dict(sorted(_count(m.operator for m in all_mutants).items())),
        "generated_per_file": dict(sorted(_count(m.file for m in all_mutants).items())),
        "selected": len(mutants),
        "cap_per_operator": args.max_per_operator,
        "seed": args.seed,
        "not_run_per_operator": dropped,
        "only": args.only,
        "results": [results[m.id] for m in mutants if m.id in results],
        "coverage_tests": len(cov.get("tests", {})),
        "coverage_targets": COVERAGE_TARGETS,
        "coverage_deselect": COVERAGE_DESELECT,
        "coverage_seconds": cov.get("seconds"),
        "seconds": seconds,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


if __name__ == "__main__":
    raise SystemExit(main())
