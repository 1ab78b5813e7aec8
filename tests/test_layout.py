"""The project's shape: import edges between packages, compose file, README, CI entry, pins."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rag", "ingest", "eval")
# What each top-level package must not import (ARCHITECTURE.md, "Packages").
FORBIDDEN = {"rag": {"ingest", "eval"}, "ingest": {"eval"}, "eval": set()}
# The one process entry point that composes the API with the ingest worker.
ENTRY_POINT = Path("rag/__main__.py")
ENTRY_POINT_MAY_IMPORT = {"ingest"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, dynamic ones with a literal name too."""
    source = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from rag import __main__` imports the submodule.
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out.append((node.lineno, arg.value))
    return out


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_packages_exist():
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), f"{package}/ is not a package"


def test_import_edges_follow_the_architecture():
    problems = []
    files = _python_files(*PACKAGES)
    assert len(files) > 10, "found suspiciously few modules; is ROOT right?"
    for path in files:
        rel = path.relative_to(ROOT)
        owner = rel.parts[0]
        allowed_extra = ENTRY_POINT_MAY_IMPORT if rel == ENTRY_POINT else set()
        for line, target in _imports(path):
            top = target.split(".")[0]
            if top in FORBIDDEN[owner] and top not in allowed_extra:
                problems.append(f"{rel}:{line} imports {target} ({owner} may not import {top})")
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_entry_point():
    problems = []
    for path in _python_files(*PACKAGES, "tests"):
        for line, target in _imports(path):
            if target == "rag.__main__" or target.startswith("rag.__main__."):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not problems, "\n".join(problems)


# ragas and its langchain stack are confined to one module (ARCHITECTURE.md, "eval/": ragas answer metrics).
RAGAS_MODULE = Path("eval/ragas_metrics.py")
RAGAS_STACK = {"ragas", "langchain", "langchain_core", "langchain_community", "langchain_openai", "instructor"}


def test_only_the_ragas_module_imports_ragas():
    problems = []
    for path in _python_files(*PACKAGES):
        rel = path.relative_to(ROOT)
        for line, target in _imports(path):
            if target.split(".")[0] in RAGAS_STACK and rel != RAGAS_MODULE:
                problems.append(f"{rel}:{line} imports {target} (only {RAGAS_MODULE} may)")
    assert not problems, "\n".join(problems)
    assert any(t.split(".")[0] == "ragas" for _, t in _imports(ROOT / RAGAS_MODULE)), "the ragas module moved?"


def test_the_import_walker_sees_what_it_must():
    # The rules above are only as good as the walker: check it on the shapes it has to catch.
    source = (
        "import ingest.worker\n"
        "from eval import metrics\n"
        "from . import store\n"
        "from .api import app\n"
        "from rag import __main__\n"
        "import importlib\n"
        "importlib.import_module('ingest.cli')\n"
        "def f():\n    from ingest.supervisor import worker_beside_api\n"
    )
    targets = {t for _, t in _imports(ROOT / "rag" / "probe.py", source)}
    assert {"ingest.worker", "eval", "eval.metrics", "rag", "rag.store", "rag.api", "rag.api.app",
            "rag.__main__", "ingest.cli", "ingest.supervisor"} <= targets
    nested = {t for _, t in _imports(ROOT / "rag" / "api" / "probe.py", "from ..store import x\nfrom . import y\n")}
    assert {"rag.store", "rag.store.x", "rag.api", "rag.api.y"} <= nested


# ---- module edges (ARCHITECTURE.md: the write path and the CLIs run without the HTTP app) -------------

# Modules that may import the HTTP layer (Litestar and rag.api): the API itself and the entry point.
HTTP_LAYER = ("rag.api",)
HTTP_LIBRARIES = {"litestar"}


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _python_files(*PACKAGES)}


def _resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import target names (``rag.store.point_id`` → ``rag.store``), else None."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def _may_use_http(module: str) -> bool:
    return module == "rag.__main__" or any(module == h or module.startswith(h + ".") for h in HTTP_LAYER)


def http_layer_violations(edges: dict[str, list[tuple[int, str]]]) -> list[str]:
    problems = []
    for module, targets in edges.items():
        if _may_use_http(module):
            continue
        for line, target in targets:
            top = target.split(".")[0]
            if top in HTTP_LIBRARIES or any(target == h or target.startswith(h + ".") for h in HTTP_LAYER):
                problems.append(f"{module}:{line} imports {target} (only rag.api and the entry point may)")
    return problems


def private_name_violations(edges: dict[str, list[tuple[int, str]]], modules: set[str]) -> list[str]:
    """``from other_module import _name``: a private name used outside its module (a rule that wants a home)."""
    problems = []
    for module, targets in edges.items():
        for line, target in targets:
            owner, _, name = target.rpartition(".")
            if not name.startswith("_") or name.startswith("__") or owner not in modules or target in modules:
                continue
            if owner != module:
                problems.append(f"{module}:{line} imports the private {target}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _edges() -> tuple[dict[str, list[tuple[int, str]]], set[str]]:
    modules = _project_modules()
    return {name: _imports(path) for name, path in modules.items()}, set(modules)


def _graph(edges: dict[str, list[tuple[int, str]]], modules: set[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in edges.items():
        out = graph.setdefault(module, set())
        for _, target in targets:
            resolved = _resolve(target, modules)
            # A package's own __init__ is loaded before its submodules anyway: not an edge worth a loop.
            if resolved and resolved != module and not module.startswith(resolved + "."):
                out.add(resolved)
    return graph


def test_only_the_http_layer_imports_litestar_and_rag_api():
    edges, _ = _edges()
    problems = http_layer_violations(edges)
    assert not problems, "\n".join(problems)


def test_no_module_imports_another_modules_private_names():
    edges, modules = _edges()
    problems = private_name_violations(edges, modules)
    assert not problems, "\n".join(problems)


def test_no_import_loops_even_through_function_bodies():
    edges, modules = _edges()
    cycles = import_cycles(_graph(edges, modules))
    assert not cycles, "import loops: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_module_rules_catch_what_they_must():
    # Each rule, shown failing on the shape it forbids (so a rule that silently passes is noticed).
    worker = [(3, "rag.api.app"), (9, "rag.api.app.Services")]
    assert http_layer_violations({"ingest.worker": worker})
    assert http_layer_violations({"ingest.cli": [(1, "litestar.testing")]})
    assert not http_layer_violations({"rag.api.documents": worker, "rag.__main__": worker})
    modules = {"rag.api.app", "rag.api.answers", "rag.answer"}
    assert private_name_violations({"ingest.cli": [(4, "rag.api.app._job_out")]}, modules)
    assert not private_name_violations({"rag.api.app": [(4, "rag.api.app._job_out")]}, modules)
    assert not private_name_violations({"rag.api.app": [(4, "rag.answer.__all__")]}, modules)
    loop = {"rag.api.app": {"rag.api.answers"}, "rag.api.answers": {"rag.api.app"}, "rag.answer": set()}
    assert import_cycles(loop) == [["rag.api.answers", "rag.api.app"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# ---- compose.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _known_variables() -> set[str]:
    from rag.settings import Settings

    return {f"RAG_{f.upper()}" for f in Settings.__struct_fields__}


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volumes(service: dict) -> set[tuple[str, str]]:
    out = set()
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2:
                out.add((parts[0], parts[1]))
        elif isinstance(volume, dict) and volume.get("source") and volume.get("target"):
            out.add((str(volume["source"]), str(volume["target"])))
    return out


def test_compose_has_the_three_services_with_healthchecks(compose):
    services = compose.get("services") or {}
    assert {"qdrant", "api", "worker"} <= set(services)
    for name in ("qdrant", "api", "worker"):
        check = services[name].get("healthcheck")
        assert isinstance(check, dict) and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name}'s healthcheck is disabled"


def test_compose_api_and_worker_share_the_data_volume(compose):
    services = compose["services"]
    shared = _volumes(services["api"]) & _volumes(services["worker"])
    assert shared, "api and worker mount no volume at the same path"
    # The registry and uploads live under RAG_DATA_DIR, so that is what must be shared.
    for name in ("api", "worker"):
        data_dir = _environment(services[name]).get("RAG_DATA_DIR")
        assert data_dir, f"{name} sets no RAG_DATA_DIR"
        assert any(data_dir == target or data_dir.startswith(target.rstrip("/") + "/") for _, target in shared), (
            f"{name}'s RAG_DATA_DIR={data_dir} is not on the shared volume {shared}"
        )
    named = set(compose.get("volumes") or {})
    for source, _ in shared:
        assert source in named or source.startswith(("/", ".")), f"volume {source} is not declared"


def test_compose_variables_are_known_settings(compose):
    known = _known_variables()
    seen: dict[str, set[str]] = {}
    anchors = {k: v for k, v in compose.items() if k.startswith("x-") and isinstance(v, dict)}
    for where, env in [*anchors.items(), *((n, _environment(s)) for n, s in compose["services"].items())]:
        for key in env:
            if str(key).startswith("RAG_"):
                seen.setdefault(str(key), set()).add(where)
    assert "x-rag-env" in anchors and any(k.startswith("RAG_") for k in anchors["x-rag-env"])
    unknown = {k: sorted(w) for k, w in seen.items() if k not in known}
    assert not unknown, f"unknown settings in compose.yaml: {unknown}"


def test_compose_api_requires_keys_with_a_bootstrap_key_from_the_environment(compose):
    from rag.settings import load_settings

    env = {k: v for k, v in _environment(compose["services"]["api"]).items() if k.startswith("RAG_")}
    assert env.get("RAG_AUTH") == "keys"
    assert env.get("RAG_BOOTSTRAP_KEY", "").startswith("${RAG_BOOTSTRAP_KEY:?"), "the key must come from the environment"
    assert load_settings(env=env).auth_mode == "keys"


def test_compose_settings_load_and_point_at_the_qdrant_service(compose):
    from rag.settings import load_settings

    services = compose["services"]
    for name in ("api", "worker"):
        env = {k: v for k, v in _environment(services[name]).items() if k.startswith("RAG_")}
        settings = load_settings(env=env)  # would fail at container start otherwise
        url = urlparse(env.get("RAG_QDRANT_URL", ""))
        assert url.scheme in ("http", "https") and url.hostname == "qdrant", f"{name}: RAG_QDRANT_URL={url.geturl()}"
        assert not settings.embedded
    # api serves HTTP only; the separate worker runs the jobs.
    api_env = {k: v for k, v in _environment(services["api"]).items() if k.startswith("RAG_")}
    assert not load_settings(env=api_env).worker_in_process
    # Inside the compose network Qdrant's HTTP API is on its container port, 6333.
    assert (urlparse(api_env["RAG_QDRANT_URL"]).port or 6333) == 6333


def test_compose_cluster_profile_has_a_qdrant_cluster_postgres_and_replicas(compose):
    from rag.settings import load_settings

    services = compose["services"]
    cluster = {n for n, svc in services.items() if "cluster" in (svc.get("profiles") or [])}
    assert {"qdrant-1", "qdrant-2", "qdrant-3", "postgres", "cluster-api", "cluster-worker"} <= cluster
    for name in ("qdrant-1", "qdrant-2", "qdrant-3"):
        assert _environment(services[name]).get("QDRANT__CLUSTER__ENABLED") == "true"
        assert services[name].get("healthcheck", {}).get("test")
    for name in ("qdrant-2", "qdrant-3"):
        assert "--bootstrap" in services[name]["command"] and "http://qdrant-1:6335" in services[name]["command"]
    for name in ("cluster-api", "cluster-worker"):
        assert services[name]["deploy"]["replicas"] == 2
        env = {k: v for k, v in _environment(services[name]).items() if k.startswith("RAG_")}
        env = {k: v.replace("${RAG_POSTGRES_PASSWORD:?set RAG_POSTGRES_PASSWORD}", "pw") for k, v in env.items()}
        settings = load_settings(env=env)
        assert settings.database_url.startswith("postgresql://rag:pw@postgres:5432/")
        assert urlparse(settings.qdrant_url).hostname == "qdrant-1" and settings.qdrant_replication_factor == 2
        assert settings.qdrant_write_ordering == "strong"
    # Nothing of the cluster starts with a plain `docker compose up`.
    assert not {"qdrant", "api", "worker", "llm"} & cluster


# ---- README, CI, packaging ----------------------------------------------------------------------


def _shell_commands(markdown: str) -> list[str]:
    """Commands in the README's shell code blocks, in order (comments and blank lines dropped)."""
    commands = []
    for block in re.finditer(r"^```(?:sh|bash|shell|console)?[ \t]*\n(.*?)^```", markdown, re.M | re.S):
        for line in block.group(1).splitlines():
            line = re.sub(r"^\s*\$\s+", "", line)  # console prompts
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_starts_with_make_run_and_make_test():
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    commands = _shell_commands(readme.read_text(encoding="utf-8"))
    assert commands[:2] == ["make run", "make test"], commands[:5]


def test_readme_command_parser():
    text = "# x\n\n```sh\nmake run    # serve\n\n# comment\nmake test\n```\n\n```bash\n$ curl x\n```\n"
    assert _shell_commands(text) == ["make run", "make test", "curl x"]


def test_ci_entry_runs_make_test():
    script = ROOT / ".ci" / "run"
    assert script.is_file()
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in script.read_text(encoding="utf-8").splitlines()]
    assert any(re.fullmatch(r"(exec\s+)?make\s+test", ln) for ln in lines if not ln.startswith("#")), lines


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("run", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no {target} target"


def test_torch_is_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {}).values()
    deps = [*project["dependencies"], *(d for group in extras for d in group)]
    torch = [re.sub(r"\s+", "", d) for d in deps if re.match(r"^\s*torch\b(?![-_.\w])", d)]
    assert torch == ["torch==2.13.0"], torch
