"""Client-level differential privacy for FedAvg (DP-FedAvg, McMahan, Ramage, Talwar and Zhang,
ICLR 2018), with the privacy spent tracked by Google's dp-accounting (RDP accountant).

Each round the server clips every participant's update (its upload minus the current global
model) to norm S, adds Gaussian noise of standard deviation σS to their sum and divides by
the number of participants. One round is then a Gaussian mechanism of noise multiplier σ on
the sum. Over T rounds the accountant composes T such events and reports ε at δ.

Project decisions: the noise is added by the server (central DP, the clients trust it with
their clipped updates; local noise is not built); no amplification by subsampling is
claimed, because which clients take part in a round is a public function of the run's seed,
not a secret draw (`epsilon` can account a secret Poisson sample, but FedAvg does not use it);
δ = 1/n for n clients, as the issue asks; updates are weighted equally (a weight by example
count would leak the counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from p2pmoe.methods.robust import clipped_difference

State = Mapping[str, torch.Tensor]


def dp_mean(states: Sequence[State], centre: State, clip: float, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """centre + (Σ_i clip(s_i − centre, S) + N(0, (σS)² I)) / m."""
    total = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in centre.items()}
    for state in states:
        for name, d in clipped_difference(state, centre, clip).items():
            total[name] += d
    out = {}
    for name, t in centre.items():
        noisy = total[name] + noise * clip * torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[name] = (t.to(torch.float64) + noisy / len(states)).to(t.dtype)
    return out


def epsilon(noise: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε at `delta` after `rounds` rounds of the subsampled Gaussian mechanism (RDP accountant)."""
    import logging

    import dp_accounting  # type: ignore[import-untyped]
    from dp_accounting.rdp import RdpAccountant  # type: ignore[import-untyped]

    logging.getLogger("absl").setLevel(logging.ERROR)  # it warns about the orders it excludes
    gaussian = dp_accounting.GaussianDpEvent(noise)
    event = gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


class NoisyRelease:
    """Differential privacy for what a peer-to-peer node shares (issue 30): FedMoE-DA's experts
    and φ. No server adds noise for it, so each node noises its own release.

    The node keeps a public copy P of what it shares, starting from the model's initial state
    (a function of the run's seed, public). Each round it releases P + clip(private − P, S) +
    N(0, (σS)² I), over experts and φ together, and that becomes P; its peers only ever see P.
    A release changes by at most 2S when the node's data change (both clipped steps lie in a
    ball of radius S), so one round is a Gaussian mechanism of noise multiplier σ/2 whatever
    the private model is, and the node's ε over its rounds composes those (`epsilon`).

    Project decisions beyond DP-FedAvg: the unit is a node's whole data set (client-level, as
    for FedAvg); the node's own aggregation and evaluation use its private model (only what
    leaves the node is noised); a round's release is counted whether or not a peer asks for
    it, so ε is an upper bound for a node that served nothing."""

    def __init__(self, initial: State, clip: float, noise: float, generator: torch.Generator) -> None:
        if clip <= 0 or noise < 0:
            raise ValueError(f"need dp_clip > 0 and dp_noise >= 0, got {clip} and {noise}")
        self.public = {name: t.detach().clone() for name, t in initial.items()}
        self.clip, self.noise, self.generator = clip, noise, generator
        self.releases = 0

    def release(self, private: State) -> dict[str, torch.Tensor]:
        """This round's public state from the private one (names as in `initial`)."""
        for name, d in clipped_difference(private, self.public, self.clip).items():
            noisy = d + self.noise * self.clip * torch.randn(d.shape, generator=self.generator, dtype=torch.float64)
            self.public[name] = (self.public[name].to(torch.float64) + noisy).to(self.public[name].dtype)
        self.releases += 1
        return dict(self.public)


def node_epsilon(noise: float, rounds: int, delta: float) -> float:
    """ε at `delta` of a node that released `rounds` times through `NoisyRelease` (noise
    multiplier σ/2 a release: a replaced data set moves the clipped step by up to 2S)."""
    return epsilon(noise / 2, 1.0, rounds, delta) if noise > 0 else float("inf")
