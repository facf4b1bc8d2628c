"""A plain PyTorch script: a small CNN on the UCI digits (8x8 images), trained
on one machine. digits_cnn.py next to it federates this script with flctl;
the example's README shows the difference.

    python train_central.py DATA.npz [--epochs 30] [--seed 0]

DATA.npz holds x_train (N x 64, values in [0, 1]), y_train, x_test, y_test
(`flctl init --local N` writes data/pooled.npz in this form).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2))
        self.classify = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                      nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def load_data(path: str, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    with np.load(path) as data:
        def part(x: str, y: str, shuffle: bool) -> DataLoader:
            images = torch.from_numpy(data[x].astype(np.float32).reshape(-1, 1, 8, 8))
            labels = torch.from_numpy(data[y].astype(np.int64))
            return DataLoader(TensorDataset(images, labels), batch_size=batch_size,
                              shuffle=shuffle)
        return part("x_train", "y_train", True), part("x_test", "y_test", False)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
          device: torch.device) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total = count = 0.0
    for _ in range(epochs):
        total = count = 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
    return total / max(count, 1)


def test(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            count += len(labels)
    return loss / count, correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_loader, test_loader = load_data(args.data)
    model = Net().to(device)
    train(model, train_loader, args.epochs, args.lr, device)
    loss, accuracy = test(model, test_loader, device)
    print(f"test loss {loss:.4f}, accuracy {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main()
