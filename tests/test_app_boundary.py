"""The library and the CLI never import the app's UI stack: Streamlit and Altair live on the app side
(app_pages/ui.py, app_pages/charts.py), so `covidscan` works where they are not installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_PACKAGES = ("streamlit", "altair")

_REPORT_UI_MODULES = (
    "import json, sys\n"
    f"leaked = sorted(m for m in sys.modules if m.split('.')[0] in {UI_PACKAGES!r})\n"
    "sys.stderr.write('\\nUI-MODULES ' + json.dumps(leaked) + '\\n')\n"
)


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def ui_modules(result: subprocess.CompletedProcess) -> list[str]:
    line = next(line for line in result.stderr.splitlines() if line.startswith("UI-MODULES "))
    return json.loads(line.split(" ", 1)[1])


def test_every_library_module_and_the_cli_import_without_streamlit_or_altair():
    code = (
        "import importlib, pkgutil, covidscan\n"
        "from covidscan.cli import build_parser\n"
        "build_parser()\n"  # every command's module
        "names = [m.name for m in pkgutil.walk_packages(covidscan.__path__, 'covidscan.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "for name in covidscan.__all__:\n"
        "    getattr(covidscan, name)\n"
        "print(len(names))\n" + _REPORT_UI_MODULES
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 20  # the walk found the package's modules
    assert ui_modules(result) == []


def test_models_json_does_not_import_streamlit_or_altair(tmp_path):
    from synthetic import tiny_bundle

    tiny_bundle(tmp_path / "weights" / "ct-tiny")
    code = ("import os, sys\n"
            f"os.environ.update(COVIDSCAN_WEIGHTS_DIR={str(tmp_path / 'weights')!r}, "
            f"COVIDSCAN_STATE_DIR={str(tmp_path / 'state')!r}, COVIDSCAN_RUNS_DIR={str(tmp_path / 'runs')!r})\n"
            "from covidscan.cli import main\n"
            "code = main(['models', '--json'])\n" + _REPORT_UI_MODULES + "sys.exit(code)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert [m["name"] for m in json.loads(result.stdout)] == ["ct-tiny"]
    assert ui_modules(result) == []


def test_the_app_side_does_use_them():
    # The check above would pass vacuously if the report line were wrong: the app's modules do import both.
    result = run_python("import app_pages.charts, app_pages.ui\n" + _REPORT_UI_MODULES)
    assert result.returncode == 0, result.stderr
    assert {name.split(".")[0] for name in ui_modules(result)} == set(UI_PACKAGES)
