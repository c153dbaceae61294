from engine.logs import *  # noqa: F401,F403  (moved to engine/; removed once every import is updated)
from engine.logs import __all__, PACKAGES  # noqa: F401
