"""Moved to `jaxddpm.core.losses` (floor 1); this path stays as an alias of that module so existing imports
(and attribute access, monkeypatching included) keep working."""
import sys

from jaxddpm.core import losses as _core_module

sys.modules[__name__] = _core_module
