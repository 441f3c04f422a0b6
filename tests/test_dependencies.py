"""Every module of the package imports, and every third-party module it imports anywhere — at the top or inside a
function — is installed. In ``.ci/run``'s plain ``pip install -e .[test]`` venv (no ComfyUI requirements) this is
what shows a dependency the package uses but does not declare, which ComfyUI's requirements would otherwise hide.
"""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fileio", "backbones", "attention", "weights", "nodes", "imaging", "pipeline", "training", "cli")
#: ComfyUI's own top-level modules: only there when the pack runs inside ComfyUI (imported by nodes/ only: at the
#: top of its V3 node modules, which only comfy_entrypoint imports, and lazily in its ComfyUI-free helpers).
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                   "node_helpers", "latent_preview", "execution"}


def _package_files() -> list[Path]:
    return sorted([*REPO.glob("*.py"), *(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["productbg", *parts])


def _optional(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``try: ... except ImportError`` (optional extras, reported when missing)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                         for e in h.type.elts)
                for h in node.handlers):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the third-party modules ``path`` imports anywhere, optional ones left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    optional = _optional(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "productbg" and n not in COMFYUI_MODULES
            and n != "__future__"}


def test_the_scan_sees_lazy_imports_and_skips_optional_ones(tmp_path):
    """The measure can fail: a lazy import is found, an ``except ImportError`` one is not."""
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    import not_installed_pkg.sub\n\n"
                      "try:\n    import spandrel\nexcept ImportError:\n    spandrel = None\n", encoding="utf-8")
    assert third_party_imports(sample) == {"not_installed_pkg"}


def comfyui_at_top(path: Path) -> set[str]:
    """ComfyUI modules ``path`` imports at module level: the V3 node modules (their classes subclass comfy_api
    types), importable only inside ComfyUI."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names & COMFYUI_MODULES


def test_only_node_modules_need_comfyui_at_import():
    """``import productbg`` and every module outside nodes/ import without ComfyUI; in nodes/ the V3 modules do
    need it, and the rest (common, folders, bank_routes, the package) do not."""
    needs = {str(p.relative_to(REPO)) for p in _package_files() if comfyui_at_top(p)}
    assert needs and all(n.startswith("nodes/") for n in needs), needs
    assert not needs & {"nodes/__init__.py", "nodes/common.py", "nodes/folders.py", "nodes/bank_routes.py"}, needs
    assert {"nodes/extension.py", "nodes/schema.py"} <= needs


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_imports_and_its_dependencies_are_installed(path):
    missing = sorted(n for n in third_party_imports(path) if importlib.util.find_spec(n) is None)
    assert not missing, f"{path.relative_to(REPO)} imports {missing}, which `pip install -e .[test]` does not install"
    if path.name == "__main__.py":  # it runs the CLI when imported
        return
    if comfyui_at_top(path) and importlib.util.find_spec("comfy_api") is None:
        # A V3 node module outside ComfyUI (the plain pip venv): it must fail for ComfyUI's absence only.
        with pytest.raises(ModuleNotFoundError) as e:
            importlib.import_module(_module_name(path))
        assert e.value.name.split(".")[0] in COMFYUI_MODULES, e.value
        return
    importlib.import_module(_module_name(path))
