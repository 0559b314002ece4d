"""fastsock (bootstrap init: the compiled core is being built)."""

from .server import *  # noqa: F403
from .server import __all__  # noqa: F401
