"""The demo network: a small MLP trained on scikit-learn's bundled digits data (no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train_digits_mlp(seed: int = 0, epochs: int = 300, hidden: int = 32) -> tuple[nn.Module, float]:
    """Train ``64-hidden-hidden-10`` ReLU MLP on sklearn's digits (full-batch Adam, a few seconds on a CPU).

    Returns the model (eval mode, float32) and its test accuracy.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return model, acc
