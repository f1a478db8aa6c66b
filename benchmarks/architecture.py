"""The code's shape, counted from a source tree without importing it (issue 35's "before -> after"):
the longest modules and functions, the modules that `defungi train` reaches from the command line and
how often its calls cross layers, the results read as dicts by key outside `results/`, and the README's
lines. Torch-free: it reads the files' syntax trees only, so it runs on any old checkout.

    python benchmarks/architecture.py [--src PATH/src/defungi] [--readme PATH/README.md]

What is counted (everything from the AST; nothing of the tree is imported or run):

- A module's lines: its file's lines. A function's: `def` to its last line, as tests/test_code_shape.py
  counts them (methods and nested functions included).
- Imported by train: the package's modules named by an import (at the top of a module or inside a
  function; `from package import module` names the module), transitively, starting from cli.py's own
  imports and those inside `cli.cmd_train` (parent packages' `__init__` left out).
- Reached by train's calls: the functions and classes reached from `cli.cmd_train` through the calls
  that resolve statically: a name bound to a function or class of the package (by a def or an import,
  re-exports followed), `module.function`, `Class.method`, `self.method()`, `var.method()` where var's
  class is known (a parameter's annotation, or an assignment from a constructor or from a function
  annotated to return it) and `Class(...).method()`, each with the overrides in the package's
  subclasses; calling a class reaches its `__init__`/`__post_init__`. A function, method or lambda
  handed to a call as an argument is reached too: it is called back. Calls on other objects are not
  followed.
- Layers, lowest first: errors, utils, results, stats, layout, config, data, models, train, experiments,
  report, serve, jobs, cli (the order of tests/test_layering.py and ARCHITECTURE.md). A call site of
  a reached function crosses from its module's layer to each other layer its callees live in: down
  (and back up on its return) into a lower layer; "climbs back up" counts the calls from a lower layer
  into a function defined in a higher one: a function or lambda of a higher layer handed directly as
  an argument to a function of a lower layer (which calls it back), or a method call in a lower
  layer that an override in a higher layer answers. experiments -> train and train -> experiments are
  the call sites each way between those two packages.
- Results read by key: the lines of the package's .py files outside results/ that match
  `grep -E '\\["[a-z_]+"\\]'`, per top-level package or module.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = (
    "errors", "utils", "results", "stats", "layout", "config", "data", "models", "train", "experiments", "report",
    "serve", "jobs", "cli",
)  # fmt: skip
ENTRY = ("cli", "cmd_train")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
DEFS = (*FUNCTIONS, ast.ClassDef)
CONSTRUCTORS = ("__new__", "__init__", "__post_init__")
KEY_READ = re.compile(r'\["[a-z_]+"\]')
TOP = 5


@dataclass
class Module:
    """One module of the tree: its dotted name, file and syntax tree."""

    name: str
    path: Path
    text: str
    tree: ast.Module = field(init=False)

    def __post_init__(self) -> None:
        self.tree = ast.parse(self.text)


def read_modules(src: Path) -> dict[str, Module]:
    """Every .py file under src by its dotted name (the package's name is src's)."""
    found = {}
    for path in sorted(src.rglob("*.py")):
        parts = (src.name, *path.relative_to(src).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = Module(name, path, path.read_text())
    return found


def unit(target: str) -> str:
    """A module's (or a def's module's) top-level package or module (the package itself: its name)."""
    parts = target.partition(":")[0].split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def rank(name: str) -> int:
    """A unit's place in LAYERS, lowest first (the package root and anything unknown: the top)."""
    return LAYERS.index(name) if name in LAYERS else len(LAYERS)


def layer(target: str) -> int:
    """A module's (or a def's) unit's place in LAYERS."""
    return rank(unit(target))


# 1. lengths


def line_count(text: str) -> int:
    """Lines as `wc -l` counts them (a last line without a newline counted too)."""
    return len(text.splitlines())


def longest_modules(modules: dict[str, Module], src: Path, top: int = TOP) -> list[tuple[str, int]]:
    """The top longest files: (path under src, lines)."""
    sized = [(str(m.path.relative_to(src)), line_count(m.text)) for m in modules.values()]
    return sorted(sized, key=lambda row: (-row[1], row[0]))[:top]


def functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function under node with its qualified name (Class.method, outer.inner)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, FUNCTIONS):
            yield f"{prefix}{child.name}", child
        if isinstance(child, DEFS):
            yield from functions(child, f"{prefix}{child.name}.")
        else:
            yield from functions(child, prefix)


def longest_functions(modules: dict[str, Module], src: Path, top: int = TOP) -> list[tuple[str, str, int]]:
    """The top longest functions and methods: (name, file:line, lines)."""
    rows = [
        (name, f"{m.path.relative_to(src)}:{f.lineno}", f.end_lineno - f.lineno + 1)
        for m in modules.values()
        for name, f in functions(m.tree)
    ]
    return sorted(rows, key=lambda row: (-row[2], row[1]))[:top]


# 2. what train reaches: imports, then calls


def imported(modules: dict[str, Module], node: ast.AST, here: str) -> set[str]:
    """The package's modules that the imports anywhere under node name (here: the importing module)."""
    found = set()
    for imp in ast.walk(node):
        if isinstance(imp, ast.Import):
            found |= {a.name for a in imp.names}
        elif isinstance(imp, ast.ImportFrom):
            base = absolute(imp, here, modules)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in imp.names}
    return found & set(modules)


def absolute(imp: ast.ImportFrom, here: str, modules: dict[str, Module]) -> str:
    """An ImportFrom's module as a dotted name (relative ones resolved against here)."""
    if not imp.level:
        return imp.module or ""
    package = here if modules[here].path.name == "__init__.py" else here.rpartition(".")[0]
    base = ".".join(package.split(".")[: len(package.split(".")) - imp.level + 1])
    return f"{base}.{imp.module}" if imp.module else base


def top_level_imports(module: Module, modules: dict[str, Module]) -> set[str]:
    """What a module imports outside its functions and classes."""
    found = set()
    for stmt in module.tree.body:
        if not isinstance(stmt, DEFS):
            found |= imported(modules, stmt, module.name)
    return found


