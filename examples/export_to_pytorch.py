#!/usr/bin/env python3
"""Rebuilds a network exported by `whvi export CK --mean OUT.safetensors` in PyTorch.

    whvi export pretrained:vgg11-x0.25-whvi-cifar10 --mean vgg.safetensors
    python3 examples/export_to_pytorch.py vgg.safetensors      # needs torch and safetensors

The export holds the posterior-mean weights (for WHVI layers the dense S1 H diag(mu) H S2),
named as in torchvision's VGG: features.N before the flatten, classifier.N after it. The
sidecar vgg.json describes every layer; this script builds the two nn.Sequential from it,
loads the weights strictly, and prints the logits of one normalised random image. Not run by
CI (it needs PyTorch).
"""
import json
import sys

import torch
from safetensors.torch import load_file
from torch import nn


def layer(spec):
    kind = spec["type"]
    if kind == "conv2d":
        return nn.Conv2d(spec["in"], spec["out"], spec["kernel"], spec["stride"], spec["padding"])
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"])
    if kind == "batch_norm2d":
        return nn.BatchNorm2d(spec["channels"], eps=spec["eps"])
    if kind == "relu":
        return nn.ReLU()
    if kind == "max_pool2d":
        return nn.MaxPool2d(spec["kernel"])
    if kind == "dropout":
        return nn.Dropout(spec["p"])
    raise ValueError(f"unknown layer type {kind}")


class Exported(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.features = nn.Sequential(*[layer(s) for s in arch["features"]])
        self.classifier = nn.Sequential(*[layer(s) for s in arch["classifier"]])

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def main(path):
    with open(path.rsplit(".", 1)[0] + ".json") as f:
        arch = json.load(f)
    model = Exported(arch)
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    c, h, w = arch["input"]
    x = torch.rand(1, c, h, w)
    norm = arch.get("normalization")
    if norm:
        x = (x - torch.tensor(norm["mean"]).view(1, c, 1, 1)) / torch.tensor(norm["std"]).view(1, c, 1, 1)
    with torch.no_grad():
        print(dict(zip(arch["class_names"], model(x).softmax(-1)[0].tolist())))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
