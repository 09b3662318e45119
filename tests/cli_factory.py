"""A model factory for the CLI tests: ``qcompile explain cli_factory:build``."""

import torch
from torch import nn

import qcompile


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    qcompile.quantize(model, "w8a16", skip=["2"])
    return model, torch.randn(3, 64)


def not_a_pair():
    return 3
