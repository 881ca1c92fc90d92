"""``flplatform.jobs.install()`` wires every job kind and hook, and nothing else does: no import
registers a job kind or a hook as a side effect, and the work queue imports no domain."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from flplatform.jobs import install
from flplatform.orm.workqueue import WorkKind
from flplatform.workqueue import lookup, registered_kinds

SRC = Path(__file__).resolve().parents[1] / "src" / "flplatform"


def _job_kinds_defined_in_src() -> dict[str, str]:
    """Every module-level ``SOMETHING_JOB = "kind"`` in the package: the job kinds code enqueues."""
    kinds: dict[str, str] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.endswith("_JOB")
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                kinds[node.value.value] = str(path.relative_to(SRC))
    return kinds


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_install_registers_every_job_kind_and_the_billing_hooks() -> None:
    from flplatform.billing import hooks as billing_hooks
    from flplatform.trainings import hooks as training_hooks

    install()
    install()  # idempotent
    defined = _job_kinds_defined_in_src()
    assert {"training.aggregate", "inference.run"} <= defined.keys()
    missing = sorted(kind for kind in defined if kind not in registered_kinds())
    assert not missing, f"job kinds defined but not registered by install(): {missing}"
    aggregate, inference = lookup("training.aggregate"), lookup("inference.run")
    assert aggregate is not None and aggregate.category == WorkKind.AGGREGATION and aggregate.keep_payload
    assert inference is not None and inference.category == WorkKind.INFERENCE and not inference.keep_payload
    assert billing_hooks.round_started in training_hooks.ROUND_STARTED
    assert billing_hooks.round_aggregated in training_hooks.ROUND_AGGREGATED


def test_importing_every_entry_point_registers_nothing() -> None:
    """A fresh interpreter that imports the app, the CLI and every domain has no job kind and no
    hook until ``install()`` runs."""
    code = (
        "import flplatform.app, flplatform.cli, flplatform.workqueue.cli, flplatform.inference.jobs, "
        "flplatform.trainings.jobs, flplatform.billing.hooks\n"
        "from flplatform.billing import hooks as b\n"
        "from flplatform.trainings import hooks as t\n"
        "from flplatform.workqueue import registered_kinds\n"
        "assert registered_kinds() == [], registered_kinds()\n"
        "assert b.round_started not in t.ROUND_STARTED and b.round_aggregated not in t.ROUND_AGGREGATED\n"
        "from flplatform.jobs import install\n"
        "install()\n"
        "assert 'training.aggregate' in registered_kinds() and b.round_started in t.ROUND_STARTED\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_handler_registers_at_import_time() -> None:
    """Job kinds are registered by a domain's ``register()`` (called by ``install()``), never by a
    decorator that runs on import."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "workqueue":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in node.decorator_list:
                    target = decorator.func if isinstance(decorator, ast.Call) else decorator
                    if isinstance(target, ast.Attribute) and target.attr == "handler":
                        offenders.append(f"{path.relative_to(SRC)}:{node.name}")
    assert not offenders


def test_workqueue_imports_no_app_router_cli_or_domain() -> None:
    """The work queue sits below the domains: whoever starts a worker hands it ``install``."""
    upward = (
        "flplatform.app",
        "flplatform.routers",
        "flplatform.cli",
        "flplatform.jobs",
        "flplatform.trainings",
        "flplatform.models",
        "flplatform.inference",
        "flplatform.billing",
        "flplatform.broker",
        "flplatform.organizations",
        "flplatform.users",
    )
    found = {
        f"{path.name}: {name}"
        for path in (SRC / "workqueue").glob("*.py")
        for name in _imported_modules(path)
        if name.startswith(upward)
    }
    assert not found, sorted(found)


def test_models_import_nothing_from_trainings() -> None:
    """Trainings use models (a training trains a model), never the other way round: the round
    rules that need both live in ``trainings.contributions``."""
    found = {
        f"{path.name}: {name}"
        for path in (SRC / "models").glob("*.py")
        for name in _imported_modules(path)
        if name.startswith("flplatform.trainings")
    }
    assert not found, sorted(found)
