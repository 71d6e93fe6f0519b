"""Mutants of the engine's function files (sql/functions/*.sql).

Only code is mutated: `--` and `/* */` comments, string literals, quoted identifiers and whole
`COMMENT ON ... ;` statements are masked out first. Operators:

- `lt_to_le`, `le_to_lt`, `gt_to_ge`, `ge_to_gt`: comparison swaps (never inside `<>`, `->`,
  `->>`, `=>`, `@>`, `<@`, `#>`, `<<`, `>>`, `||`);
- `del_and`: delete one `AND <condition>` line of a WHERE (or IF / WHEN / ON) condition, up to
  the end of the condition on that line (a `,`, `;`, `THEN`, `LOOP` or a closing parenthesis
  stays);
- `greatest_to_least`, `least_to_greatest`; `true_to_false`, `false_to_true`;
- `del_skip_locked`: `FOR UPDATE SKIP LOCKED` -> `FOR UPDATE`;
- `desc_to_asc`, `asc_to_desc`;
- `int_plus1`, `int_minus1`: an integer constant next to a comparison operator;
- `coalesce_drop`: `coalesce(x, d)` -> `(x)`.

Sites inside a RAISE statement are skipped: there a mutation changes only a message.

A mutant's id is `<file stem>:<line>:<operator>:<n>` (n counts that operator's sites on that
line, from 0): stable while the file is unchanged, so a campaign can be resumed and one mutant
re-run with `--only`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

OPERATORS = (
    "lt_to_le",
    "le_to_lt",
    "gt_to_ge",
    "ge_to_gt",
    "del_and",
    "greatest_to_least",
    "least_to_greatest",
    "true_to_false",
    "false_to_true",
    "del_skip_locked",
    "desc_to_asc",
    "asc_to_desc",
    "int_plus1",
    "int_minus1",
    "coalesce_drop",
)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # path relative to the repository root (sql/functions/NN_x.sql)
    line: int  # 1-based
    operator: str
    function: str | None  # the CREATE FUNCTION / VIEW block the line is in (tasker.<name>)
    start: int  # character offsets of the replaced span in the file's text
    end: int
    replacement: str

    def apply(self, text: str) -> str:
        return text[: self.start] + self.replacement + text[self.end :]

    def diff(self, text: str) -> str:
        mutated = self.apply(text)
        return "".join(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                mutated.splitlines(keepends=True),
                fromfile=f"a/{self.file}",
                tofile=f"b/{self.file}",
                n=1,
            )
        )


# --- masking --------------------------------------------------------------------------------


def code_mask(text: str) -> list[bool]:
    """True for each character of `text` that is SQL code (not comment, string, COMMENT ON)."""
    n = len(text)
    mask = [True] * n
    i = 0
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":
            j = text.find("\n", i)
            j = n if j < 0 else j
            mask[i:j] = [False] * (j - i)
            i = j
        elif c == "/" and nxt == "*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            mask[i:j] = [False] * (j - i)
            i = j
        elif c in "'\"":
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:  # '' or "" escape
                        j += 2
                        continue
                    break
                j += 1
            j = min(j + 1, n)
            mask[i:j] = [False] * (j - i)
            i = j
        else:
            i += 1
    # whole COMMENT ON statements (top level: they start a line)
    for m in re.finditer(r"(?m)^COMMENT ON\b", text):
        j = m.start()
        while j < n and not (text[j] == ";" and mask[j]):
            j += 1
        mask[m.start() : j + 1] = [False] * (j + 1 - m.start())
    return mask


_BLOCK_START = re.compile(
    r"(?mi)^CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|VIEW|PROCEDURE|AGGREGATE)\s+"
    r"(tasker\.\w+)"
)
_TOP_LEVEL = re.compile(r"(?m)^(CREATE|COMMENT|GRANT|REVOKE|ALTER|DROP|DO)\b")


def function_spans(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, name) of each CREATE FUNCTION / VIEW statement of the file."""
    spans = []
    for m in _BLOCK_START.finditer(text):
        # the statement ends where the next top-level statement starts
        nxt = _TOP_LEVEL.search(text, m.end())
        end = nxt.start() if nxt else len(text)
        spans.append((m.start(), end, m.group(1).upper(), m.group(2)))
    return spans


