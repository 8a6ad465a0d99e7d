"""The image learner's optimiser: torch's SGD update without torch's SGD class."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from p2pmoe.learners.vision import MomentumSGD


def test_momentum_sgd_matches_torch_sgd_bit_for_bit_and_skips_unused_parameters():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 3))
    theirs = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 3))
    theirs.load_state_dict(ours.state_dict())
    a = MomentumSGD(list(ours.parameters()), lr=0.05, momentum=0.9)
    b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        x = torch.randn(8, 6)
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            out = model[:3](x) if step % 2 else model(x)  # odd steps leave the last layer without a gradient
            out.pow(2).mean().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    assert a.buffers[-1] is not None  # the last layer's momentum survives the steps it sat out


def test_training_an_image_learner_does_not_import_torch_dynamo():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from p2pmoe.learners.vision import ImageClassifierLearner\n"
        "x = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8); y = torch.randint(0, 2, (32,))\n"
        "ImageClassifierLearner(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (x, y), (x, y), batch_size=8).train(1)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