def import_closure(modules: dict[str, Module], start: set[str]) -> set[str]:
    """The modules start imports, transitively (imports inside functions included)."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported(modules, modules[name].tree, name)
    return seen


class Index:
    """Names resolved across the package: what a name, an attribute or a call refers to. A target is
    a module's dotted name, or 'module:name' / 'module:Class.method' for a def."""

    def __init__(self, modules: dict[str, Module]) -> None:
        self.modules = modules
        self.defs = {name: {d.name: d for d in m.tree.body if isinstance(d, DEFS)} for name, m in modules.items()}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.bases: dict[str, list[str]] = {}  # empty while it is built: resolve asks it of Class.attr
        self.bases = {
            f"{name}:{c.name}": [b for b in (self.resolve(base, self.namespace(name)) for base in c.bases) if b]
            for name, m in modules.items()
            for c in m.tree.body
            if isinstance(c, ast.ClassDef)
        }

    def node(self, target: str) -> ast.AST | None:
        """The def behind a target (None: a module, or not a def of the package)."""
        module, _, qual = target.partition(":")
        found: ast.AST | None = self.defs.get(module, {}).get(qual.split(".")[0]) if qual else None
        for part in qual.split(".")[1:]:
            found = next((d for d in getattr(found, "body", []) if isinstance(d, DEFS) and d.name == part), None)
        return found

    def is_class(self, target: str | None) -> bool:
        return target is not None and isinstance(self.node(target), ast.ClassDef)

    def is_function(self, target: str) -> bool:
        """A def that runs when called (a property runs when read: not one)."""
        node = self.node(target)
        decorators = [getattr(d, "id", getattr(d, "attr", "")) for d in getattr(node, "decorator_list", [])]
        return isinstance(node, FUNCTIONS) and not {"property", "cached_property"} & set(decorators)

    def attribute(self, module: str, name: str, seen: frozenset[str] = frozenset()) -> str | None:
        """module.name: a submodule, a def of the module, or what the module imported under that name."""
        if f"{module}.{name}" in self.modules:
            return f"{module}.{name}"
        if name in self.defs.get(module, {}):
            return f"{module}:{name}"
        if module in self.modules and module not in seen:
            return self.namespace(module, seen | {module}).get(name)
        return None

    def namespace(self, module: str, seen: frozenset[str] = frozenset()) -> dict[str, str]:
        """A module's names bound at its top: its defs, then what it imports outside its functions."""
        if module not in self.namespaces:
            names = {name: f"{module}:{name}" for name in self.defs[module]}
            for stmt in self.modules[module].tree.body:
                if not isinstance(stmt, DEFS):
                    names |= self.bindings(stmt, module, seen | {module})
            if seen:  # a re-export followed from another module: cache only the finished namespace
                return names
            self.namespaces[module] = names
        return self.namespaces[module]

    def bindings(self, node: ast.AST, module: str, seen: frozenset[str] = frozenset()) -> dict[str, str]:
        """The names that the imports under node bind, resolved to targets in the package."""
        names = {}
        for imp in ast.walk(node):
            if isinstance(imp, ast.Import):
                for a in imp.names:
                    bound = a.name if a.asname else a.name.split(".")[0]
                    if bound in self.modules:
                        names[a.asname or bound] = bound
            elif isinstance(imp, ast.ImportFrom):
                base = absolute(imp, module, self.modules)
                for a in imp.names:
                    target = self.attribute(base, a.name, seen)
                    if target:
                        names[a.asname or a.name] = target
        return names

    def resolve(self, expr: ast.expr, names: dict[str, str]) -> str | None:
        """What a Name or a dotted Attribute chain refers to in the package, if anything."""
        if isinstance(expr, ast.Name):
            return names.get(expr.id)
        if isinstance(expr, ast.Attribute):
            owner = self.resolve(expr.value, names)
            if owner and ":" not in owner:
                return self.attribute(owner, expr.attr)
            if owner and self.is_class(owner):
                return next(iter(self.methods(owner, expr.attr, overrides=False)), None)
        return None

    def annotation(self, expr: ast.expr | None, names: dict[str, str]) -> str | None:
        """The package class an annotation names (X, 'X', X | None, Optional[X])."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            expr = ast.parse(expr.value, mode="eval").body
        if isinstance(expr, ast.BinOp):
            return self.annotation(expr.left, names) or self.annotation(expr.right, names)
        if isinstance(expr, ast.Subscript) and getattr(expr.value, "id", "") == "Optional":
            return self.annotation(expr.slice, names)
        target = self.resolve(expr, names) if isinstance(expr, (ast.Name, ast.Attribute)) else None
        return target if self.is_class(target) else None

    def methods(self, cls: str, name: str, overrides: bool = True) -> list[str]:
        """cls.name: the def it inherits or defines, and (overrides) the package subclasses' own."""
        found = []
        for owner in self.ancestry(cls):
            if isinstance(self.node(f"{owner}.{name}"), FUNCTIONS):
                found.append(f"{owner}.{name}")
                break
        if overrides:
            for sub in self.subclasses(cls):
                if isinstance(self.node(f"{sub}.{name}"), FUNCTIONS):
                    found.append(f"{sub}.{name}")
        return found

    def ancestry(self, cls: str) -> list[str]:
        """cls, then its package bases, depth first."""
        order = [cls]
        for base in self.bases.get(cls, []):
            order += [b for b in self.ancestry(base) if b not in order]
        return order

    def subclasses(self, cls: str) -> list[str]:
        """The package's classes below cls, at any depth."""
        return [c for c in self.bases if c != cls and cls in self.ancestry(c)]


@dataclass
class Call:
    """A call site of a reached function: the defs it may call, and those handed to it as arguments."""

    callees: list[str]
    handed: list[str]


def calls_of(index: Index, target: str) -> list[Call]:
    """The call sites in a def whose callees resolve (calling a class: its constructors)."""
    module, _, qual = target.partition(":")
    node = index.node(target)
    if isinstance(node, ast.ClassDef):
        return [Call([m for c in CONSTRUCTORS for m in index.methods(target, c, overrides=False)], [])]
    assert node is not None
    names = index.namespace(module) | index.bindings(node, module)
    names |= {d.name: target for d in ast.walk(node) if isinstance(d, FUNCTIONS) and d is not node}  # nested defs
    types = local_types(index, node, names, owner=f"{module}:{qual.rpartition('.')[0]}" if "." in qual else None)
    sites = []
    for call in (c for c in ast.walk(node) if isinstance(c, ast.Call)):
        callees = callees_of(index, call.func, names, types)
        handed = [
            h for arg in (*call.args, *(k.value for k in call.keywords)) for h in handed_in(index, arg, names, types)
        ]
        handed = [target if h == "<lambda>" else h for h in handed]
        if callees or handed:
            sites.append(Call(callees, handed))
    return sites


