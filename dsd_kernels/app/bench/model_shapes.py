"""Parameter shapes of real models that the bench cases time ops over."""
from __future__ import annotations


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """Conv and fc weight shapes of torchvision's ResNet-50 (25.5M weights)."""
    shapes = [(64, 3, 7, 7)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                shapes.append((width * 4, in_ch, 1, 1))  # downsample
            in_ch = width * 4
    return shapes + [(1000, 2048)]
