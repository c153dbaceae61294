"""Moved to the ``classification`` package (this re-export goes once every import is updated)."""

from classification import *  # noqa: F401,F403
from classification import __all__  # noqa: F401
