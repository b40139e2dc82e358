"""Data sets that exist on this machine without a download.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under
/usr/share/datasets/fashion-mnist); digits from scikit-learn, which ships them.
Both are returned as (x_train, y_train, x_test, y_test): float32 N x 1 x H x W in [0, 1], int64.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from codegen.core.errors import QaccError

FASHION_DIR = Path(os.environ.get("QACC_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> Split:
    files = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not (FASHION_DIR / f).exists()]
    if missing:
        raise QaccError(
            f"Fashion-MNIST not found in {FASHION_DIR}; install the Debian package "
            "dataset-fashion-mnist (make setup does)"
        )
    a = {k: _idx(FASHION_DIR / f) for k, f in files.items()}

    def images(v: np.ndarray) -> np.ndarray:
        return (v.astype(np.float32) / 255.0)[:, None, :, :]

    return images(a["xtr"]), a["ytr"].astype(np.int64), images(a["xte"]), a["yte"].astype(np.int64)


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1797 images), scaled to [0, 1], with a fixed shuffled split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]
