"""Mutation testing of the trust and durability core: do the tests notice a weakened check?

    .venv/bin/python tools/mutate.py [release|spool|outbox|commands|modelstore ...] [--list]

For each target module, every simple mutant is made in turn: a comparison flipped
(``<``/``<=``, ``==``/``!=``, ``in``/``not in``, ``is``/``is not``), a ``raise`` removed, a
call made for its effect dropped (``self.db.execute("ROLLBACK")``, ``spool.requeue...()``), an
integer constant moved by one either way, ``True``/``False`` swapped, a ``not`` dropped,
``extra="forbid"`` made ``"ignore"``, an SQL condition or ``ORDER BY``/``LIMIT`` dropped. The
mutant replaces the module's source file (the package is installed as links to it), the
target's fast tests run, and the file is put back. A mutant the tests pass is a survivor.
Prints a per-module score and every survivor with its line. Slow on purpose (minutes): not
part of ``./dev test``; run it as ``./dev mutate``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# target -> ([(source file, only these top-level names or None for all)], fast tests)
TARGETS: dict[str, tuple[list[tuple[str, set[str] | None]], list[str]]] = {
    "release": (
        [
            ("agent/rollout/release.py", None),
            # The manifest's models (and its canonical encoding) live with the protocol.
            (
                "agent/protocol.py",
                {
                    "InputSpecRef",
                    "VariantSpec",
                    "ShadowSpec",
                    "Manifest",
                    "Decision",
                    "_Input",
                    "_canonical",
                },
            ),
        ],
        ["tests/test_release.py"],
    ),
    "spool": ([("agent/mqtt/spool.py", None)], ["tests/test_spool.py"]),
    "outbox": ([("agent/mqtt/outbox.py", None)], ["tests/test_outbox.py"]),
    "commands": ([("agent/mqtt/commands.py", None)], ["tests/test_commands.py"]),
    "modelstore": ([("agent/rollout/store.py", None)], ["tests/test_modelstore.py"]),
}
FLIPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
# Survivors examined and found harmless: (file, text on the mutated line, mutation) -> why.
# They are listed in every report and left out of the score's denominator. A survivor that
# is not here is a gap in the tests.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("agent/mqtt/spool.py", "max_bytes: int = 64 * 1024 * 1024", "*"): (
        "a default: the agent always passes fleet.spool.max_bytes"
    ),
    ("agent/mqtt/spool.py", "max_age_s: float = 7 * 24 * 3600", "*"): (
        "a default: the agent always passes fleet.spool.max_age_s"
    ),
    ("agent/mqtt/spool.py", "check_same_thread=False", "False -> True"): (
        "one thread uses a Spool (the outbox thread): the check never fires"
    ),
    ("agent/mqtt/spool.py", 'SELECT count(*) FROM outbox")', "*"): (
        "a read probe before quick_check, which finds the same damage"
    ),
    ("agent/mqtt/spool.py", "db.close()", "call dropped: db.close"): (
        "closing a connection that is dropped anyway: no behaviour"
    ),
    ("agent/mqtt/spool.py", "log.error(", "*"): "a log call",
    ("agent/mqtt/spool.py", "[0]", "0 -> -1"): "row[0] and row[-1] are the same one-column row",
    ("agent/mqtt/spool.py", "check[0]", "0 -> -1"): "one-column row",
    ("agent/mqtt/spool.py", "FROM outbox", "SQL 'ORDER BY id' dropped"): (
        "SQLite returns these scans in rowid (id) order with or without it"
    ),
    ("agent/mqtt/spool.py", "oldest[0] < now - self.max_age_s", "Lt -> LtE"): (
        "a pre-check: the DELETE's own `created < ?` decides what goes"
    ),
    ("agent/mqtt/spool.py", "range(0, len(ids), 500)", "*"): "the batch size of a delete",
    ("agent/mqtt/spool.py", "ids[start : start + 500]", "*"): "the batch size of a delete",
    ("agent/mqtt/commands.py", "log.exception(", "*"): "a log call",
    ("agent/mqtt/commands.py", "max(image.shape[:2])", "2 -> 3"): (
        "the third dimension is 3 channels, never the largest for a frame"
    ),
    ("agent/mqtt/commands.py", "if scale < 1:", "Lt -> LtE"): (
        "at scale 1 the resize keeps the same size and pixels"
    ),
    ("agent/rollout/store.py", "log.error(", "*"): "a log call",
    ("agent/rollout/store.py", "json.dumps(body, indent=1)", "*"): "pointer file layout",
    ("agent/rollout/store.py", "path.unlink(missing_ok=True)", "True -> False"): (
        "gc deletes files glob just found; only a concurrent delete could differ"
    ),
}


def equivalent(mutant: Mutant, source_lines: list[str]) -> str | None:
    """Why a survivor is harmless, when it has been examined; else None."""
    text = source_lines[mutant.line - 1] if 0 < mutant.line <= len(source_lines) else ""
    for (path, snippet, what), why in EQUIVALENT.items():
        if path == mutant.path and snippet in text and what in ("*", mutant.what):
            return why
    return None


SQL_CUTS = [
    re.compile(r"\s+AND\s+\w+\s*(?:=|<=|>=|<|>|!=)\s*\?"),
    re.compile(r"\s+ORDER BY\s+\w+(?:\s+(?:ASC|DESC))?", re.IGNORECASE),
    re.compile(r"\s+LIMIT\s+\?", re.IGNORECASE),
]


@dataclass
class Mutant:
    path: str
    line: int
    what: str
    source: str


class _Mutator(ast.NodeTransformer):
    """Applies the ``target``-th mutation opportunity (in walk order) and no other."""

    def __init__(self, target: int, only: set[str] | None = None) -> None:
        self.target = target
        self.only = only
        self.seen = 0
        self.done: tuple[int, str] | None = None

    def visit_Module(self, node: ast.Module) -> ast.AST:
        for child in node.body:
            if self.only is None or getattr(child, "name", None) in self.only:
                self.visit(child)
        return node

    def _hit(self, node: ast.AST, what: str) -> bool:
        hit = self.seen == self.target
        self.seen += 1
        if hit:
            self.done = (getattr(node, "lineno", 0), what)
        return hit

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            flipped = FLIPS.get(type(op))
            if flipped is not None and self._hit(
                node, f"{type(op).__name__} -> {flipped.__name__}"
            ):
                node.ops[i] = flipped()
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Call) and self._hit(node, f"call dropped: {_callee(node)}"):
            return ast.Pass()
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        if self._hit(node, "raise removed"):
            return ast.Pass()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._hit(node, "not dropped"):
            return node.operand
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._hit(node, f"{value} -> {not value}"):
                return ast.Constant(not value)
        elif isinstance(value, int):
            for delta in (1, -1):
                if self._hit(node, f"{value} -> {value + delta}"):
                    return ast.Constant(value + delta)
        elif isinstance(value, str):
            if value == "forbid" and self._hit(node, "forbid -> ignore"):
                return ast.Constant("ignore")
            for cut in SQL_CUTS:
                match = cut.search(value)
                if match and self._hit(node, f"SQL {match.group().strip()!r} dropped"):
                    return ast.Constant(value[: match.start()] + value[match.end() :])
        return node


def _callee(node: ast.Expr) -> str:
    call = node.value
    return ast.unparse(call.func if isinstance(call, ast.Call) else call)[:40]


def _skip_docstrings(tree: ast.Module) -> None:
    """Docstrings are no behaviour: take them out before counting opportunities."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            # Removed, not replaced: `from __future__` must stay the module's first statement.
            body[:1] = [] if len(body) > 1 else [ast.Pass()]


