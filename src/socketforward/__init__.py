"""Forward UNIX domain sockets between a host and its virtual machines over vsock.

Embedding one side in a program (README, "Embedding"): :class:`Guest` (the VM
side), :class:`Host` with :class:`Forward` and :class:`Expose` (the host side
for one VM). They are imported on first use, so that importing the package
(the guest agent in a small VM) loads neither side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Expose", "Forward", "Guest", "Host", "__version__"]

_LAZY = {
    "Guest": "socketforward.guest.embed",
    "Host": "socketforward.host.embed",
    "Forward": "socketforward.host.forwards",
    "Expose": "socketforward.host.forwards",
}

if TYPE_CHECKING:
    from socketforward.guest.embed import Guest
    from socketforward.host.embed import Host
    from socketforward.host.forwards import Expose, Forward


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'socketforward' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
