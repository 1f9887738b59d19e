"""attnlab's version, in a module of its own: the caches key their entries with it (``weights_cache``,
``inference/aot.py``), and reading it from here keeps those modules from importing the package's
``__init__`` (whose lazy exports import them in turn). ``pyproject.toml`` carries the same number."""

__version__ = "0.1.0"


def current() -> str:
    """The version, read at call time (a test may change ``__version__``)."""
    return __version__
