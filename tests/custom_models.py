"""Models for tests/models/test_byo_models.py, imported through ``model.factory`` (``tests.custom_models:tiny_net``)."""
import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """Two conv blocks with a residual addition, global pooling and a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_net(num_classes: int, in_channels: int = 3, width: int = 8) -> nn.Module:
    return TinyNet(num_classes, in_channels, width)


def rgb_only(num_classes: int, width: int = 8) -> nn.Module:
    """A factory without ``in_channels``: kdprune repeats single-channel data to 3 channels for it."""
    return TinyNet(num_classes, 3, width)
