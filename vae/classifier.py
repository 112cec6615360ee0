"""A small CNN image classifier (of digits, for MNIST), the judge of sample quality (`task=generate`).

Trained on a run's raw training images (intensities in [0, 1], as E[x|t] is), it scores decoded
prior samples by how often it is confident about them, beside the same share on real test images.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Classifier(nn.Module):
    """images (B, C, H, W) -> class logits (B, num_classes).

    Two 3x3 convolutions, each followed by ReLU and 2x2 max pooling (H and W shrink by 4 in all),
    then one linear layer: enough for MNIST digits, and quick to train on a CPU.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, int] = (16, 32)
    ) -> None:
        super().__init__()
        image_channels, height, width = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(image_channels, channels[0], kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.logits = nn.Linear(channels[1] * (height // 4) * (width // 4), num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.features(images))


def init_parameters(classifier: nn.Module, generator: torch.Generator) -> None:
    """He-normal weights (for the ReLUs) and zero biases, drawn from `generator`, so the start
    point depends on the seed alone and not on whatever used the global random state before."""
    for layer in classifier.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(layer.bias)


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, epochs: int, seed: int, batch_size: int = 128
) -> nn.Module:
    """A `Classifier` fitted to images (N, C, H, W) in [0, 1] and labels (N,) by Adam on the
    cross-entropy, `epochs` passes in a shuffled order; in eval mode, on the images' device.

    The same seed gives the same classifier: the initial weights and every epoch's order come
    from one generator seeded with it (on the CPU; the weights move to the device after).
    """
    generator = torch.Generator().manual_seed(seed)
    classifier = Classifier(tuple(images.shape[1:]), num_classes)
    init_parameters(classifier, generator)
    classifier.to(images.device).train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for index in order.split(batch_size):
            loss = F.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval()


@torch.no_grad()
def class_probabilities(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """softmax(logits) (N, num_classes) for images (N, C, H, W), a batch at a time."""
    return torch.cat([F.softmax(classifier(batch), dim=1) for batch in images.split(batch_size)])


def accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """The share of images whose most probable class is their label."""
    predicted = class_probabilities(classifier, images, batch_size).argmax(1)
    return (predicted == labels.to(predicted.device)).float().mean().item()


def confident_share(
    classifier: nn.Module, images: Tensor, threshold: float = 0.9, batch_size: int = 1000
) -> tuple[float, Tensor]:
    """(the share of images whose top class probability exceeds `threshold`, the counts
    (num_classes,) of the predicted classes among those confident images).

    The share alone would be high for a model that draws one digit well every time; the
    counts show how the confident images spread over the classes.
    """
    probabilities = class_probabilities(classifier, images, batch_size)  # (N, num_classes)
    top_probability, predicted = probabilities.max(1)
    confident = top_probability > threshold
    counts = torch.bincount(predicted[confident], minlength=probabilities.shape[1]).cpu()
    return confident.sum().item() / len(images), counts
