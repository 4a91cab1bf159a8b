"""Progress bars of the long stages (calibration, search, pruning, evaluation), on stderr and
gone when done; ``neuroal --quiet`` turns them off."""

from __future__ import annotations

from tqdm.auto import tqdm

_enabled = True


def show_progress(enabled: bool) -> None:
    """Turn the progress bars on or off for this process."""
    global _enabled
    _enabled = enabled


def progress(iterable=None, **kwargs) -> tqdm:
    """A ``tqdm`` bar that disappears when done, unless progress is off."""
    return tqdm(iterable, leave=False, disable=not _enabled, **kwargs)