# --- operators ------------------------------------------------------------------------------

_NOT_BEFORE = r"(?<![<>=!@#\-|:~])"
_SIMPLE: dict[str, tuple[str, str]] = {
    "lt_to_le": (_NOT_BEFORE + r"<(?![<>=@\-])", "<="),
    "le_to_lt": (_NOT_BEFORE + r"<=(?![=>])", "<"),
    "gt_to_ge": (_NOT_BEFORE + r">(?![>=])", ">="),
    "ge_to_gt": (_NOT_BEFORE + r">=(?![=>])", ">"),
    "greatest_to_least": (r"(?i)\bgreatest(?=\s*\()", "least"),
    "least_to_greatest": (r"(?i)\bleast(?=\s*\()", "greatest"),
    "true_to_false": (r"(?i)\btrue\b", "false"),
    "false_to_true": (r"(?i)\bfalse\b", "true"),
    "del_skip_locked": (r"(?i)\s+SKIP\s+LOCKED\b", ""),
    "desc_to_asc": (r"(?i)\bDESC\b", "ASC"),
    "asc_to_desc": (r"(?i)\bASC\b", "DESC"),
}
_COMPARISON = r"(?:<=|>=|<>|!=|(?<![:<>!=])=(?![>=])|(?<![<\-=>])<(?![<>=@])|(?<![\-=<>])>(?![>=]))"
_INT_AFTER = re.compile(_COMPARISON + r"\s*(?P<int>-?\d+)\b(?![.\d:])")
_INT_BEFORE = re.compile(r"(?<![\w.:$])(?P<int>\d+)\s*" + _COMPARISON)
# `=` is a comparison only in a condition, not in SET x = 1 or DEFAULT
_CONDITION_WORDS = re.compile(r"(?i)\b(WHERE|AND|OR|WHEN|IF|ON|CHECK|ELSIF|WHILE|CASE|NOT)\b")
_STOP_WORDS = re.compile(r"(?i)\b(THEN|LOOP)\b")


def _all_code(mask: list[bool], start: int, end: int) -> bool:
    return all(mask[start:end])


