"""Where neuroal keeps derived files that are expensive to rebuild."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the neuroal cache.

    The cache lives in ``$NEUROAL_CACHE`` when set, else ``~/.cache/neuroal``. Everything in it
    can be deleted; it is rebuilt on demand.
    """
    root = Path(os.environ.get("NEUROAL_CACHE") or Path.home() / ".cache" / "neuroal")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
