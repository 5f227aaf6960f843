"""How ranks come to exist and talk: launcher detection, communicators, placement, devices.

Knows nothing about the model: `fedhypevae` talks to a `Communicator`.
"""

from .comm import Communicator, LocalCommunicator
from .placement import place_clients

__all__ = ["Communicator", "LocalCommunicator", "place_clients"]
