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
