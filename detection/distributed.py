from engine.distributed import *  # noqa: F401,F403  (moved to engine/; removed once every import is updated)
from engine.distributed import __all__  # noqa: F401
