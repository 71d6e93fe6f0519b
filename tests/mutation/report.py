"""The score table of a mutation campaign: `python -m tests.mutation.report`.

Reads .mutation/sql-summary.json (written by `tests.mutation.sql_mutants`) and mutmut's results
(`mutmut results --all true`, run in the checkout after `mutmut run`), prints per file the
mutants generated / killed / survived / invalid / timed out and every survivor with its id and
diff, and writes the same to .mutation/report.md.

The score is (killed + timeout) / (generated - invalid - not run).

Survivors are explained by tests/mutation/equivalent.toml (see its header): each survivor an
entry matches is listed under that entry's reason; the rest are listed as unexplained, with
their diffs, and counted in the "survived: N, explained as equivalent: M, unexplained: K" line
of each part.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".mutation"
COLUMNS = ("generated", "killed", "survived", "invalid", "timeout", "other")
EQUIVALENT = Path(__file__).with_name("equivalent.toml")


def load_explanations(part: str) -> list[dict[str, Any]]:
    """The [[python]] or [[sql]] entries of equivalent.toml."""
    if not EQUIVALENT.exists():
        return []
    return list(tomllib.loads(EQUIVALENT.read_text()).get(part, []))


def explain(name: str, diff: str, entries: list[dict[str, Any]]) -> str | None:
    """The reason of the first entry matching survivor `name` (with `diff`), else None.

    An entry matches when every condition it has holds: `mutants` (fnmatch patterns on the
    name), `changed` (a regex found in the mutated lines, the diff's + lines), `text_only`
    (the mutant only changes a string literal's case or wraps it in XX).
    """
    plus = "\n".join(ln[1:] for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+")
    for e in entries:
        if "mutants" in e and not any(fnmatch.fnmatchcase(name, p) for p in e["mutants"]):
            continue
        if "changed" in e and not re.search(e["changed"], plus):
            continue
        if e.get("text_only") and not _only_text_changed(diff):
            continue
        return str(e["reason"])
    return None


def _explained_lines(
    title: str, survivors: int, by_reason: dict[str, list[str]], unexplained: int
) -> list[str]:
    explained = sum(len(v) for v in by_reason.values())
    lines = [
        f"{title}: survived: {survivors}, explained as equivalent: {explained},"
        f" unexplained: {unexplained}",
        "",
    ]
    for reason, names in by_reason.items():
        lines += [f"- {reason} ({len(names)}): " + ", ".join(f"`{n}`" for n in names), ""]
    return lines


def _row(counts: dict[str, int]) -> str:
    detected = counts["killed"] + counts["timeout"]
    judged = detected + counts["survived"]
    score = f"{100 * detected / judged:5.1f}%" if judged else "   - "
    return " | ".join(f"{counts[c]:>9}" for c in COLUMNS) + f" | {score}"


def _table(title: str, per_file: dict[str, dict[str, int]]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| file | " + " | ".join(COLUMNS) + " | score |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    total: dict[str, int] = defaultdict(int)
    for f in sorted(per_file):
        lines.append(f"| {f} | {_row(defaultdict(int, per_file[f]))} |")
        for k, v in per_file[f].items():
            total[k] += v
    lines.append(f"| **total** | {_row(total)} |")
    return [*lines, ""]


def sql_section() -> tuple[list[str], dict[str, int]]:
    path = OUT / "sql-summary.json"
    if not path.exists():
        return ["### SQL mutants", "", "(no SQL campaign results: run `make mutate`)", ""], {}
    s = json.loads(path.read_text())
    per_file: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for rec in s["results"]:
        status = rec["status"] if rec["status"] in COLUMNS else "other"
        per_file[rec["file"]]["generated"] += 1
        per_file[rec["file"]][status] += 1
    lines = [
        f"SQL: {s['generated']} mutants generated from sql/functions/*.sql; "
        + (
            f"{s['selected']} run: at most {s['cap_per_operator']} per operator, drawn with seed "
            f"{s['seed']} (not run, per operator: {s['not_run_per_operator'] or 'none'})."
            if s["cap_per_operator"]
            else f"all {s['selected']} run."
        ),
        f"Took {s.get('seconds', '?')} s (the coverage map {s.get('coverage_seconds', '?')} s)."
        f" Tests per mutant: those of {', '.join(s['coverage_targets'])}"
        f" (-m '{s['coverage_deselect']}')"
        " that called the mutant's function, fastest first, with -x.",
        "",
        *_table("SQL mutants (per file: the ones run)", per_file),
    ]
    if s.get("rerun"):
        lines += [
            f"Re-run after the full run (`--only`, each with the tests that reach it then):"
            f" {len(s['rerun'])}: " + ", ".join(f"`{i}`" for i in s["rerun"]),
            "",
        ]
    if s.get("interrupted_not_run"):
        lines += [
            f"The run was stopped early: {len(s['interrupted_not_run'])} selected mutants were"
            " not run: " + ", ".join(f"`{i}`" for i in s["interrupted_not_run"]),
            "",
        ]
    survivors = [r for r in s["results"] if r["status"] == "survived"]
    invalid = [r for r in s["results"] if r["status"] == "invalid"]
    entries = load_explanations("sql")
    by_reason: dict[str, list[str]] = defaultdict(list)
    unexplained = []
    for r in survivors:
        reason = explain(r["id"], r["diff"], entries)
        if reason is None:
            unexplained.append(r)
        else:
            by_reason[reason].append(r["id"])
    lines += _explained_lines("SQL", len(survivors), by_reason, len(unexplained))
    lines += [f"#### SQL survivors unexplained ({len(unexplained)})", ""]
    for r in unexplained:
        lines += [
            f"- `{r['id']}` in {r['function']} ({r.get('detail', '')}); re-run:"
            f" `python -m tests.mutation.sql_mutants --only {r['id']}`",
            "",
            "```diff",
            r["diff"].rstrip(),
            "```",
            "",
        ]
    if invalid:
        lines += [f"#### SQL mutants that do not migrate (invalid, {len(invalid)})", ""]
        lines += [f"- `{r['id']}`: {r.get('detail', '')}" for r in invalid]
        lines.append("")
    totals: dict[str, int] = defaultdict(int)
    for counts in per_file.values():
        for k, v in counts.items():
            totals[k] += v
    totals["unexplained"] = len(unexplained)
    return lines, dict(totals)


def _mutmut(*args: str) -> str:
    mutmut = Path(sys.executable).parent / "mutmut"
    proc = subprocess.run([str(mutmut), *args], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout


def _read(path: Path, default: str) -> str:
    return path.read_text().strip() if path.exists() else default


def _diff(name: str) -> str:
    try:  # in-process: `mutmut show` per survivor costs a second each
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return str(get_diff_for_mutant(name)).rstrip()
    except Exception:
        return _mutmut("show", name).split("\n", 1)[-1].rstrip()


def _changed(diff: str) -> str:
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+"]
    return " / ".join(plus)[:160]


def _only_text_changed(diff: str) -> bool:
    """Whether the mutant only changes a string literal's case or wraps it in XX."""
    old = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and ln[1:2] != "-"]
    new = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and ln[1:2] != "+"]
    if not old or len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        strings_a = re.findall(r"\"[^\"]*\"|'[^']*'", a)
        strings_b = re.findall(r"\"[^\"]*\"|'[^']*'", b)
        if not strings_a or len(strings_a) != len(strings_b):
            return False
        if re.sub(r"\"[^\"]*\"|'[^']*'", "S", a) != re.sub(r"\"[^\"]*\"|'[^']*'", "S", b):
            return False
        for x, y in zip(strings_a, strings_b, strict=True):
            if x != y and x.lower() != y.replace("XX", "").lower():
                return False
    return True


