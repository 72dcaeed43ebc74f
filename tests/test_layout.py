"""The house's rooms and the one-way arrows between them, read from the source: every import, lazy ones too.

::

    nextoken/  the umbrella (cli, up, retrain, registry, evaluate, runs): composes, may import anything
      export/  imports train/; never serve/ nor the umbrella
      serve/   imports from export/ only the artifact contract (artifact, runtime); never train/ nor the umbrella
      train/   imports no other stage: never export/, serve/ nor the umbrella
    serve/engine/ and serve/http/ never import each other; both may use the serve leaves (wire, config, metrics,
    tokens), which import neither

Shared leaves any module may import: ``nextoken`` itself (``__version__``), ``nextoken.errors`` and
``nextoken.fileio``; they import nothing of nextoken's. And one screen per idea: no module over
400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"nextoken": "nextoken", "train": "nextoken.train", "export": "nextoken.export", "serve": "nextoken.serve"}
LEAVES = {"nextoken", "nextoken.errors", "nextoken.fileio"}
SERVE_LEAVES = {"nextoken.serve.wire", "nextoken.serve.config", "nextoken.serve.metrics", "nextoken.serve.tokens"}
ARTIFACT_CONTRACT = {"nextoken.export.artifact", "nextoken.export.runtime"}
MAX_LINES = 400

def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[rel.parts[0]], *parts])


def source_files() -> list[Path]:
    return sorted(f for folder in PACKAGES for f in (REPO / folder).rglob("*.py"))


MODULES = {module_name(f): f for f in source_files()}


def imports(path: Path) -> set[str]:
    """Every nextoken module ``path`` imports, anywhere in it: ``from pkg import mod`` counts as ``pkg.mod``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == "nextoken" or m.startswith("nextoken.")}


def stage(module: str) -> str:
    """train, export, serve, leaf, or umbrella."""
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    return parts[1] if parts[1] in ("train", "export", "serve") else "umbrella"


def broken_rule(importer: str, imported: str) -> str | None:
    """The rule ``importer`` -> ``imported`` breaks, or None."""
    src, dst = stage(importer), stage(imported)
    if dst == "leaf" or src == "umbrella":
        return None
    if src == "leaf":
        return "a shared leaf imports nothing of nextoken's"
    if src == "train" and dst != "train":
        return "train/ imports no other stage"
    if src == "export" and dst not in ("export", "train"):
        return "export/ imports train/ only: never serve/ nor the umbrella"
    if src == "serve":
        if dst == "export" and imported not in ARTIFACT_CONTRACT:
            return "serve/ imports only the artifact contract from export/"
        if dst in ("train", "umbrella"):
            return "serve/ imports neither train/ nor the umbrella"
        sides = {m: next((s for s in ("engine", "http") if m.startswith(f"nextoken.serve.{s}")), None)
                 for m in (importer, imported)}
        if importer in SERVE_LEAVES and sides[imported]:
            return "serve's shared leaves import neither serve/engine nor serve/http"
        if sides[importer] and sides[imported] and sides[importer] != sides[imported]:
            return "serve/engine and serve/http do not import each other"
    return None


def violations() -> dict[tuple[str, str], str]:
    out = {}
    for module, path in MODULES.items():
        for imported in imports(path):
            rule = broken_rule(module, imported)
            if rule is not None:
                out[(module, imported)] = rule
    return out


def test_the_walker_sees_lazy_and_from_imports() -> None:
    """The rules below could pass by seeing nothing: check it finds imports of each kind it must."""
    assert "nextoken.train.model" in imports(REPO / "export" / "onnx.py")  # module level, `from x import Name`
    assert "nextoken.export.artifact" in imports(REPO / "serve" / "launcher.py")
    assert "nextoken.registry" in imports(REPO / "nextoken" / "cli_models.py")  # inside a function
    assert "nextoken.train.hf_import" in imports(REPO / "train" / "startup.py")  # lazy, inside a branch
    assert {"train", "export", "serve", "leaf", "umbrella"} == {stage(m) for m in MODULES}


def test_imports_point_one_way() -> None:
    found = violations()
    assert found == {}, "\n".join(f"{a} imports {b}: {rule}" for (a, b), rule in sorted(found.items()))


def test_no_module_is_over_400_lines() -> None:
    long = {}
    for path in source_files():
        rel = path.relative_to(REPO).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long[rel] = n
    assert long == {}, f"split these by job: {long}"
