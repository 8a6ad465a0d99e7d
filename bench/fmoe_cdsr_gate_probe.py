"""Does FMoE-CDSR's learned gate mix its branches worse than equal weights would?

    python bench/fmoe_cdsr_gate_probe.py --data-root DIR --embed-dim 64 ... --run-folder runs/bench_NAME/fmoe-cdsr

Why: FMoE-CDSR's gate sees its branches' logits through a stop-gradient and each branch is
trained by its own cross-entropy, so the gate never changes what the branches learn; a run
with the learned gate and a run with equal weights differ in how they mix and in the random
numbers they drew (the gate's dropout shifts every later draw). This probe takes one run's
branches and scores them with several mixes, so the mixes compare without that noise.

Reads a run folder's checkpoint (bench_fmoe_cdsr's `--checkpoint-every`), rebuilds its clients
from the same flags the run was given (a checkpoint of another setting is refused) and, without
training, scores every client's validation and test sequences (FedDCSR's sampled negatives,
the run's own) with: the learned gate (unless the run mixed uniformly); equal weights over
the available branches; the own branch alone; the constant own-branch weight (0, 0.1, ..., 1;
the rest shared equally) that scores best on the client's validation split; and, with the
learned and with equal weights, mixing the branches' probabilities instead of their logits
(`probs`: an ensemble of the same branches, not the paper's mixture). It also gives
the gate's mean weight on the own branch over the client's training, validation and test
sequences: a gate that trusted the own branch more on the sequences that branch was trained
on than on unseen ones would have learned its memorisation. Prints a table, saves
bench/results/<name>.json and .md. Nothing in the run folder is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve
from p2pmoe.eval.metrics import ranking_metrics
from p2pmoe.harness import add_flags, bench_parser, markdown, method_defaults, parse_flags, rerun_command, write_results
from p2pmoe.learners.sequential import NextItemLearner
from p2pmoe.methods.fmoe_cdsr import FMoECDSRClient
from p2pmoe.models.fmoe_cdsr import FMoECDSR
from p2pmoe.node.checkpoint import CheckpointError
from p2pmoe.report import format_table
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.resume import restored_experiment

DEFAULTS = method_defaults("fmoe-cdsr", data="fkcb")  # as bench_fmoe_cdsr.py: the --fmoe-* flags are accepted
OWN_WEIGHTS = tuple(w / 10 for w in range(11))
"""The constant own-branch weights tried (the rest shared equally by the foreign branches);
the equal mix's own weight joins them when it is not one of these (1/4 with four domains)."""
SPLITS = ("train", "valid", "test")


def constant_weights(available: torch.Tensor, own_index: int, own: float) -> torch.Tensor:
    """Weights ``[K]``: `own` on branch `own_index`, ``1 - own`` shared equally by the other
    available branches, 0 on the unavailable ones."""
    others = int(available.sum()) - 1
    if others == 0 and own != 1.0:
        raise ValueError(f"only the own branch is available: its weight must be 1, not {own}")
    weights = torch.where(available, (1 - own) / max(others, 1), 0.0)
    weights[own_index] = own
    return weights


class ConstantGate(nn.Module):
    """A gate that gives every sequence the same weights (`constant_weights`). It returns
    their logs because the model softmaxes what its gate returns: softmax(log w) = w."""

    def __init__(self, model: FMoECDSR, own: float) -> None:
        super().__init__()
        self.log_weights = constant_weights(model.available, model.domain_index, own).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_weights.to(x.device, x.dtype).expand(x.shape[0], -1)


@contextlib.contextmanager
def mixed_as(model: FMoECDSR, own: float) -> Iterator[None]:
    """`model` scoring with the constant weights of `ConstantGate`; its own gate back after."""
    gate = model.gate
    model.gate = ConstantGate(model, own)
    try:
        yield
    finally:
        model.gate = gate


