"""p2pmoe: peer-to-peer expert synchronisation for federated mixture-of-experts learning.

The public API lives here; submodules are implementation detail unless documented. Names are
imported on first use, so `import p2pmoe` (and `p2pmoe --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ByteLedger": "p2pmoe.ledger",
    "ExperimentConfig": "p2pmoe.settings",
    "RunOptions": "p2pmoe.settings",
    "Options": "p2pmoe.options",
    "option": "p2pmoe.options",
    "Learner": "p2pmoe.learners.base",
    "Method": "p2pmoe.methods.base",
    "LearnerMethod": "p2pmoe.methods.base",
    "SendFailure": "p2pmoe.methods.base",
    "MethodSpec": "p2pmoe.methods.registry",
    "BuildContext": "p2pmoe.methods.registry",
    "register_method": "p2pmoe.methods.registry",
    "Task": "p2pmoe.tasks.base",
    "register_task": "p2pmoe.tasks.base",
    "FedAvgClient": "p2pmoe.methods.fedavg",
    "FedAvgServer": "p2pmoe.methods.fedavg",
    "LocalMethod": "p2pmoe.methods.local",
    "SimNetwork": "p2pmoe.sim.bus",
    "run_simulation": "p2pmoe.sim.runner",
    "default_config": "p2pmoe.config",
    "with_options": "p2pmoe.config",
    "Limits": "p2pmoe.wire.codec",
    "ProtocolError": "p2pmoe.wire.codec",
    "decode": "p2pmoe.wire.codec",
    "encode": "p2pmoe.wire.codec",
    "Message": "p2pmoe.wire.messages",
    "MessageKind": "p2pmoe.wire.messages",
    "Send": "p2pmoe.wire.messages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'p2pmoe' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