def mutants(path: str, source: str, only: set[str] | None = None) -> Iterator[Mutant]:
    tree = ast.parse(source)
    _skip_docstrings(tree)
    target = 0
    while True:
        mutator = _Mutator(target, only)
        mutated = mutator.visit(copy.deepcopy(tree))
        if mutator.done is None:
            return
        ast.fix_missing_locations(mutated)
        yield Mutant(path, mutator.done[0], mutator.done[1], ast.unparse(mutated))
        target += 1


def _passes(tests: list[str], timeout: float) -> bool:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=REPO, capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False  # a mutant that hangs the tests is noticed
    return proc.returncode == 0


def run(name: str, listing: bool, timeout: float) -> tuple[int, int, list[Mutant]]:
    files, tests = TARGETS[name]
    originals = {path: (REPO / path).read_text() for path, _ in files}
    found = [m for path, only in files for m in mutants(path, originals[path], only)]
    if listing:
        for mutant in found:
            print(f"  {mutant.path}:{mutant.line}: {mutant.what}")
        return len(found), 0, []
    # The harness's own rewrite (ast.unparse, docstrings out) must pass, or every mutant
    # would look killed.
    try:
        for path, _only in files:
            tree = ast.parse(originals[path])
            _skip_docstrings(tree)
            (REPO / path).write_text(ast.unparse(tree))
        baseline = _passes(tests, timeout)
    finally:
        for path, text in originals.items():
            (REPO / path).write_text(text)
    if not baseline:
        raise SystemExit(f"{name}: the tests fail on the unmutated rewrite; fix them first")
    survivors = []
    try:
        for mutant in found:
            (REPO / mutant.path).write_text(mutant.source)
            try:
                if _passes(tests, timeout):
                    survivors.append(mutant)
            finally:
                (REPO / mutant.path).write_text(originals[mutant.path])
    finally:
        for path, text in originals.items():
            (REPO / path).write_text(text)
    return len(found), len(found) - len(survivors), survivors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[])
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test run")
    args = parser.parse_args()
    for name in args.targets or list(TARGETS):
        started = time.monotonic()
        total, killed, survivors = run(name, args.list, args.timeout)
        if args.list:
            print(f"{name}: {total} mutants")
            continue
        lines = {path: (REPO / path).read_text().splitlines() for path, _ in TARGETS[name][0]}
        harmless = [(m, equivalent(m, lines[m.path])) for m in survivors]
        known = [(m, why) for m, why in harmless if why]
        counted = total - len(known)
        score = killed / counted if counted else 1.0
        print(
            f"{name}: {killed}/{counted} killed, score {score:.0%} "
            f"({total} mutants, {len(known)} equivalent; {time.monotonic() - started:.0f} s)"
        )
        for mutant, why in harmless:
            note = f"  (equivalent: {why})" if why else ""
            print(f"  survived {mutant.path}:{mutant.line}: {mutant.what}{note}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
