"""Every third-party import is declared, requirements.txt and pyproject.toml agree, and no
declared dependency is GPL-licensed (this is an MIT project that ships a Docker image)."""
from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, metadata, packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
#: pyproject extras that the app's install (requirements.txt, the Docker image) leaves out.
NOT_IN_APP_INSTALL = {"ray", "test"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return normalize(match.group(0)) if match and not line.startswith("-") else None


def requirements_file(path: Path) -> set[str]:
    """Distribution names in a pip requirements file, following ``-r other.txt``."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        if line.strip().startswith("-r "):
            names |= requirements_file(path.parent / line.strip()[3:].strip())
        elif name := requirement_name(line):
            names.add(name)
    return names


@cache
def pyproject_groups() -> dict[str, set[str]]:
    """Declared distributions per group: "core" for [project] dependencies, then each extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: {requirement_name(item) for item in items} for group, items in groups.items()}


def third_party_imports(files: list[Path], first_party: set[str]) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in `files` (lazy imports too) -> the files."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".", 1)[0]
                if top not in sys.stdlib_module_names and top not in first_party:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@cache
def installed_modules() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


def distributions(module: str) -> set[str]:
    """The distributions that install `module` (by its own name when none installed here does)."""
    return {normalize(name) for name in installed_modules().get(module, [module])}


def package_and_app_files() -> list[Path]:
    return [*sorted((ROOT / "covidscan").rglob("*.py")), ROOT / "app.py", *sorted((ROOT / "app_pages").rglob("*.py"))]


def test_the_scan_finds_the_known_imports():
    """Guards the scan itself: lazy imports inside functions count too."""
    imports = third_party_imports(package_and_app_files(), {"covidscan", "app_pages"})
    assert {"torch", "pydicom", "streamlit", "matplotlib", "PIL"} <= set(imports)
    assert "covidscan" not in imports and "json" not in imports


def test_package_and_app_imports_are_declared():
    imports = third_party_imports(package_and_app_files(), {"covidscan", "app_pages"})
    groups = pyproject_groups()
    app_install = requirements_file(ROOT / "requirements.txt")
    problems = []
    for module, files in sorted(imports.items()):
        dists = distributions(module)
        declared_in = {group for group, names in groups.items() if dists & names}
        where = ", ".join(sorted(files)[:3])
        if not declared_in:
            problems.append(f"{module} ({where}) is not in pyproject.toml")
        elif not dists & app_install and not declared_in & NOT_IN_APP_INSTALL:
            problems.append(f"{module} ({where}) is in pyproject [{', '.join(sorted(declared_in))}] "
                            "but not in requirements.txt")
    assert not problems, "\n".join(problems)


def test_test_imports_are_declared():
    tests = sorted((ROOT / "tests").glob("*.py"))
    helpers = {path.stem for path in tests}  # conftest, synthetic, test_* modules import each other
    imports = third_party_imports(tests, {"covidscan", "app_pages", *helpers})
    dev_install = requirements_file(ROOT / "requirements-dev.txt")
    declared = set().union(*pyproject_groups().values())
    problems = [f"{module} ({', '.join(sorted(files)[:3])}) is not in requirements-dev.txt and pyproject.toml"
                for module, files in sorted(imports.items())
                if not (distributions(module) & dev_install and distributions(module) & declared)]
    assert not problems, "\n".join(problems)


def test_requirements_txt_is_the_app_install_of_pyproject():
    groups = pyproject_groups()
    app_install = set().union(*(names for group, names in groups.items() if group not in NOT_IN_APP_INSTALL))
    assert requirements_file(ROOT / "requirements.txt") == app_install
    dev_install = requirements_file(ROOT / "requirements-dev.txt")
    missing = set().union(*(groups.get(group, set()) for group in NOT_IN_APP_INSTALL)) - dev_install
    assert not missing, f"in pyproject extras {sorted(NOT_IN_APP_INSTALL)} but not in requirements-dev.txt"


def test_dicom_decoder_packages_are_core_dependencies():
    from covidscan.images import DECODER_PACKAGES, DICOM_DECODERS

    needed = {normalize(DECODER_PACKAGES[plugin]) for plugins in DICOM_DECODERS.values() for plugin in plugins}
    assert needed <= pyproject_groups()["core"]
    assert "pylibjpeg-libjpeg" not in set().union(*pyproject_groups().values())


def licence_text(dist: str) -> str:
    meta = metadata(dist)
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " | ".join([meta.get("License-Expression") or "", (meta.get("License") or "").split("\n")[0], *classifiers])


@cache
def is_gpl(text: str) -> bool:
    """GPL or AGPL in a licence string; the LGPL (a library used unmodified) is not counted."""
    text = re.sub(r"GNU Lesser General Public License|\bLGPL", "", text, flags=re.IGNORECASE)
    return bool(re.search(r"\bA?GPL|GNU (Affero )?General Public License", text, flags=re.IGNORECASE))


def test_gpl_detection_on_known_licence_strings():
    assert is_gpl("GPL V3.0 | License :: OSI Approved :: GNU General Public License v3 (GPLv3)")
    assert is_gpl("AGPL-3.0-only")
    assert not is_gpl("LGPL-3.0-only")
    assert not is_gpl("MIT | License :: OSI Approved :: MIT License")


@pytest.mark.parametrize("group", sorted(pyproject_groups()))
def test_no_declared_dependency_is_gpl(group):
    checked, gpl = [], []
    for dist in sorted(pyproject_groups()[group]):
        try:
            text = licence_text(dist)
        except PackageNotFoundError:
            continue  # not installed here: nothing to read
        checked.append(dist)
        if is_gpl(text):
            gpl.append(f"{dist}: {text}")
    if not checked:
        pytest.skip(f"no package of [{group}] is installed here")
    assert not gpl, "\n".join(gpl)