def local_types(index: Index, node: ast.AST, names: dict[str, str], owner: str | None) -> dict[str, str]:
    """Local names whose package class is known: self/cls, annotated parameters, assignments from
    a constructor or from a function annotated to return a package class."""
    types = {}
    if owner and isinstance(node, FUNCTIONS) and node.args.args:
        types[node.args.args[0].arg] = owner
    args = getattr(node, "args", None)
    for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs) if args else ():
        cls = index.annotation(arg.annotation, names)
        if cls:
            types[arg.arg] = cls
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and len(stmt.targets) == 1:
            cls = returned_class(index, stmt.value.func, names)
            if cls and isinstance(stmt.targets[0], ast.Name):
                types[stmt.targets[0].id] = cls
    return types


def returned_class(index: Index, func: ast.expr, names: dict[str, str]) -> str | None:
    """The package class a call gives: a constructor's, or its function's annotated return."""
    target = index.resolve(func, names)
    if target is None or index.is_class(target):
        return target
    node = index.node(target)
    returns = getattr(node, "returns", None)
    return index.annotation(returns, index.namespace(target.partition(":")[0])) if returns is not None else None


def callees_of(index: Index, func: ast.expr, names: dict[str, str], types: dict[str, str]) -> list[str]:
    """The defs a call's function may be: a resolved name, or a method of a receiver of known class."""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in types:
        return index.methods(types[func.value.id], func.attr)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call):  # RunDir(out).config()
        cls = returned_class(index, func.value.func, names)
        return index.methods(cls, func.attr) if cls else []
    target = index.resolve(func, names)
    return [target] if target and ":" in target else []


def handed_in(index: Index, arg: ast.expr, names: dict[str, str], types: dict[str, str]) -> list[str]:
    """The functions an argument hands on to be called back: defs named (not called) and lambdas
    ('<lambda>'), anywhere in the argument's expression (a partial, a list of them)."""
    inner = {id(c.func) for c in ast.walk(arg) if isinstance(c, ast.Call)}  # called here, not handed on
    inner |= {id(a.value) for a in ast.walk(arg) if isinstance(a, ast.Attribute)}  # a part of a dotted name
    found = []
    for node in ast.walk(arg):
        if isinstance(node, ast.Lambda):
            found.append("<lambda>")
        elif isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in inner:
            found += [t for t in callees_of(index, node, names, types) if index.is_function(t)]
    return found


@dataclass
class Walk:
    """What train's calls reach: each reached def's call sites, the call sites between layers, and
    the calls that climb back up: (the def whose call leads there, the lower unit, the def called)."""

    sites: dict[str, list[Call]]
    crossings: Counter[tuple[str, str]]  # (caller's unit, callee's unit) -> call sites
    climbs: list[tuple[str, str, str]]


def walk_calls(index: Index, start: str) -> Walk:
    """Every def reached from start by calls (and functions handed on), with its layer crossings."""
    sites: dict[str, list[Call]] = {}
    todo = [start]
    while todo:
        target = todo.pop()
        if target not in sites and index.node(target) is not None:
            sites[target] = calls_of(index, target)
            todo += [t for call in sites[target] for t in (*call.callees, *call.handed)]
    crossings: Counter[tuple[str, str]] = Counter()
    climbs = []
    for caller, calls in sites.items():
        here = caller.partition(":")[0]
        for call in calls:
            for u in {unit(c) for c in call.callees} - {unit(here)}:
                crossings[unit(here), u] += 1
            ups = {(unit(here), c) for c in call.callees if layer(c) > layer(here)}  # an override above its caller
            ups |= {(unit(c), back) for back in call.handed for c in call.callees if layer(c) < layer(back)}
            for lower, back in sorted(ups):  # a lower callee calls back what a higher caller handed it
                crossings[lower, unit(back)] += lower != unit(here)
                climbs.append((caller, lower, back))
    return Walk(sites, crossings, climbs)


