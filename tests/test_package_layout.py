"""The engine's house rules: packages depend downward only, modules stay small, settings load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top: a package may import itself and the ones before it, never one after it.
LAYERS = [
    "errors", "files", "optional_packages",
    "data", "captioning", "config", "sdxl", "adapters", "kohya", "runs", "builtin", "training",
    "cli",
]  # fmt: skip
MAX_MODULE_LINES = 400


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _unit(path: Path) -> str:
    """The layer a trainer module belongs to: its sub-package, or the top-level module itself."""
    parts = path.relative_to(ROOT / "trainer").with_suffix("").parts
    return parts[0]


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, including imports inside functions."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x`
    return found


def _trainer_units(path: Path) -> set[str]:
    units = set()
    for module in _imported(path):
        parts = module.split(".")
        if parts[0] == "trainer" and len(parts) > 1 and parts[1] in LAYERS:
            units.add(parts[1])
    return units


@pytest.mark.parametrize("path", _modules("trainer"), ids=lambda p: str(p.relative_to(ROOT)))
def test_packages_import_only_lower_layers(path):
    unit = _unit(path)
    if unit == "__init__":
        return  # the lazy public API names modules by string
    allowed = set(LAYERS[: LAYERS.index(unit) + 1])
    upward = _trainer_units(path) - allowed
    assert not upward, f"{path.relative_to(ROOT)} ({unit}) imports {sorted(upward)}, which sit above it"


def test_the_engine_never_imports_the_studio_except_to_start_it():
    for path in _modules("trainer"):
        uses_app = {m for m in _imported(path) if m.split(".")[0] == "app"}
        if path.relative_to(ROOT).as_posix() == "trainer/cli/__init__.py":
            assert uses_app == {"app.serve", "app.serve.serve"}  # `dora-studio ui`, imported when it runs
        else:
            assert not uses_app, f"{path.relative_to(ROOT)} imports {uses_app}"


@pytest.mark.parametrize("folder", ["trainer", "app"])
def test_no_module_is_over_the_size_limit(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(folder)
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these by concern: {long}"


def test_reading_settings_and_the_cli_load_no_heavy_library():
    code = (
        "import sys, trainer, trainer.cli, trainer.config.presets, trainer.config.docs, trainer.errors\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'gradio', "
        "'numpy', 'PIL', 'safetensors'})\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == ""


def test_the_public_api_resolves():
    import trainer

    for name in trainer.__all__:
        assert getattr(trainer, name) is not None, name
