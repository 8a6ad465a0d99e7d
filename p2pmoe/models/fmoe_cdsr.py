"""FMoE-CDSR's client model (arXiv 2503.13254, METHODS §2): K branches, one expert per domain.

Client c of K domains holds K branches. Branch i has local adaptation parameters (item and
positional embeddings over c's items, LayerNorm, dropout, a one-layer graph layer over c's
item-transition graph, a prediction head over c's items) and an expert encoder
``experts[i]``. Only experts cross the network: ``experts[c]`` is trained here and uploaded,
``experts[i]`` for i ≠ c holds domain i's expert and is frozen. A gate mixes the branches'
stop-gradient logits, so the mixture loss trains only the gate.

Following the official code: the encoder input is ``(H[s] + E[s])·√d`` plus the positional
embedding, then LayerNorm and dropout (``H`` the graph layer's output, ``E`` the item
embedding); z = μ (no sampling; the log σ² stack is trained by the KL term alone); the gate
MLP has dropout after each LayerNorm.

Project decisions (options, defaults named): CE and KL are means over non-padding positions
(the official code divides by all positions, padding included); the contrastive view is a
fresh random permutation of each sequence's items every step (the official code draws it
once); the contrastive weight ``contrastive_weight`` is 0.1 (METHODS is silent; the official
code uses 1.0 on FKCB); a branch whose expert has not arrived is left out of every loss term
and gets gate weight 0, and its slot of the gate input is zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pmoe.models.sampled_softmax import draw_train_negatives, sampled_cross_entropy, sampled_logits
from p2pmoe.models.sasrec import SASRecEncoder, _dropout
from p2pmoe.wire.codec import check_like

if TYPE_CHECKING:
    from p2pmoe.learners.sequential import SequenceBatch

__all__ = ["FMoECDSR", "GATES", "GATE_POOLINGS", "HEADS", "INITS", "graph_product", "nt_xent", "transition_adjacency"]

GATES = ("learned", "uniform")
GATE_POOLINGS = ("sequence", "position", "batch")
HEADS = ("linear", "tied")
INITS = ("sasrec", "official")
"""How a branch's item and positional embeddings (and graph bias) start: see `Branch`."""
SASREC_EMBEDDING_STD = 0.02


def transition_adjacency(sequences: Sequence[Sequence[int]], num_items: int) -> Tensor:
    """Row-normalised next-item graph: sparse ``[N+1, N+1]``, ``A[i, j]`` = share of i's
    successors that are j, counted over ``sequences`` (c's training data). Row and column
    ``N`` (the padding id) are empty."""
    pairs = [(a, b) for seq in sequences for a, b in zip(seq, seq[1:], strict=False)]  # consecutive pairs: one fewer
    size = (num_items + 1, num_items + 1)
    if not pairs:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), size, check_invariants=True).coalesce()
    counts = torch.sparse_coo_tensor(torch.tensor(pairs).T, torch.ones(len(pairs)), size, check_invariants=True).coalesce()
    rows = counts.indices()[0]
    out_degree = torch.zeros(num_items + 1).index_add_(0, rows, counts.values())
    return torch.sparse_coo_tensor(counts.indices(), counts.values() / out_degree[rows], size, check_invariants=True).coalesce()


def graph_product(adjacency: Tensor, e: Tensor, gathered: bool | None = None) -> Tensor:
    """``A·E`` for the sparse ``A`` and dense ``E``.

    ``gathered`` (default: on a GPU) computes it as a gather of the edges' source rows and an
    ``index_add`` into their targets: the same sums in another order, dense kernels only. On
    an H200 (torch 2.11, CUDA 13) the backward of ``torch.sparse.mm`` went through thrust
    kernels that failed with cudaErrorIllegalInstruction after about ten FKCB rounds. On a CPU
    ``torch.sparse.mm`` stays: on FKCB Kitchen (81k edges, hidden 64, one thread) its forward
    and backward took 15-17 ms against 28-31 ms for the gather.
    """
    if not (e.is_cuda if gathered is None else gathered):
        return torch.sparse.mm(adjacency, e)
    targets, sources = adjacency.indices()
    return torch.zeros_like(e).index_add_(0, targets, adjacency.values().unsqueeze(1) * e[sources])


