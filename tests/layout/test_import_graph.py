"""The package's imports flow one way: cli → experiments → training → eval → data, nn → ops → kernels.

Each package may import only the packages listed for it (and itself); aosae.files and
aosae.machine are leaves anyone may use. A new edge against the flow fails here."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {"files", "machine"}
ALLOWED = {
    "kernels": set(),
    "ops": {"kernels"},
    "nn": {"ops"},
    "data": {"ops", "nn"},
    "eval": {"ops", "nn", "data"},
    "integrations": {"ops", "nn"},
    "training": {"ops", "nn", "data", "eval"},
    "experiments": {"ops", "nn", "data", "eval", "training"},
    "cli": {"ops", "nn", "data", "eval", "training", "experiments", "integrations", "version"},
}


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[1].removesuffix(".py")


def imported_packages(path: Path) -> set[str]:
    """The aosae sub-packages a module imports (absolute or relative), at any depth."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: use absolute imports (aosae.<package>...), not relative ones")
            base = node.module or ""
            names = [base] if base != "aosae" else [f"aosae.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "aosae" and len(parts) > 1:
                out.add(parts[1] if parts[1] != "__version__" else "version")
    return out


def test_imports_flow_one_way():
    modules = [p for p in (ROOT / "aosae").rglob("*.py") if p.parent != ROOT / "aosae" or p.stem not in ("__init__", "__main__")]
    bad = []
    for path in modules:
        pkg = package_of(path)
        if pkg in LEAVES:
            continue
        assert pkg in ALLOWED, f"{path}: package {pkg!r} has no place in the layering; add it to ALLOWED"
        for dep in imported_packages(path) - {pkg} - LEAVES:
            if dep not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(ROOT)} imports aosae.{dep}")
    assert not bad, "imports against the flow:\n" + "\n".join(sorted(bad))


def test_every_package_is_installed():
    """A sub-package missing from pyproject's list works in an editable install and breaks a real one."""
    import re

    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    listed = set(re.findall(r'"([^"]+)"', line))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "aosae").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
