"""How ranks come to exist and talk: launcher detection, communicators, placement, devices, the launch bootstrap.

Knows nothing about the model: `fedhypevae` talks to a `Communicator`. Importing this package (or
`backend`, `launcher`) does not import torch: `fedhypevae --help` reads `backend.BACKENDS` from here.
"""

from __future__ import annotations

__all__ = ["Communicator", "LocalCommunicator", "place_clients"]


def __getattr__(name: str):
    # torch is imported with the communicators, on first use
    if name in ("Communicator", "LocalCommunicator"):
        from . import comm

        return getattr(comm, name)
    if name == "place_clients":
        from .placement import place_clients

        return place_clients
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
