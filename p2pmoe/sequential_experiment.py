"""Nodes for the cross-domain sequential-recommendation runs: one client per domain.

Data: FedDCSR-format folders (FKCB: `--data fkcb --data-root DIR`, or the P2PMOE_FKCB
environment variable) or MovieLens genre domains in the non-overlapped view (`--data ml-1m`,
`--data ml-100k`). Methods: `local` (Local SASRec), `fedsasrec` (FedAvg of the SASRec
encoder), `fmoe-cdsr`, and its ablations `fmoe-cdsr-uniform` (no gate: uniform mixture) and
`fmoe-cdsr-unfrozen` (foreign experts fine-tuned locally).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from p2pmoe.config import RunConfig
from p2pmoe.data.errors import DataNotFoundError
from p2pmoe.data.feddcsr import load_feddcsr
from p2pmoe.data.movielens import load_movielens, non_overlapped_domains
from p2pmoe.data.sequences import DomainSequences
from p2pmoe.learners.sequential import NextItemLearner, SASRecNextItem
from p2pmoe.methods.base import Method
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.fedsasrec import FedSASRecClient, encoder_template
from p2pmoe.methods.fmoe_cdsr import FMoECDSRClient, FMoECDSRServer
from p2pmoe.methods.local import LocalMethod
from p2pmoe.models.fmoe_cdsr import FMoECDSR, transition_adjacency
from p2pmoe.naming import SERVER_ID, client_ids

SEQUENCE_DATA = ("fkcb", "ml-1m", "ml-100k")
SEQUENCE_METHODS = ("local", "fedsasrec", "fmoe-cdsr", "fmoe-cdsr-uniform", "fmoe-cdsr-unfrozen")
SEQUENCE_SERVER_METHODS = ("fedsasrec", "fmoe-cdsr", "fmoe-cdsr-uniform", "fmoe-cdsr-unfrozen")
FKCB_ENV = "P2PMOE_FKCB"


@lru_cache(maxsize=4)
def _domains(data: str, root: str | None) -> tuple[DomainSequences, ...]:
    if data == "fkcb":
        root = root or os.environ.get(FKCB_ENV)
        if not root:
            raise DataNotFoundError("fkcb", "(no path given)", f"pass --data-root DIR (a FedDCSR-format folder) or set {FKCB_ENV}")
        return tuple(load_feddcsr(root))
    return tuple(non_overlapped_domains(load_movielens(root or data)))


def sequence_domains(cfg: RunConfig) -> list[DomainSequences]:
    """The run's domains, in client order (node-00 is the first domain)."""
    return list(_domains(cfg.data, cfg.data_root))


def _model(cfg: RunConfig, domains: list[DomainSequences], k: int):
    data = domains[k]
    if not cfg.method.startswith("fmoe-cdsr"):
        return SASRecNextItem(data.num_items, cfg.max_len, cfg.embed_dim, heads=4, blocks=2, dropout=cfg.dropout)
    return FMoECDSR(
        data.num_items, len(domains), k, transition_adjacency(data.train, data.num_items), max_len=cfg.max_len,
        hidden=cfg.embed_dim, dropout=cfg.dropout, contrastive_weight=cfg.contrastive_weight, vae=cfg.fmoe_encoder == "vae",
        gate="uniform" if cfg.method == "fmoe-cdsr-uniform" else "learned", gate_pooling=cfg.fmoe_gate_pooling, head=cfg.fmoe_head,
    )


def build_sequence_nodes(cfg: RunConfig, wanted: set[str]) -> dict[str, Method]:
    """Clients (one per domain, identical initial encoder weights) and the server if any."""
    if cfg.method not in SEQUENCE_METHODS:
        raise ValueError(f"method {cfg.method!r} does not run on {cfg.data}; choose from {list(SEQUENCE_METHODS)}")
    domains = sequence_domains(cfg)
    ids = client_ids(len(domains))
    nodes: dict[str, Method] = {}
    learners = {}
    for k, node in enumerate(ids):
        if node in wanted or (SERVER_ID in wanted and k == 0):
            torch.manual_seed(cfg.seed)
            learners[node] = NextItemLearner(
                _model(cfg, domains, k), domains[k], cfg.max_len, batch_size=cfg.batch_size, lr=cfg.lr or 1e-3,
                num_negatives=cfg.negatives, negative_seed=cfg.seed, seed=cfg.seed * 1000 + k,
            )
    if SERVER_ID in wanted and cfg.method in SEQUENCE_SERVER_METHODS:
        template_model = learners[ids[0]].model
        if cfg.method == "fedsasrec":
            nodes[SERVER_ID] = FedAvgServer(SERVER_ID, ids, encoder_template(template_model))
        else:
            nodes[SERVER_ID] = FMoECDSRServer(SERVER_ID, {n: k for k, n in enumerate(ids)}, template_model.expert_state(0))
    for k, node in enumerate(ids):
        if node not in wanted:
            continue
        if cfg.method == "local":
            nodes[node] = LocalMethod(node, learners[node], cfg.local_epochs)
        elif cfg.method == "fedsasrec":
            nodes[node] = FedSASRecClient(node, learners[node], SERVER_ID, cfg.local_epochs)
        else:
            nodes[node] = FMoECDSRClient(node, learners[node], k, SERVER_ID, cfg.local_epochs, freeze_foreign=cfg.method != "fmoe-cdsr-unfrozen")
    return nodes
