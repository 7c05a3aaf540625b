"""Installed, fedtune is one import name: nothing else lands at the top of site-packages, and the
source never imports its parts by their directory names (that would load a second copy)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ("common", "client", "server", "simulations")


def _tracked_copy(destination: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, destination / name)
    return destination


def test_an_install_holds_only_fedtune_and_runs_from_there(tmp_path):
    source = _tracked_copy(tmp_path / "source")  # a build writes into its source tree
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    top = sorted(p.name for p in target.iterdir())
    assert top == ["bin", "fedtune", "fedtune-0.1.0.dist-info"], top
    assert (target / "fedtune" / "common" / "default_data").is_dir()
    probe = ("import sys, fedtune.common.config, fedtune.client.app, fedtune.server.app, "
             "fedtune.simulations.report; print(fedtune.common.config.__file__); "
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LAYOUT!r}))")
    ran = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin",
                                         "HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    where, loaded = ran.stdout.splitlines()[-2:]
    assert where.startswith(str(target / "fedtune" / "common")) and loaded == "[]"
    helped = subprocess.run([sys.executable, "-P", "-m", "fedtune", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    assert helped.returncode == 0 and "simulate" in helped.stdout


def test_no_source_imports_a_part_by_its_directory_name():
    pattern = re.compile(rf"^\s*(from|import) ({'|'.join(LAYOUT)})\b", re.M)
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    offenders = [name for name in files
                 if (ROOT / name).is_file() and pattern.search((ROOT / name).read_text())]
    assert not offenders, offenders
