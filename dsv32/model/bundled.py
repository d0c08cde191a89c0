"""The model shipped in the package (`dsv32/assets/model`), the default of every command that runs one."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "model"


def default_model(logger: logging.Logger = log) -> Path:
    """The bundled model if present, else a tiny random checkpoint generated once into the cache
    (`logger` warns about it)."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv32" / "tiny-random"
    if not (cache / "config.json").is_file():
        from .init_tiny import init_tiny

        logger.warning("no bundled model at %s: generating a tiny RANDOM checkpoint into %s "
                       "(its answers are noise; pass --model DIR for real weights)", BUNDLED_MODEL, cache)
        cache.mkdir(parents=True, exist_ok=True)
        init_tiny(cache, seed=0, layers=2, hidden=128, shards=1)
    else:
        logger.warning("no bundled model at %s: serving the tiny RANDOM checkpoint in %s", BUNDLED_MODEL, cache)
    return cache