def python_section() -> tuple[list[str], dict[str, int]]:
    if not (ROOT / "mutants").is_dir():
        return ["### Python mutants (mutmut)", "", "(no mutmut results: run `make mutate`)", ""], {}
    out = _mutmut("results", "--all", "true")
    per_file: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    survivors: list[str] = []
    mapping = {
        "killed": "killed",
        "survived": "survived",
        "timeout": "timeout",
        "no tests": "survived",
        "suspicious": "timeout",
        "caught by type check": "killed",
    }
    for line in out.splitlines():
        m = re.match(r"\s+([\w.]+__mutmut_\d+): (.+)$", line)
        if not m:
            continue
        name, status = m.groups()
        module = re.sub(r"\.x[_ǁ].*$", "", name)
        file = module.replace(".", "/") + ".py"
        per_file[file]["generated"] += 1
        per_file[file][mapping.get(status, "other")] += 1
        if mapping.get(status) == "survived":
            survivors.append(f"{name} ({status})" if status != "survived" else name)
    lines = [
        "Python: mutmut on the Python core ([tool.mutmut] in pyproject.toml), each mutant"
        " against the unit tests (tests/unit) that reach the mutated function; took "
        + _read(OUT / "mutmut-seconds", "?")
        + " s.",
        "",
        *_table("Python mutants (mutmut)", per_file),
    ]
    entries = load_explanations("python")
    by_reason: dict[str, list[str]] = defaultdict(list)
    unexplained: list[tuple[str, str]] = []
    for s in survivors:
        name = s.split(" ", 1)[0]
        diff = _diff(name)
        reason = explain(name, diff, entries)
        if reason is None:
            unexplained.append((s, diff))
        else:
            by_reason[reason].append(name.rsplit(".", 1)[-1])
    lines += _explained_lines("Python", len(survivors), by_reason, len(unexplained))
    lines += [
        f"#### Python survivors unexplained ({len(unexplained)}); `mutmut show NAME` prints a"
        " diff, `mutmut run NAME` re-runs one",
        "",
    ]
    for s, diff in unexplained:
        lines += [f"- `{s}`", "", "```diff", diff, "```", ""]
    totals: dict[str, int] = defaultdict(int)
    for counts in per_file.values():
        for k, v in counts.items():
            totals[k] += v
    totals["unexplained"] = len(unexplained)
    return lines, dict(totals)


