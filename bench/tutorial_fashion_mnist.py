"""The FashionMNIST ResNet9 tutorial recipe as a plain PyTorch script: the baseline of
bench/time_to_accuracy.py.

Narrow ResNet9 (16-32-64-128), Adam, one-cycle max_lr 0.01, weight decay 1e-4, clip-by-value 0.1,
RandomCrop(28, padding=4, reflect) + horizontal flip + ToTensor + Normalize per sample (PIL),
batch 128, torchvision FashionMNIST + DataLoader (2 workers), 10 epochs; test accuracy after every
epoch, with the wall time (seconds since the script started) at which each epoch ended.

    .venv/bin/python bench/tutorial_fashion_mnist.py [--epochs 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from pathlib import Path

T0 = time.perf_counter()  # wall time counts from here, imports included

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms as T  # noqa: E402

HERE = Path(__file__).resolve().parent
IDX = Path("/usr/share/datasets/fashion-mnist")


def torchvision_root(root: Path) -> Path:
    """Lay the Debian IDX .gz files out as torchvision expects (root/FashionMNIST/raw/*-ubyte)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in IDX.glob("*-ubyte.gz"):
        out = raw / gz.name[:-3]
        if not out.exists():
            with gzip.open(gz) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
    return root


def conv_block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
              nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class ResNet9(nn.Module):
    def __init__(self, cin: int = 1, classes: int = 10, w=(16, 32, 64, 128)):
        super().__init__()
        self.prep = conv_block(cin, w[0])
        self.layer1 = conv_block(w[0], w[1], pool=True)
        self.res1 = nn.Sequential(conv_block(w[1], w[1]), conv_block(w[1], w[1]))
        self.layer2 = conv_block(w[1], w[2], pool=True)
        self.layer3 = conv_block(w[2], w[3], pool=True)
        self.res2 = nn.Sequential(conv_block(w[3], w[3]), conv_block(w[3], w[3]))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w[3], classes))

    def forward(self, x):
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        return self.head(x + self.res2(x))


@torch.no_grad()
def test_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return correct / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "tutorial.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    root = torchvision_root(HERE / "results" / "data" / "torchvision")
    norm = T.Normalize((0.2860,), (0.3530,))
    train_tf = T.Compose([T.RandomCrop(28, padding=4, padding_mode="reflect"),
                          T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train_ds = torchvision.datasets.FashionMNIST(root, train=True, transform=train_tf)
    test_ds = torchvision.datasets.FashionMNIST(root, train=False,
                                                transform=T.Compose([T.ToTensor(), norm]))
    train_dl = torch.utils.data.DataLoader(train_ds, 128, shuffle=True, num_workers=args.workers,
                                           persistent_workers=args.workers > 0)
    test_dl = torch.utils.data.DataLoader(test_ds, 256, num_workers=args.workers)
    model = ResNet9()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.01, epochs=args.epochs,
                                                steps_per_epoch=len(train_dl))
    loss_fn = nn.CrossEntropyLoss()
    epochs = []
    for epoch in range(1, args.epochs + 1):
        for x, y in train_dl:
            loss = loss_fn(model(x), y)
            loss.backward()
            nn.utils.clip_grad_value_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        acc = test_accuracy(model, test_dl)
        epochs.append({"epoch": epoch, "time": round(time.perf_counter() - T0, 2),
                       "test_acc": acc, "load1": os.getloadavg()[0]})  # machine contention
        print(f"epoch {epoch}: test_acc={acc:.4f} t={epochs[-1]['time']:.1f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": epochs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
