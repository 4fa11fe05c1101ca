#!/usr/bin/env python
"""Hand-made mutants of a module, each run against the tests that guard it: the kill rate says how much of the
module the tests pin (a mutant is "killed" when a test fails).

    python tools/mutate.py megatron_moca/safe_load.py --tests tests/unit/test_safe_load.py tests/robustness/test_bad_safetensors.py
    python tools/mutate.py megatron_moca/eval/metrics.py --tests tests/unit --max 40 --json out.json

Mutation operators (one small change per mutant, on the module's AST, written back as source):
  compare   < <=  > >=  == !=  in / not in  is / is not  swapped with their neighbour
  arith     + -  * /  // %  swapped;  augmented assignments likewise
  boolean   and / or swapped; `not x` -> x
  constant  an int n -> n + 1 (0 -> 1, 1 -> 2), a float x -> 2x (0.0 -> 1.0), True <-> False
  return    `return x` -> `return None` (functions returning a value)
  call      a call statement on its own line removed (a side effect dropped)
  slice     x[a:b] -> x[a:b-1]-like: the upper bound moved by one
The mutants are applied one at a time to a copy of the repository (never to the working tree), the given
tests run there with -x and a per-mutant timeout (a hang counts as killed); the report lists the survivors
by line so each can be killed by a new test or explained as equivalent. Deterministic: --max samples the
mutants with --seed. After mutmut's operators (boundary, arithmetic, keyword), written small.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mod,
         ast.Mod: ast.FloorDiv}


@dataclass
class Mutant:
    line: int
    kind: str
    description: str
    source: str
    status: str = ""
    seconds: float = 0.0


def _docstring_nodes(tree: ast.AST) -> set:
    """The string constants that are docstrings (never mutated)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _sites(tree: ast.AST):
    """(node path, kind, description, apply(node) -> None) for every place an operator applies."""
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE:
                    yield node, line, "compare", f"{type(op).__name__} -> {COMPARE[type(op)].__name__}", \
                        lambda n, i=i: n.ops.__setitem__(i, COMPARE[type(n.ops[i])]())
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in ARITH:
            yield node, line, "arith", f"{type(node.op).__name__} -> {ARITH[type(node.op)].__name__}", \
                lambda n: setattr(n, "op", ARITH[type(n.op)]())
        elif isinstance(node, ast.BoolOp):
            yield node, line, "boolean", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}", \
                lambda n: setattr(n, "op", ast.Or() if isinstance(n.op, ast.And) else ast.And())
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, line, "boolean", "not x -> x", lambda n: setattr(n, "op", ast.UAdd())
        elif isinstance(node, ast.Constant) and id(node) not in docstrings:
            v = node.value
            if isinstance(v, bool):
                yield node, line, "constant", f"{v} -> {not v}", lambda n: setattr(n, "value", not n.value)
            elif isinstance(v, int):
                yield node, line, "constant", f"{v} -> {v + 1}", lambda n: setattr(n, "value", n.value + 1)
            elif isinstance(v, float):
                yield node, line, "constant", f"{v} -> {v * 2 if v else 1.0}", \
                    lambda n: setattr(n, "value", n.value * 2 if n.value else 1.0)
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, line, "return", "return x -> return None", lambda n: setattr(n, "value", ast.Constant(None))
        elif isinstance(node, ast.Slice) and node.upper is not None:
            yield node, line, "slice", "upper bound - 1", \
                lambda n: setattr(n, "upper", ast.BinOp(n.upper, ast.Sub(), ast.Constant(1)))
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(parent, field, None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and len(body) > 1:
                    yield (parent, field, i), stmt.lineno, "call", \
                        f"drop `{ast.unparse(stmt)[:60]}`", lambda target: None


def mutants(path: str) -> List[Mutant]:
    """Every single-site mutant of the module at `path` (source code of the whole module each)."""
    text = open(path).read()
    count = sum(1 for _ in _sites(ast.parse(text)))
    out = []
    for index in range(count):
        tree = ast.parse(text)
        node, line, kind, description, apply = list(_sites(tree))[index]
        if kind == "call":
            parent, field, i = node
            getattr(parent, field).pop(i)
        else:
            apply(node)
        try:
            source = ast.unparse(ast.fix_missing_locations(tree))
            compile(source, path, "exec")
        except (SyntaxError, ValueError):
            continue
        out.append(Mutant(line, kind, description, source))
    return out


def _copy_repo(into: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = os.path.join(REPO, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(into, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(into, name))


def run_tests(copy: str, tests: List[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if proc.returncode == 0:
        return "survived"
    if proc.returncode in (1, 3):  # test failures or an import error caused by the mutant
        return "killed"
    return f"error (pytest exit {proc.returncode})"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module", help="the module to mutate, e.g. megatron_moca/safe_load.py")
    parser.add_argument("--tests", nargs="+", required=True, help="pytest paths / node ids that guard it")
    parser.add_argument("--max", type=int, default=0, help="at most this many mutants (a seeded sample; 0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every mutant's result here")
    args = parser.parse_args(argv)
    found = mutants(os.path.join(REPO, args.module))
    chosen = found if not args.max or args.max >= len(found) else sorted(
        random.Random(args.seed).sample(found, args.max), key=lambda m: m.line)
    with tempfile.TemporaryDirectory(prefix="moca_mutants_") as copy:
        _copy_repo(copy)
        target = os.path.join(copy, args.module)
        original = open(target).read()
        start = time.time()
        baseline = run_tests(copy, args.tests, timeout=1800)
        if baseline != "survived":
            print(f"the tests fail without any mutant ({baseline}): fix them first", file=sys.stderr)
            return 2
        limit = max(60.0, 3 * (time.time() - start))
        for m in chosen:
            with open(target, "w") as f:
                f.write(m.source)
            t0 = time.time()
            m.status = run_tests(copy, args.tests, limit)
            m.seconds = round(time.time() - t0, 1)
            print(f"{m.status:<17} {args.module}:{m.line:<5} {m.kind:<9} {m.description}", flush=True)
        with open(target, "w") as f:
            f.write(original)
    killed = sum(m.status.startswith("killed") for m in chosen)
    print(f"{args.module}: {killed}/{len(chosen)} mutants killed ({100 * killed / max(len(chosen), 1):.0f}%) "
          f"of {len(found)} possible")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"module": args.module, "tests": args.tests, "possible": len(found), "killed": killed,
                       "mutants": [{k: v for k, v in vars(m).items() if k != "source"} for m in chosen]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
