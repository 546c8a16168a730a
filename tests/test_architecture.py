"""The shape of the code, enforced (``docs/architecture.md``): layers, no import circles, flags read only at the top.

Imports are read with ``ast`` from every Python file of the repository (package, commands, benchmarks, tests); nothing
is imported or run.
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

from helpers import REPO

PACKAGE = 'timm_icd'
# what each layer of the package may import (its own modules always); the package root and its __main__ (the commands'
# front door) stand on top of everything
ALLOWED = {
    'base': set(),
    'distill': {'base'},
    'data': {'base'},
    'publish': {'base'},
    'teacher_cache': {'base', 'distill', 'data'},
    'run': {'base', 'distill', 'data', 'publish', 'teacher_cache'},
    'cli': {'base', 'distill', 'data', 'publish', 'teacher_cache', 'run'},
}
# the only modules that read the parsed flags (an argparse namespace): the parser, the run config made from them
# (everything else in run/ reads ``RunConfig``'s fields) and the commands
NAMESPACE_READERS = {'run/flags.py', 'run/config.py'}
MAX_LINES = 400
LONGER = {'run/flags.py': 'the flag table'}


def _files() -> List[Path]:
    roots = [REPO / PACKAGE, REPO / 'benchmarks', REPO / 'tests']
    return sorted([p for root in roots for p in root.rglob('*.py')] + [REPO / 'train_icd.py'])


def _module(path: Path) -> str:
    """Dotted name: timm_icd.x.y for the package, helpers.x for the tests' helpers, the bare file name for scripts
    (benchmarks, tests)."""
    rel = path.relative_to(REPO)
    if rel.parts[:2] == ('tests', 'helpers'):
        return 'helpers' if path.stem == '__init__' else f'helpers.{path.stem}'
    if rel.parts[0] != PACKAGE:
        return path.stem
    parts = list(rel.with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path, modules: Set[str]) -> Dict[str, List[ast.AST]]:
    """The repository modules ``path`` imports, each with the import nodes that do it."""
    tree = ast.parse(path.read_text())
    name = _module(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found: Dict[str, List[ast.AST]] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([node.module] if node.module else []))
            targets = [f'{base}.{alias.name}' for alias in node.names] + [base]
        resolved = set()
        for target in targets:
            while target and target not in modules:  # 'a.b.C' (a name in module a.b) -> 'a.b'
                target = target.rpartition('.')[0]
            if target and target != name:
                resolved.add(target)
        if isinstance(node, ast.ImportFrom) and len(resolved) > 1:  # 'from . import x' names x, not the package
            resolved.discard(base)
        for target in resolved:
            found.setdefault(target, []).append(node)
    return found


@pytest.fixture(scope='module')
def graph() -> Dict[str, Dict[str, List[ast.AST]]]:
    files = _files()
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) for p in files}


def _layer(module: str) -> Optional[str]:
    parts = module.split('.')
    if parts[0] != PACKAGE:
        return 'outside'
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None  # None: the top


def _cycles(graph: Dict[str, Dict[str, list]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_anywhere(graph):
    assert _cycles(graph) == []


def test_layers_import_only_downward(graph):
    wrong = []
    for module, imports in graph.items():
        layer = _layer(module)
        for target in imports:
            target_layer = _layer(target)
            if layer == 'outside' or target_layer == 'outside':
                if layer != 'outside' and target_layer == 'outside':
                    wrong.append(f'{module} -> {target} (the package imports a script)')
                continue
            if layer is None or target_layer == layer:
                continue
            if target_layer is None or target_layer not in ALLOWED[layer]:
                wrong.append(f'{module} ({layer}) -> {target} ({target_layer or "the top"})')
    assert wrong == []


def test_package_imports_at_module_level_only():
    """Inside a function: never a package module; a library only where it is optional or heavy on a cold path, and
    then marked ``# lazy: why``."""
    wrong = []
    for path in (REPO / PACKAGE).rglob('*.py'):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    own = isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or '').startswith(
                        PACKAGE)) or any(a.name.startswith(PACKAGE) for a in getattr(inner, 'names', []))
                    if own or '# lazy:' not in lines[inner.lineno - 1]:
                        wrong.append(f'{path.relative_to(REPO)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}')
    assert wrong == []


def test_parsed_flags_are_read_only_by_the_parser_the_run_config_and_the_commands():
    wrong = []
    for path in (REPO / PACKAGE).rglob('*.py'):
        rel = path.relative_to(REPO / PACKAGE).as_posix()
        if rel in NAMESPACE_READERS or rel.startswith('cli/'):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            reads = (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'args'
                     or isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                     and node.func.id in ('vars', 'getattr') and node.args and isinstance(node.args[0], ast.Name)
                     and node.args[0].id == 'args')
            uses_argparse = isinstance(node, ast.Import) and any(a.name == 'argparse' for a in node.names)
            if reads or uses_argparse:
                wrong.append(f'{rel}:{node.lineno}')
    assert wrong == []


def test_modules_stay_small_and_package_faces_only_hand_on_names():
    long, busy = [], []
    for path in (REPO / PACKAGE).rglob('*.py'):
        rel = path.relative_to(REPO / PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in LONGER:
            long.append(f'{rel}: {lines} lines')
        if path.name == '__init__.py' and path.parent != REPO / PACKAGE:
            body = ast.parse(path.read_text()).body
            busy += [f'{rel}:{n.lineno}' for n in body if not isinstance(n, ast.ImportFrom)]
    assert long == [] and busy == []


def test_the_checks_see_what_they_police(graph):
    """The rules above would pass on an empty graph: make sure it holds the package, with its known edges."""
    assert {'timm_icd.run.train', 'timm_icd.distill.task', 'timm_icd.cli.train', 'study', 'conftest'} <= set(graph)
    assert 'timm_icd.run.build' in graph['timm_icd.run.train']
    assert 'timm_icd.distill.methods' in graph['timm_icd.distill.task']
    assert 'timm_icd.base' in graph['timm_icd.distill.methods']
    assert 'helpers.env' in graph['helpers.launch'] and 'helpers' in graph['conftest']  # the tests' helpers
    fake = {'a': {'b': []}, 'b': {'c': []}, 'c': {'a': []}, 'd': {'a': []}}
    assert _cycles(fake) == [['a', 'b', 'c']]
    assert _layer('timm_icd.run.loop') == 'run' and _layer('timm_icd.__main__') is None and _layer('study') == 'outside'