def _line_of(line_starts: list[int], pos: int) -> int:
    lo, hi = 0, len(line_starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if line_starts[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo + 1


def _sites(text: str, mask: list[bool]) -> list[tuple[str, int, int, str]]:
    """(operator, start, end, replacement) of every mutation site in `text`."""
    sites: list[tuple[str, int, int, str]] = []
    for op, (pattern, repl) in _SIMPLE.items():
        for m in re.finditer(pattern, text):
            if _all_code(mask, m.start(), m.end()):
                sites.append((op, m.start(), m.end(), repl))
    # integer constants in comparisons
    seen: set[int] = set()
    for rx in (_INT_AFTER, _INT_BEFORE):
        for m in rx.finditer(text):
            s, e = m.span("int")
            if s in seen or not _all_code(mask, m.start(), m.end()):
                continue
            op_text = text[m.start() : m.end()]
            if "=" in op_text and not any(x in op_text for x in ("<", ">", "!")):
                line_start = text.rfind("\n", 0, m.start()) + 1
                before = "".join(
                    ch
                    for ch, ok in zip(
                        text[line_start : m.start()], mask[line_start : m.start()], strict=True
                    )
                    if ok
                )
                if not _CONDITION_WORDS.search(before):
                    continue
            seen.add(s)
            value = int(text[s:e])
            sites.append(("int_plus1", s, e, str(value + 1)))
            sites.append(("int_minus1", s, e, str(value - 1)))
    # coalesce(x, d) -> (x)
    for m in re.finditer(r"(?i)\bcoalesce\s*\(", text):
        if not _all_code(mask, m.start(), m.end()):
            continue
        depth, j, comma = 1, m.end(), -1
        while j < len(text) and depth > 0:
            ch = text[j]
            if mask[j]:
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch == "," and depth == 1 and comma < 0:
                    comma = j
            j += 1
        if depth == 0 and comma > 0:
            sites.append(("coalesce_drop", m.start(), j, "(" + text[m.end() : comma].strip() + ")"))
    # delete one `AND <condition>` line
    for m in re.finditer(r"(?m)^[ \t]*(AND)\b", text):
        s = m.start(1)
        if not mask[s]:
            continue
        depth, j = 0, s + 3
        while j < len(text) and text[j] != "\n":
            ch = text[j]
            if mask[j]:
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth < 0:
                        break
                elif (ch in ",;" and depth == 0) or (
                    depth == 0 and _STOP_WORDS.match(text, j) and text[j - 1] in " \t"
                ):
                    break
            j += 1
        if depth > 0:
            continue  # the condition goes on past this line
        # keep a trailing comment of the line; drop the condition's trailing blanks
        end = j
        while end > s and text[end - 1] in " \t":
            end -= 1
        if not any(mask[s + 3 : end]) or not text[s + 3 : end].strip():
            continue
        if j < len(text) and text[j] == "\n" and not any(mask[end:j]):
            # the condition is the whole line (bar a comment): delete the line
            line_start = text.rfind("\n", 0, s) + 1
            sites.append(("del_and", line_start, j + 1, ""))
            continue
        sites.append(("del_and", s, end, ""))
    return sites


def _in_raise(text: str, mask: list[bool], pos: int) -> bool:
    """Whether `pos` is inside a RAISE statement (its message arguments change only a message)."""
    j = pos - 1
    while j >= 0 and not (text[j] == ";" and mask[j]):
        j -= 1
    stmt = "".join(ch for ch, ok in zip(text[j + 1 : pos], mask[j + 1 : pos], strict=True) if ok)
    return re.search(r"(?i)\bRAISE\b", stmt) is not None


def generate(root: Path) -> list[Mutant]:
    """Every mutant of root/sql/functions/*.sql, in file and position order."""
    mutants: list[Mutant] = []
    for path in sorted((root / "sql" / "functions").glob("*.sql")):
        text = path.read_text()
        mask = code_mask(text)
        spans = function_spans(text)
        line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        counters: dict[tuple[int, str], int] = {}
        for op, start, end, repl in sorted(_sites(text, mask), key=lambda x: (x[1], x[0])):
            if _in_raise(text, mask, start):
                continue
            func = next((name for s, e, _k, name in spans if s <= start < e), None)
            line = _line_of(line_starts, start)
            key = (line, op)
            n = counters.get(key, 0)
            counters[key] = n + 1
            rel = path.relative_to(root).as_posix()
            mutants.append(
                Mutant(
                    id=f"{path.stem}:{line}:{op}:{n}",
                    file=rel,
                    line=line,
                    operator=op,
                    function=func,
                    start=start,
                    end=end,
                    replacement=repl,
                )
            )
    return mutants


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.mutation.sqlmut apply ID`: writes mutant ID into the checkout's function
    file (to see a test fail with it: run the test, then `git checkout sql/functions`);
    `python -m tests.mutation.sqlmut show ID`: prints its diff."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.mutation.sqlmut")
    ap.add_argument("action", choices=["apply", "show"])
    ap.add_argument("id")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    found = [m for m in generate(root) if m.id == args.id]
    if not found:
        print(f"no mutant {args.id}", flush=True)
        return 2
    m = found[0]
    path = root / m.file
    text = path.read_text()
    print(m.diff(text), end="")
    if args.action == "apply":
        path.write_text(m.apply(text))
        print(f"applied to {m.file}; undo with: git checkout {m.file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