def nt_xent(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """Symmetric NT-Xent (SimCLR): each of the 2B views picks its partner among the other 2B−1
    by cosine similarity; mean over the 2B views."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=-1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


class _GatedSum(torch.autograd.Function):
    """``Σ_r w[:, r] · ℓ_r`` for constant logit tables ``ℓ_r`` ``[P, C]`` (C: the items, or a
    sampled softmax's candidates) and weights ``w``
    ``[P, R]`` or ``[1, R]``, with a gradient for ``w`` only.

    The same value as the plain expression, but one ``[P, items]`` table is written instead of
    2R − 1, and the weights' gradient is a row-wise dot product per branch instead of a product
    table per branch that is then summed: on FKCB the logit tables (positions × ~14-35k items)
    are the largest tensors of a step.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, *logits: Tensor) -> Tensor:
        ctx.save_for_backward(*logits)
        ctx.shared = weights.shape[0] == 1
        out = logits[0] * weights[:, :1]
        for r in range(1, len(logits)):
            out.addcmul_(logits[r], weights[:, r : r + 1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits = ctx.saved_tensors
        if ctx.shared:
            columns = [torch.dot(grad.flatten(), table.flatten()).reshape(1) for table in logits]
        else:
            columns = [torch.bmm(grad.unsqueeze(1), table.unsqueeze(2)).reshape(-1) for table in logits]
        return (torch.stack(columns, dim=1), *(None for _ in logits))


class Branch(nn.Module):
    """Branch i's adaptation parameters: always local, always trainable.

    ``init`` "sasrec" (default, a project decision that departs from the official code): item
    and positional embeddings start at N(0, 0.02) as in SASRec (and in the project's Local
    SASRec and FedSASRec), the graph bias at 0. The encoder input is ``LayerNorm((H + E)·√d
    + P)``, so its forward pass ignores the table's scale, while Adam moves every coordinate by
    about ``lr`` per step: a table of entries ~1 (torch's default N(0, 1)) therefore changes
    ~50x more slowly, relative to its size, than a table of entries ~0.02, and on FKCB Food
    the branch learned far more slowly than SASRec (issue 11). ``init`` "official"
    reproduces the official code: torch's defaults, N(0, 1) for both embeddings, and the
    graph bias U(±1/√d) as its GraphConvolution initialises it.

    Two ablations of the branch against SASRec (issue 11; the paper's branch has both parts):
    ``graph`` False leaves out the graph layer (the item table is ``E`` alone);
    ``input_norm`` False feeds the encoder ``(H + E) + P`` as SASRec does, without the
    official ``·√d`` and input LayerNorm.
    """

    def __init__(
        self, num_items: int, max_len: int, hidden: int, head: str = "linear", init: str = "sasrec", graph: bool = True, input_norm: bool = True
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.graph, self.input_norm = graph, input_norm
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.graph_bias = nn.Parameter(torch.zeros(hidden)) if graph else None
        self.norm = nn.LayerNorm(hidden, eps=1e-12) if input_norm else None
        self.head = nn.Linear(hidden, num_items) if head == "linear" else None
        with torch.no_grad():
            if init == "sasrec":
                for emb in (self.item_emb, self.pos_emb):
                    nn.init.normal_(emb.weight, std=SASREC_EMBEDDING_STD)
                self.item_emb.weight[num_items].zero_()
            elif self.graph_bias is not None:
                bound = 1 / math.sqrt(hidden)
                nn.init.uniform_(self.graph_bias, -bound, bound)

    def scores(self, z: Tensor) -> Tensor:
        """Logits over the client's items: the linear head, or (tied) dot products with the
        item embeddings, as SASRec scores."""
        if self.head is not None:
            return self.head(z)
        return z @ self.item_emb.weight[: self.num_items].T

    def sampled_scores(self, z: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
        """`scores` at each row's target and the shared ``negatives`` only (`sampled_logits`)."""
        if self.head is not None:
            return sampled_logits(z, self.head.weight, targets, negatives, self.head.bias)
        return sampled_logits(z, self.item_emb.weight, targets, negatives)

    def item_table(self, adjacency: Tensor) -> Tensor:
        """``(H + E)`` for every item, ``H = (E + A·E + b) / 2`` (``E`` without the graph
        layer): computed once per step and shared by the sequence and its permuted view."""
        e = self.item_emb.weight
        if self.graph_bias is None:
            return e
        return (e + graph_product(adjacency, e) + self.graph_bias) / 2 + e

    def embed(self, table: Tensor, seqs: Tensor, dropout: float) -> Tensor:
        """Encoder input ``[B, L, d]``; positions count from the newest slot, as in SASRec."""
        positions = torch.arange(seqs.shape[1] - 1, -1, -1, device=seqs.device)
        if self.norm is None:
            return _dropout(F.embedding(seqs, table) + self.pos_emb(positions), dropout, self.training)
        x = F.embedding(seqs, table) * math.sqrt(table.shape[1]) + self.pos_emb(positions)
        return _dropout(self.norm(x), dropout, self.training)


class Expert(nn.Module):
    """What crosses the network: a μ stack and, in VAE mode, a log σ² stack (SASRec encoders)."""

    def __init__(self, max_len: int, hidden: int, heads: int, blocks: int, dropout: float, vae: bool) -> None:
        super().__init__()
        self.mu = SASRecEncoder(max_len, hidden, heads, blocks, dropout)
        self.logvar = SASRecEncoder(max_len, hidden, heads, blocks, dropout) if vae else None


class FMoECDSR(nn.Module):
    """Client ``domain_index`` of ``num_domains``: K branches, K experts and a gate.

    ``adjacency`` is `transition_adjacency` of this client's training sequences. Item ids are
    ``0..num_items-1`` and the padding id is ``num_items`` (as in `SequenceBatcher`).
    ``available[i]`` says whether branch i takes part: the own branch always does, a foreign
    one from the moment `set_expert_state` gives it domain i's expert. Foreign experts are
    frozen (``requires_grad`` False) from construction; a method that wants them trainable
    says so, and then refreshes its learner's optimiser.

    Options: ``vae`` (default False) gives each expert a log σ² stack beside μ and adds the
    official annealed KL term ``β_KL(step)·Σ_i KL_i``, ``β_KL = min(kl_cap, step /
    kl_anneal_steps)``; the σ stack's only use is that term, so without it the stack is neither
    built nor shipped. Off by default, a project decision against the official objective: the
    KL's ``μ²`` part pulls z = μ, the vector the heads read, towards 0, and on FKCB Food a
    one-branch client without it scored 23.6 test MRR against 22.2 with it, higher at every
    epoch (bench/results/fmoe_cdsr_food_one_client.md, measured while the σ stack was still
    built without the KL term: 23.0 with μ alone);
    ``init`` "sasrec" (default) or "official", see `Branch`; ``gate`` "learned" (softmax of an MLP
    ``K·d → gate_hidden → K`` with GELU and LayerNorm over the stop-gradient last-position
    representations) or "uniform" (equal weights over available branches, no gate);
    ``gate_pooling`` "sequence" (default: one weight vector per sequence, from its last
    position, used at all of its positions), "position" (each position gated by its own
    representations: causal, so earlier positions never see later items through the gate),
    "batch" (the official code's pooling: mean over the batch, one vector per batch, so a
    score depends on what else is in the batch); ``head`` "linear" (default: each branch its
    own linear prediction head, as the official code) or "tied" (scores are dot products with
    the branch's item embeddings, as SASRec scores); ``graph`` and ``input_norm`` (default True,
    as the paper) are ablations of the branch, see `Branch`; ``train_negatives`` > 0 (default 0,
    the paper's full softmax) trains every CE term, the mixture's included, as a sampled softmax
    over the target and the same ``train_negatives`` items per step (`p2pmoe.models.sampled_softmax`).
    """

    # Buffers and submodules by type (nn.Module's attribute lookup is typed `Tensor | Module`).
    adjacency: Tensor
    available: Tensor
    step: Tensor
    branches: nn.ModuleList
    experts: nn.ModuleList
    gate: nn.Module | None

    def __init__(
        self,
        num_items: int,
        num_domains: int,
        domain_index: int,
        adjacency: Tensor,
        max_len: int = 16,
        hidden: int = 256,
        heads: int = 4,
        blocks: int = 2,
        dropout: float = 0.3,
        vae: bool = False,
        kl_cap: float = 1.0,
        kl_anneal_steps: int = 10_000,
        contrastive_weight: float = 0.1,
        temperature: float = 1.0,
        gate: str = "learned",
        gate_pooling: str = "sequence",
        gate_hidden: tuple[int, int] = (1024, 512),
        head: str = "linear",
        init: str = "sasrec",
        graph: bool = True,
        input_norm: bool = True,
        train_negatives: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= domain_index < num_domains:
            raise ValueError(f"domain_index {domain_index} is not one of {num_domains} domains")
        if gate not in GATES or gate_pooling not in GATE_POOLINGS or head not in HEADS or init not in INITS:
            raise ValueError(f"gate must be one of {GATES}, gate_pooling one of {GATE_POOLINGS}, head one of {HEADS} and init one of {INITS}")
        if adjacency.shape != (num_items + 1, num_items + 1) or not adjacency.is_sparse:
            raise ValueError(f"adjacency must be a sparse [{num_items + 1}, {num_items + 1}] tensor")
        self.num_items = num_items
        self.pad_index = num_items
        self.num_domains = num_domains
        self.domain_index = domain_index
        self.dropout = dropout
        self.vae = vae
        self.kl_cap, self.kl_anneal_steps = kl_cap, kl_anneal_steps
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.gate_pooling = gate_pooling
        self.train_negatives = train_negatives
        self.register_buffer("adjacency", adjacency.coalesce(), persistent=False)
        self.register_buffer("available", torch.arange(num_domains) == domain_index)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.branches = nn.ModuleList(Branch(num_items, max_len, hidden, head, init, graph, input_norm) for _ in range(num_domains))
        self.experts = nn.ModuleList(Expert(max_len, hidden, heads, blocks, dropout, vae) for _ in range(num_domains))
        self.gate = None
        if gate == "learned":
            h1, h2 = gate_hidden
            self.gate = nn.Sequential(
                nn.Linear(num_domains * hidden, h1),
                nn.GELU(),
                nn.LayerNorm(h1),
                nn.Dropout(dropout),
                nn.Linear(h1, h2),
                nn.GELU(),
                nn.LayerNorm(h2),
                nn.Dropout(dropout),
                nn.Linear(h2, num_domains),
            )
        for i, expert in enumerate(self.experts):
            expert.requires_grad_(i == domain_index)

    # -- experts on the wire -----------------------------------------------------------------

    def branch(self, i: int) -> Branch:
        """Branch i, typed (a ModuleList hands out plain modules)."""
        branch = self.branches[i]
        assert isinstance(branch, Branch)
        return branch

    def expert(self, i: int) -> Expert:
        """Expert i, typed."""
        expert = self.experts[i]
        assert isinstance(expert, Expert)
        return expert

    def expert_state(self, i: int) -> dict[str, Tensor]:
        """Expert i's tensors (``mu.*`` and, with ``vae``, ``logvar.*``), detached CPU copies."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.experts[i].state_dict().items()}

    def set_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        """Load domain i's expert into branch i and make the branch available.

        Raises ValueError (a ProtocolError for a name, shape or dtype mismatch) and changes
        nothing unless every tensor matches and is finite.
        """
        check_like(state, self.experts[i].state_dict())
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            raise ValueError(f"expert {i} holds NaN or infinite values")
        self.experts[i].load_state_dict(state)
        self.available[i] = True

    # -- forward pieces ----------------------------------------------------------------------

    def live_branches(self) -> list[int]:
        return [i for i in range(self.num_domains) if bool(self.available[i])]

    def kl_weight(self) -> float:
        """β_KL(step) = min(cap, step / anneal steps); 0 without the KL term."""
        return min(self.kl_cap, int(self.step) / self.kl_anneal_steps) if self.vae else 0.0

    def _gate_weights(self, reps: dict[int, Tensor]) -> Tensor:
        """Gate weights ``[R, K]`` (R = rows of ``reps``, or 1 with batch pooling) over the
        stop-gradient representations ``reps[i]`` ``[R, d]`` of the available branches."""
        like = next(iter(reps.values()))
        if self.gate is None:
            return (self.available / self.available.sum()).to(like.dtype).unsqueeze(0)
        x = torch.cat([reps[i].detach() if i in reps else torch.zeros_like(like) for i in range(self.num_domains)], dim=-1)
        if self.gate_pooling == "batch":
            x = x.mean(dim=0, keepdim=True)
        return self.gate(x).masked_fill(~self.available, float("-inf")).softmax(dim=-1)

    def _permuted(self, inputs: Tensor, pad_mask: Tensor) -> Tensor:
        """Each row's items in a random order, padding left where it was."""
        keys = torch.rand(inputs.shape, device=inputs.device).masked_fill(pad_mask, -1.0)
        return inputs.gather(1, keys.argsort(dim=1))

    @staticmethod
    def _mixture(weights: Tensor, logits: dict[int, Tensor]) -> Tensor:
        """``ℓ_moe = Σ_i g_i · sg(ℓ_i)``: gate weights ``[P, K]`` (or ``[1, K]``, shared by all
        rows) times each live branch's logits ``[P, items]``; only the weights get a gradient."""
        live = list(logits)
        return _GatedSum.apply(weights[:, live], *(logits[i].detach() for i in live))

    def _position_weights(self, weights: Tensor, rows: Tensor) -> Tensor:
        """Gate weights per predicted position: a sequence's weights at each of its positions
        (``rows`` = the sequence of each position); batch and position pooling already fit."""
        return weights[rows] if self.gate is not None and self.gate_pooling == "sequence" else weights

    def loss_terms(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Unweighted terms: ``ce`` (Σ_i over available branches), ``ce_moe``, ``kl`` (Σ_i, with
        the KL term only) and ``contrastive`` (Σ_i, when its weight is non-zero)."""
        return self._terms_and_gate(batch)[0]

    def _terms_and_gate(self, batch: SequenceBatch) -> tuple[dict[str, Tensor], Tensor]:
        """`loss_terms` and the gate weights used at the predicted positions (``[P, K]``, or
        ``[1, K]`` when one vector serves the whole batch), detached.

        A branch's μ stack encodes the sequences and their permuted views in one call (the
        views stacked under the batch): rows do not interact in the encoder, so this is the
        two calls' result at the cost of about one and a half.
        """
        keep = ~batch.pad_mask
        targets = batch.targets[keep]
        rows = keep.nonzero()[:, 0]
        b = batch.inputs.shape[0]
        seqs = batch.inputs
        if self.contrastive_weight:
            seqs = torch.cat([seqs, self._permuted(batch.inputs, batch.pad_mask)])
        pad_mask = seqs == self.pad_index
        negatives = draw_train_negatives(self.num_items, self.train_negatives, seqs.device) if self.train_negatives else None

        def scores(branch: Branch, z: Tensor) -> Tensor:
            return branch.scores(z) if negatives is None else branch.sampled_scores(z, targets, negatives)

        def cross_entropy(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits, targets) if negatives is None else sampled_cross_entropy(logits, targets, negatives)

        terms: dict[str, Tensor] = {}
        logits: dict[int, Tensor] = {}
        reps: dict[int, Tensor] = {}
        for i in self.live_branches():
            branch, expert = self.branch(i), self.expert(i)
            x = branch.embed(branch.item_table(self.adjacency), seqs, self.dropout)
            mu = expert.mu(x, pad_mask)
            z = mu[:b][keep]
            logits[i] = scores(branch, z)
            terms["ce"] = terms.get("ce", 0) + cross_entropy(logits[i])
            reps[i] = z if self.gate_pooling == "position" else mu[:b, -1]
            if self.vae:
                assert expert.logvar is not None  # built exactly when vae is
                logvar = expert.logvar(x[:b], batch.pad_mask)[keep]
                kl = -0.5 * (1 + logvar - z.pow(2) - logvar.exp()).sum(dim=-1).mean()
                terms["kl"] = terms.get("kl", 0) + kl
            if self.contrastive_weight:
                terms["contrastive"] = terms.get("contrastive", 0) + nt_xent(mu[:b, -1], mu[b:, -1], self.temperature)
        weights = self._position_weights(self._gate_weights(reps), rows)
        terms["ce_moe"] = cross_entropy(self._mixture(weights, logits))
        return terms, weights.detach()

    def loss(self, batch: SequenceBatch) -> tuple[Tensor, dict[str, float]]:
        """``Σ_i CE_i + CE_moe + β_KL(step)·Σ_i KL_i + β·Σ_i InfoNCE_i``, and the terms, the KL
        weight and the gate's mean weights over the batch's predictions (`_gate_stats`, prefix
        ``gate``) as statistics.

        Each call in training mode counts as one optimisation step for the KL annealing.
        """
        terms, gate = self._terms_and_gate(batch)
        beta_kl = self.kl_weight()
        total = terms["ce"] + terms["ce_moe"]
        if "kl" in terms:
            total = total + beta_kl * terms["kl"]
        if "contrastive" in terms:
            total = total + self.contrastive_weight * terms["contrastive"]
        if self.training:
            self.step += 1
        stats = {name: float(t.detach()) for name, t in terms.items()}
        return total, {**stats, "kl_weight": beta_kl, **self._gate_stats("gate", gate.mean(dim=0))}

    def _gate_stats(self, prefix: str, mean_weights: Tensor) -> dict[str, float]:
        """``<prefix>/<i>``: mean gate weight of branch i (domain i); ``<prefix>/own``: of
        this client's own branch, the one figure that can be averaged over clients."""
        stats = {f"{prefix}/{i}": float(w) for i, w in enumerate(mean_weights)}
        return {**stats, f"{prefix}/own": stats[f"{prefix}/{self.domain_index}"]}

    def _last_reps(self, inputs: Tensor) -> dict[int, Tensor]:
        """Each live branch's representation ``[B, d]`` of ``inputs`` at the last position."""
        pad_mask = inputs == self.pad_index
        reps = {}
        for i in self.live_branches():
            branch = self.branch(i)
            x = branch.embed(branch.item_table(self.adjacency), inputs, self.dropout)
            reps[i] = self.expert(i).mu(x, pad_mask)[:, -1]
        return reps

    @torch.no_grad()
    def gate_weights(self, inputs: Tensor) -> Tensor:
        """The gate's weights ``[B, K]`` (``[1, K]`` with batch pooling or the uniform gate) for
        predicting the item after ``inputs`` ``[B, L]``; 0 for unavailable branches."""
        return self._gate_weights(self._last_reps(inputs))

    @torch.no_grad()
    def sequence_stats(self, inputs: Tensor) -> dict[str, Tensor]:
        """Per evaluated sequence ``[B]``: its gate weight on each branch (``gate_mean/<i>``,
        ``gate_mean/own``), for `NextItemLearner.evaluate` to average over a split."""
        weights = self.gate_weights(inputs).expand(inputs.shape[0], -1)
        stats = {f"gate_mean/{i}": weights[:, i] for i in range(self.num_domains)}
        return {**stats, "gate_mean/own": weights[:, self.domain_index]}

    def branch_logits(self, inputs: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        """Each live branch's logits ``[B, items]`` for the item after ``inputs`` and the gate's
        weights over the branches (as `gate_weights`): what the mixture combines."""
        reps = self._last_reps(inputs)
        return {i: self.branch(i).scores(z) for i, z in reps.items()}, self._gate_weights(reps)

    def score_candidates(self, inputs: Tensor, candidates: Tensor) -> Tensor:
        """Mixture logits ``ℓ_moe`` at the last position, gathered at ``candidates`` ``[B, C]``."""
        logits, weights = self.branch_logits(inputs)
        return self._mixture(weights, logits).gather(1, candidates)
