"""p2pmoe: peer-to-peer expert synchronisation for federated mixture-of-experts learning.

The public API lives here; submodules are implementation detail unless documented.
"""

from p2pmoe.config import RunConfig
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.base import Learner, Method
from p2pmoe.methods.fedavg import FedAvgClient, FedAvgServer
from p2pmoe.methods.local import LocalMethod
from p2pmoe.sim.bus import InMemoryBus
from p2pmoe.sim.runner import run_simulation
from p2pmoe.wire.codec import Limits, ProtocolError, decode, encode
from p2pmoe.wire.messages import Message, MessageKind, Send

__version__ = "0.1.0"

__all__ = [
    "ByteLedger",
    "FedAvgClient",
    "FedAvgServer",
    "InMemoryBus",
    "Learner",
    "Limits",
    "LocalMethod",
    "Message",
    "MessageKind",
    "Method",
    "ProtocolError",
    "RunConfig",
    "Send",
    "decode",
    "encode",
    "run_simulation",
]
