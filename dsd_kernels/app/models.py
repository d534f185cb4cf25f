"""The default models of `dsd-kernels train`: an MLP and a small 1-D CNN (MNIST-1D), a small
2-D CNN (scikit-learn's 8x8 digits)."""
from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "cnn", "cnn2d")
# the data each model trains on unless --data names one for all of them
MODEL_DATA = {"mlp": "mnist1d", "cnn": "mnist1d", "cnn2d": "digits"}


def build_model(name: str, num_features: int, num_classes: int) -> nn.Module:
    if name == "mlp":  # 40-512-512-10 on MNIST-1D
        return nn.Sequential(nn.Linear(num_features, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, num_classes))
    if name == "cnn":
        length = num_features
        for _ in range(2):
            length = (length + 2 - 3) // 2 + 1  # stride-2 convs, kernel 3, padding 1
        return nn.Sequential(
            nn.Unflatten(1, (1, num_features)),
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * length, 128), nn.ReLU(), nn.Linear(128, num_classes))
    if name == "cnn2d":  # square images, one channel: digits' 8x8
        side = math.isqrt(num_features)
        if side * side != num_features or side < 4:
            raise ValueError(f"--model cnn2d needs square images (features = side^2, side >= 4), "
                             f"the data has {num_features} features")
        half = (side + 1) // 2  # the stride-2 conv
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * half * half, 64), nn.ReLU(), nn.Linear(64, num_classes))
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")


def prunable_layers(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} for every parameter of 2 or more dims (what DSD prunes)."""
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}
