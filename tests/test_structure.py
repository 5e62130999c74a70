"""The floors of the house (DESIGN.md), read from the source: who may import whom, and no private
name imported across modules."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"
CORE = ["guidance.py", "samplers", "schedules.py", "denoiser.py", "processes.py", "predictions.py",
        "registry.py", "batch.py", "hooks.py", "checks.py"]
FORBIDDEN_FOR_CORE = ("difflab.models", "difflab.training", "difflab.data", "difflab.cli", "difflab.pipeline",
                      "difflab.metrics", "difflab.demo")


def _modules(entry: str) -> list[Path]:
    path = SRC / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import in the file, including those inside functions."""
    out = []
    package = ".".join(("difflab", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((module, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize("entry", CORE)
def test_core_imports_nothing_from_the_floors_above(entry):
    for path in _modules(entry):
        for module, names in _imports(path):
            full = [module, *(f"{module}.{n}" for n in names)]
            bad = [m for m in full if m.startswith(FORBIDDEN_FOR_CORE)]
            assert not bad, f"{path.relative_to(SRC)} imports {bad[0]}, a floor above the core"


@pytest.mark.parametrize("entry", ["accel", "editing"])
def test_accelerators_and_editing_reach_networks_only_through_the_hook_interface(entry):
    for path in _modules(entry):
        for module, names in _imports(path):
            full = [module, *(f"{module}.{n}" for n in names)]
            bad = [m for m in full if m.startswith(("difflab.models", *FORBIDDEN_FOR_CORE))]
            assert not bad, f"{path.relative_to(SRC)} imports {bad[0]}; use difflab.hooks"


def test_pipeline_imports_nothing_from_training():
    for module, names in _imports(SRC / "pipeline.py"):
        assert not module.startswith("difflab.training"), f"pipeline.py imports {module}"
        assert not (module == "difflab" and "training" in names)


def test_no_private_name_is_imported_across_modules():
    for path in SRC.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("difflab"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(SRC)} imports private {private} from {module}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = SRC / "samplers" / "__init__.py"  # imports at module level: the walker must find them
    assert any(m.startswith("difflab.samplers") for m, _ in _imports(probe))


def test_nothing_unpickles():
    """No pickle by default: weights are safetensors, configs JSON (DESIGN). The one torch.load is
    files.load_pickled_tensors, which users reach only by opting in, and it uses torch's restricted
    unpickler (weights_only=True)."""
    loads = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle"):
                loads.append(str(path.relative_to(SRC)))
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert node.func.value.id == "torch" and keywords.get("weights_only") is True, path
        assert not any(m in ("pickle", "dill", "cloudpickle") for m, _ in _imports(path)), path
    assert loads == ["files.py"]
