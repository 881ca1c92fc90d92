"""The shape of the code (issue 15 items 2 and 3; docs/architecture.md draws it):

* the import graph keeps the contracts of ``[tool.importlinter]`` in pyproject.toml — the layers
  (entry points → routers → domain packages → pure engines → foundations), no import cycles, and
  pure ``aggregation``/``uncertainty``/``sandbox``/``client`` — each contract its own test, checked by
  import-linter's ``lint-imports``;
* no module in ``src/`` is over 500 lines unless its docstring says why, on a line starting ``Size:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "flplatform"
PYPROJECT = REPO / "pyproject.toml"
MAX_MODULE_LINES = 500

CONTRACTS = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]


def test_the_contracts_cover_every_rule_of_the_design() -> None:
    kinds = {contract["id"]: contract["type"] for contract in CONTRACTS}
    assert kinds.get("layers") == "layers" and kinds.get("acyclic") == "acyclic_siblings", kinds
    layers = next(contract for contract in CONTRACTS if contract["id"] == "layers")
    # Every top-level module must have a layer: a new package cannot slip past the map.
    assert layers["exhaustive"] is True and layers["containers"] == ["flplatform"]
    domains = {"users", "organizations", "models", "trainings", "inference", "billing", "broker", "auth"}
    domain_layer = {name.strip() for name in layers["layers"][2].split(":")}
    assert domains <= domain_layer, domain_layer


@pytest.mark.parametrize("contract", CONTRACTS, ids=[contract["id"] for contract in CONTRACTS])
def test_import_contract(contract: dict[str, object]) -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: install the test extra (README's command 2)"
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo", "--contract", str(contract["id"]), str(PYPROJECT)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "1 kept, 0 broken" in report, (
        f"import contract {contract['id']!r} ({contract['name']}) is broken:\n{report}"
    )


def size_reason(line: str) -> str:
    """The reason a docstring line gives for a module's size: the text after a leading ``Size:``."""
    line = line.strip()
    return line.removeprefix("Size:").strip() if line.startswith("Size:") else ""


def oversized_modules() -> dict[str, int]:
    """Modules over the limit whose docstring gives no ``Size:`` reason, with their line counts."""
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines <= MAX_MODULE_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if not any(size_reason(line) for line in docstring.splitlines()):
            offenders[str(path.relative_to(REPO))] = lines
    return offenders


def test_no_module_over_500_lines_without_a_stated_reason() -> None:
    offenders = oversized_modules()
    assert offenders == {}, (
        f"modules over {MAX_MODULE_LINES} lines: split them by concern, or (one cohesive thing) say why in "
        f"the module docstring on a line starting 'Size:': {offenders}"
    )
