"""Structure of the ``compress`` package, measured (issue 23): import circles, imports hidden inside functions,
the longest functions and the largest parameter lists, and the files outside a method's home that name it.

    python scripts/arch_metrics.py            # a readable summary
    python scripts/arch_metrics.py --json     # the same as JSON (docs/results/arch-metrics-*.json)

Import circles are the strongly connected components (more than one module) of the graph of every import,
module-level and inside functions alike: an import moved into a function hides a circle from Python, not from a
reader. A method's *home* is ``compress/methods/<name>.py`` or the package ``compress/methods/<name>/``.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "compress"
# what names a method in code: its registered name (as a string or identifier) and the classes only it uses
METHOD_WORDS = {
    "modegpt": [r"modegpt", r"\bLrcAttention\b", r"apply_attention", r"apply_mlp", r"['\"](qk|vo)['\"]"],
    "cospadi": [r"cospadi", r"\bDictLinear\b", r"['\"]dictionary['\"]"],
    "eora": [r"['\"]eora['\"]", r"\beora_", r"\bCompensatedLinear\b", r"['\"]compensated['\"]"],
    "fwsvd": [r"fwsvd", r"fisher"],
    "asvd": [r"['\"]asvd['\"]"],
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "lm_eval_tasks" not in p.parts}


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, known: dict[str, Path], is_pkg: bool) -> list[str]:
    out = []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    for a in node.names:
        sub = f"{target}.{a.name}"
        if sub in known:
            out.append(sub)
        elif target in known:
            out.append(target)
    return out


def import_graph() -> tuple[dict[str, set[str]], int]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    inside = 0
    for mod, path in known.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if id(node) not in top and not _in_type_checking(tree, node):
                    inside += 1
                graph[mod].update(t for t in _resolve(mod, node, known, path.name == "__init__.py") if t != mod)
    return graph, inside


def _in_type_checking(tree, node) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            if any(x is node for x in ast.walk(n)):
                return True
    return False


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def strong(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out, key=len, reverse=True)


def functions() -> list[dict]:
    rows = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                rows.append({"function": f"{mod}.{node.name}", "lines": node.end_lineno - node.lineno + 1,
                             "params": len(params)})
    return rows


def naming_files() -> dict[str, list[str]]:
    """Per method: the files outside its home whose code names it (METHOD_WORDS)."""
    out = {}
    for method, words in METHOD_WORDS.items():
        pat = re.compile("|".join(words), re.IGNORECASE if method != "eora" else 0)
        home = (f"compress/methods/{method}.py", f"compress/methods/{method}/")
        hits = []
        for path in sorted(PKG.rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith(home) or rel == "compress/methods/__init__.py":
                continue
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            if pat.search(_strip_docstrings(code)):
                hits.append(rel)
        out[method] = hits
    return out


def _strip_docstrings(code: str) -> str:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and \
                    isinstance(first.value.value, str):
                for i in range(first.lineno - 1, first.end_lineno):
                    lines[i] = ""
    return "\n".join(lines)


def measure() -> dict:
    graph, inside = import_graph()
    funcs = functions()
    return {"modules": len(graph), "import_circles": circles(graph), "imports_inside_functions": inside,
            "longest_functions": sorted(funcs, key=lambda r: -r["lines"])[:5],
            "largest_parameter_lists": sorted(funcs, key=lambda r: -r["params"])[:5],
            "files_naming_method_outside_home": naming_files()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"modules: {m['modules']}   imports inside functions: {m['imports_inside_functions']}")
    print(f"import circles: {len(m['import_circles'])}")
    for c in m["import_circles"]:
        print(f"  ({len(c)}) " + " <-> ".join(c))
    print("longest functions:")
    for r in m["longest_functions"]:
        print(f"  {r['lines']:4d} lines  {r['function']}")
    print("largest parameter lists:")
    for r in m["largest_parameter_lists"]:
        print(f"  {r['params']:4d} params {r['function']}")
    print("files outside a method's home that name it:")
    for k, v in m["files_naming_method_outside_home"].items():
        print(f"  {k}: {len(v)}  " + " ".join(x.removeprefix('compress/') for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
