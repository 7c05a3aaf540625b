"""The Flower app bundle (FAB) fedtune submits, and its SHA-256 digest: the name of the code.

`fedtune server` submits the app directory with `flwr run`, which builds a FAB (a zip with fixed
dates and sorted entries, so the same files always give the same bytes) of the files that
`[tool.flwr.app] fab-include` in pyproject.toml selects: the `fedtune`, `common`, `client` and
`server` packages. A node pins the digest of the one bundle it agrees to run
(`client/app_pin.py`).
The digest here is computed with Flower's own builder over those packages only, so it equals the
digest of what `flwr run` submits without walking a virtual environment inside the directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fedtune.common.errors import InputError

APP_DIR = Path(__file__).resolve().parents[1]  # holds pyproject.toml: the Flower app
APP_PACKAGES = ("fedtune", "common", "client", "server")  # what fab-include selects
DIGEST = re.compile(r"[0-9a-f]{64}")


class AppBundleError(InputError, ValueError):
    """No app bundle can be built here, or a digest is malformed."""


def app_digest(app_dir: Path = APP_DIR) -> str:
    """SHA-256 (hex) of the FAB `flwr run` builds from `app_dir`."""
    return hashlib.sha256(app_bundle(app_dir)).hexdigest()


def app_bundle(app_dir: Path = APP_DIR) -> bytes:
    """The FAB (zip bytes) `flwr run` builds from `app_dir`."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    if not (app_dir / "pyproject.toml").is_file():
        raise AppBundleError(f"{app_dir} holds no pyproject.toml (fedtune is not installed "
                             "from its source tree); name the approved app with --app-digest")
    files: dict[str, Path] = {"pyproject.toml": app_dir / "pyproject.toml"}
    if (app_dir / ".gitignore").is_file():
        files[".gitignore"] = app_dir / ".gitignore"
    for package in APP_PACKAGES:
        for relative, path in collect_files(app_dir / package).items():
            files[f"{package}/{relative}"] = path
    fab, _ = build_fab_from_files(files)
    return fab


def check_digest(text: str) -> str:
    """A digest as given on a command line (optionally `sha256:`-prefixed), normalised."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not DIGEST.fullmatch(digest):
        raise AppBundleError(f"app digest must be 64 hex digits (SHA-256), got {text!r}")
    return digest
