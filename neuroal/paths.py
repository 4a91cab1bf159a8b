"""Where neuroal keeps derived files that are expensive to rebuild."""

import importlib.util
import os
from pathlib import Path

from neuroal.errors import UserError


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the neuroal cache.

    The cache lives in ``$NEUROAL_CACHE`` when set, else ``~/.cache/neuroal``. Everything in it
    can be deleted; it is rebuilt on demand.
    """
    root = Path(os.environ.get("NEUROAL_CACHE") or Path.home() / ".cache" / "neuroal")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(package: str, relative: str, needed_by: str, install: str) -> Path:
    """Locate a data file shipped inside an installed package, without importing the package
    (importing can be slow or pull in dependencies that were deliberately not installed).

    Raises ``UserError`` naming ``needed_by`` and the ``install`` command when it is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{needed_by} needs the package {package}: {install}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise UserError(f"{needed_by}: {path} is missing; reinstall with {install}")
    return path