class ProbabilityMixture(nn.Module):
    """Scores as `model` would but mixing the branches' probabilities, ``log Σ_i g_i
    softmax(ℓ_i)``, instead of their logits (``Σ_i g_i ℓ_i``, the paper's mixture): an
    ensemble of the same branches with the same weights, for comparison. A weight of 0 (an
    unavailable branch, or a constant mix) gives log 0 = -inf, which logsumexp drops."""

    def __init__(self, model: FMoECDSR) -> None:
        super().__init__()
        self.model = model

    def score_candidates(self, inputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        logits, weights = self.model.branch_logits(inputs)
        live = list(logits)
        log_probs = torch.stack([logits[i].log_softmax(dim=-1) for i in live])  # [K', B, items]
        log_weights = weights[:, live].T.log().unsqueeze(-1)  # [K', B or 1, 1]
        return torch.logsumexp(log_probs + log_weights, dim=0).gather(1, candidates)


@contextlib.contextmanager
def probabilities_mixed(learner: NextItemLearner, model: FMoECDSR) -> Iterator[None]:
    """`learner` scoring with `ProbabilityMixture` of `model`."""
    learner.model = ProbabilityMixture(model)
    try:
        yield
    finally:
        learner.model = model


def valid_and_test_mrr(learner: NextItemLearner) -> tuple[float, float]:
    """(valid, test) MRR in %."""
    valid, test = (100 * ranking_metrics(learner.ranks(split), ks=(10,))["mrr"] for split in ("valid", "test"))
    return valid, test


def tuned_on_validation(tried: dict[float, tuple[float, float]]) -> float:
    """The own weight whose (valid, test) MRR has the best valid; ties go to the first tried."""
    return max(tried, key=lambda own: tried[own][0])


def own_share(model: FMoECDSR, inputs: torch.Tensor, device: torch.device, batch: int = 512) -> float:
    """Mean gate weight (%) on the own branch for predicting the item after each row of
    `inputs` (any split, the training sequences included, which the learner's evaluation
    statistics do not cover)."""
    model.eval()
    total = 0.0
    for start in range(0, len(inputs), batch):
        total += float(model.gate_weights(inputs[start : start + batch].to(device))[:, model.domain_index].sum())
    return 100 * total / len(inputs)


def probe_client(client: FMoECDSRClient) -> dict[str, float]:
    """Valid and test MRR (%) of: the learned gate (a run with one), equal weights, each also
    mixing probabilities (`probs`), the own branch alone, and the constant own weight best on
    validation (optimistic on valid by construction; its test MRR is the fair number); the
    learned gate's own share (%) on each split."""
    model, learner = client.model, client.next_item
    live = len(model.live_branches())
    row: dict[str, float] = {}
    if model.gate is not None:
        row["learned valid"], row["learned test"] = valid_and_test_mrr(learner)
        with probabilities_mixed(learner, model):
            row["learned probs valid"], row["learned probs test"] = valid_and_test_mrr(learner)
    tried = {}
    for own in sorted({*OWN_WEIGHTS, 1 / live}) if live > 1 else (1.0,):
        with mixed_as(model, own):
            tried[own] = valid_and_test_mrr(learner)
    row["equal valid"], row["equal test"] = tried[1 / live]
    with mixed_as(model, 1 / live), probabilities_mixed(learner, model):
        row["equal probs valid"], row["equal probs test"] = valid_and_test_mrr(learner)
    row["own only valid"], row["own only test"] = tried[1.0]
    best = tuned_on_validation(tried)
    row["tuned own weight"] = best
    row["tuned valid"], row["tuned test"] = tried[best]
    if model.gate is not None:
        inputs = {"train": learner.train_set.inputs, "valid": learner.splits["valid"][0], "test": learner.splits["test"][0]}
        for split in SPLITS:
            row[f"gate own % {split}"] = own_share(model, inputs[split], learner.device)
    return row


def load_clients(folder: Path, cfg: ExperimentConfig) -> tuple[dict[str, FMoECDSRClient], int]:
    """The run's clients with the checkpoint's state and the round it holds; refused unless
    the checkpoint is of exactly this setting (its config hash)."""
    experiment, round_index = restored_experiment(folder, cfg, ": give the probe the flags the run was made with")
    clients: dict[str, FMoECDSRClient] = {}
    for node in experiment.clients:
        method = experiment.nodes[node]
        if not isinstance(method, FMoECDSRClient):
            raise CheckpointError(f"{node} runs {type(method).__name__}, not an FMoE-CDSR client")
        clients[node] = method
    return clients, round_index


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    add_experiment_arguments(p, sys.argv[1:], DEFAULTS)
    p.add_argument("--run-folder", type=Path, required=True, help="the FMoE-CDSR run folder holding checkpoint.safetensors")
    add_flags(p, "name", "results")
    return p


def setting_text(cfg: ExperimentConfig, folder: Path, round_index: int) -> str:
    run, task, method = cfg.run, cfg.task, cfg.method
    return (
        f"{run.method} on {run.data}, checkpoint of `{folder.name}` after round {round_index + 1} of {run.rounds}; "
        f"hidden {getattr(task, 'embed_dim', '?')}, batch {run.batch_size}, {run.local_epochs} local epoch(s) a round, seed {run.seed}; "
        f"method options {method.to_dict()}. No training: every client's validation and test sequences scored with each mix "
        "(MRR %, FedDCSR's sampled negatives, the run's own); probs: the same weights on the branches' probabilities instead of "
        "their logits; tuned: the constant own weight (0, 0.1, ..., 1 and the equal mix's) best on the client's validation split, "
        "so its valid MRR is optimistic by construction; gate own % is the learned gate's mean weight on the client's own "
        "branch over a split's sequences (train: the prediction after each whole training sequence)."
    )


def probe_all(clients: dict[str, FMoECDSRClient]) -> list[dict[str, float | str]]:
    """One row per client and their mean (the tuned own weight left out of the mean: the mean
    of each client's choice would be no mix anyone chose)."""
    probed: dict[str, dict[str, float]] = {}
    for node, client in clients.items():
        probed[node] = probe_client(client)
        print(f"  {node}: done", file=sys.stderr, flush=True)
    columns = list(next(iter(probed.values())))
    probed["mean"] = {k: sum(r[k] for r in probed.values()) / len(probed) for k in columns if k != "tuned own weight"}
    return [{"client": node, **values} for node, values in probed.items()]


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    try:
        cfg = resolve(config_from_args(args, DEFAULTS))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        clients, round_index = load_clients(args.run_folder, cfg)
    except (CheckpointError, ValueError, OSError) as exc:
        sys.exit(f"fmoe_cdsr_gate_probe: {exc}")
    print(f"probing {len(clients)} clients after round {round_index + 1}", file=sys.stderr, flush=True)
    rows = probe_all(clients)
    table = format_table(rows, list(rows[0]))
    name = args.name or f"fmoe_cdsr_gate_probe_{cfg.run.data.replace('-', '')}"
    command = rerun_command(cli, args, skip=("results",))
    text = markdown(
        "FMoE-CDSR: learned gate against equal weights, same branches", setting_text(cfg, args.run_folder, round_index), command, f"```\n{table}\n```\n"
    )
    setting = cfg.to_dict()
    if cfg.run.data_root:  # this machine's path is nobody else's
        setting["run"]["data_root"] = "DIR"
    write_results(args.results, name, {"round": round_index + 1, "setting": setting, "command": command, "rows": rows}, text, echo=False)
    print(table)


if __name__ == "__main__":
    main()