# 3 and 4: keys and the README


def key_reads(modules: dict[str, Module]) -> Counter[str]:
    """Lines reading a dict by a literal key, per unit, outside the results package."""
    counts: Counter[str] = Counter()
    for m in modules.values():
        if unit(m.name) != "results":
            counts[unit(m.name)] += sum(bool(KEY_READ.search(line)) for line in m.text.splitlines())
    return +counts


def commit_of(src: Path) -> str:
    """The tree's commit (`git rev-parse --short HEAD`), or a note that it is not a checkout."""
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"


def table(head: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    """A Markdown table; numbers right-aligned."""
    align = ["---:" if rows and isinstance(rows[0][k], int) else "---" for k in range(len(head))]
    lines = [head, align, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def shown(path: Path) -> str:
    """A path as given from the current folder where it lies under it, else whole."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def short(target: str) -> str:
    """module:def without the package's name."""
    return target.partition(".")[2]


def called_back(caller: str, back: str) -> str:
    """The def called back, or the caller's own lambda or nested def."""
    return f"a lambda or nested def of {short(caller)}" if back == caller else short(back)


def report(src: Path, readme: Path) -> str:
    """Every count of the tree, as Markdown."""
    modules = read_modules(src)
    package = src.name
    cli, entry = f"{package}.{ENTRY[0]}", f"{package}.{ENTRY[0]}:{ENTRY[1]}"
    index = Index(modules)
    entry_node = index.node(entry)
    assert entry_node is not None, f"no {entry} in {src}"
    closure = import_closure(modules, top_level_imports(modules[cli], modules) | imported(modules, entry_node, cli))
    closure.add(cli)
    walk = walk_calls(index, entry)
    reached = Counter(target.partition(":")[0] for target in walk.sites)
    rows = [
        (m.removeprefix(f"{package}."), unit(m), reached[m])
        for m in sorted(closure | set(reached), key=lambda m: (layer(m), m))
    ]
    down = sum(n for (a, b), n in walk.crossings.items() if rank(a) > rank(b))
    keys = key_reads(modules)
    readme_lines = line_count(readme.read_text()) if readme.is_file() else "no README.md"
    return "\n\n".join(
        [
            f"# The code's shape: {shown(src)} (commit {commit_of(src)})",
            "## The longest modules\n\n" + table(("module", "lines"), longest_modules(modules, src)),
            "## The longest functions\n\n" + table(("function", "where", "lines"), longest_functions(modules, src)),
            f"## What `{package} train` reaches from the command line (from `{ENTRY[0]}.{ENTRY[1]}`)\n\n"
            f"- imported, transitively: {len(closure)} modules\n"
            f"- reached by its calls: {len(reached)} modules, {len(walk.sites)} functions and classes\n"
            f"- calls down into a lower layer (each climbs back up on its return): {down}\n"
            f"- calls that climb back up (a lower layer calling a function of a higher one): {len(walk.climbs)}\n"
            f"- experiments -> train: {walk.crossings['experiments', 'train']} calls; "
            f"train -> experiments: {walk.crossings['train', 'experiments']} calls\n\n"
            + table(("module", "layer", "functions reached"), rows),
            "## The calls that climb back up\n\n"
            + table(
                ("in", "hands to (or calls in)", "what is called back"),
                [(short(caller), lower, called_back(caller, back)) for caller, lower, back in walk.climbs],
            ),
            "## Calls between layers\n\n"
            + table(("from", "to", "call sites"), [(a, b, n) for (a, b), n in sorted(walk.crossings.items())]),
            f"## Results read as dicts by key outside results/: {sum(keys.values())} lines\n\n"
            f"Lines matching `{KEY_READ.pattern}` (as `grep -rnE`).\n\n"
            + table(("package", "lines"), sorted(keys.items(), key=lambda kv: (-kv[1], kv[0]))),
            f"## README.md: {readme_lines} lines",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=HERE.parent / "src" / "defungi", help="the package's folder")
    parser.add_argument("--readme", type=Path, help="the README (default: README.md two folders above --src)")
    args = parser.parse_args()
    src = args.src.resolve()
    print(report(src, args.readme or src.parent.parent / "README.md"))


if __name__ == "__main__":
    main()
