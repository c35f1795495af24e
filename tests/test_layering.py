"""Import direction: stage packages never import the CLI modules (scalespd.run,
scalespd.cluster); the CLIs call the stages, not the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scalespd"
STAGE_PACKAGES = ("targets", "train", "profiles", "graph", "spectral", "evaluate", "report")
CLI_MODULES = {"scalespd.run", "scalespd.cluster"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_stage_packages_do_not_import_the_clis() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(_imports(path) & CLI_MODULES)
        for pkg in STAGE_PACKAGES for path in sorted((PACKAGE / pkg).rglob("*.py"))
        if _imports(path) & CLI_MODULES
    }
    assert not offenders, offenders


def test_the_check_sees_an_offending_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from scalespd.run import RunDirError\n")
    assert _imports(bad) & CLI_MODULES == {"scalespd.run"}
