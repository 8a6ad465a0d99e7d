"""Models shared by the methods: sequence encoders, gates, experts, mixtures, a CNN (LoRA comes from peft, see text_lora)."""

from p2pmoe.models.cnn import CNNEmbedder
from p2pmoe.models.experts import MLP, MLPExpert
from p2pmoe.models.fmoe_cdsr import FMoECDSR
from p2pmoe.models.gates import GATE_KINDS, DenseGate, Gate, NoisyGate, TopKGate, make_gate
from p2pmoe.models.mmoe import MMoE
from p2pmoe.models.moe import MixtureOfExperts, MoEClassifier
from p2pmoe.models.sasrec import SASRec, SASRecEncoder

__all__ = [
    "CNNEmbedder",
    "DenseGate",
    "FMoECDSR",
    "GATE_KINDS",
    "Gate",
    "MLP",
    "MLPExpert",
    "MMoE",
    "MixtureOfExperts",
    "MoEClassifier",
    "NoisyGate",
    "SASRec",
    "SASRecEncoder",
    "TopKGate",
    "make_gate",
]
