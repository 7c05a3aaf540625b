"""common/app_bundle.py: the digest nodes pin is the digest of what `flwr run` submits."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from fedtune.common.app_bundle import (
    APP_DIR,
    APP_PACKAGES,
    AppBundleError,
    app_digest,
    check_digest,
)


@pytest.mark.slow  # Flower's builder walks the whole directory, virtual environment included
def test_the_digest_is_that_of_flowers_own_bundle_of_the_app_directory():
    from flwr.cli.build import build_fab_from_disk

    assert app_digest() == hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()


def test_any_change_to_the_apps_code_changes_the_digest(tmp_path):
    copy = tmp_path / "app"
    for part in APP_PACKAGES:
        shutil.copytree(APP_DIR / part, copy / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(APP_DIR / "pyproject.toml", copy)
    same = app_digest(copy)

    with (copy / "client" / "app.py").open("a") as handle:
        handle.write("# one more line\n")

    assert same == app_digest(APP_DIR) and app_digest(copy) != same


def test_digests_are_checked_and_normalised():
    digest = "ab" * 32
    assert check_digest(f"sha256:{digest.upper()}") == digest
    with pytest.raises(AppBundleError, match="64 hex digits"):
        check_digest("abc")


def test_a_node_running_the_bundle_imports_fedtune_from_the_bundle_alone(tmp_path):
    """What a ClientApp process does: the unpacked bundle first on sys.path, then the app."""
    import io
    import subprocess
    import sys
    import zipfile

    from fedtune.common.app_bundle import app_bundle

    zipfile.ZipFile(io.BytesIO(app_bundle())).extractall(tmp_path / "fab")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import fedtune.client.app; "
             "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
             "if n.split('.')[0] == 'fedtune' and getattr(m, '__file__', None)))")
    done = subprocess.run([sys.executable, "-P", "-c", probe, str(tmp_path / "fab")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    files = done.stdout.split()
    assert len(files) > 20
    assert all(f.startswith(str(tmp_path / "fab")) for f in files), files