def main() -> int:
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ from the working directory
    sql_lines, sql_totals = sql_section()
    py_lines, py_totals = python_section()
    overall: dict[str, int] = defaultdict(int)
    for t in (sql_totals, py_totals):
        for k, v in t.items():
            overall[k] += v
    summary = _table(
        "Overall",
        {
            "SQL (sql/functions)": defaultdict(int, sql_totals),
            "Python (tasker_pg core)": defaultdict(int, py_totals),
        },
    )
    summary.insert(
        -1,
        f"Survivors unexplained (not in tests/mutation/equivalent.toml): SQL"
        f" {sql_totals.get('unexplained', '-')}, Python {py_totals.get('unexplained', '-')}.\n",
    )
    legend = [
        "score = (killed + timeout) / (killed + timeout + survived); `other`: mutmut's"
        " not checked / skipped / segfault; `invalid`: the mutated SQL does not migrate.",
        "",
    ]
    text = "\n".join(["# Mutation campaign report", "", *summary, *legend, *sql_lines, *py_lines])
    OUT.mkdir(exist_ok=True)
    (OUT / "report.md").write_text(text + "\n")
    # the console gets the tables and the SQL survivors; the Python diffs are in the file
    console = [ln for ln in text.splitlines()]
    cut = next((i for i, ln in enumerate(console) if ln.startswith("#### Python survivors")), None)
    if cut is not None:
        console = console[: cut + 1] + ["  " + ln for ln in py_lines if ln.startswith("- `")]
    print("\n".join(console))
    print(f"\nreport written to {OUT / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
