"""Write the example's calibration images and the one sample the firmware classifies.

    python make_data.py [DIR]   ->  DIR/calib.npy (64 x 1 x 16 x 16), DIR/sample.npy (1 sample)

Replace these by real data: `--calib` wants a few hundred representative inputs (N x C x H x W,
float32, the same preprocessing as in training).
"""

import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(2024)
np.save(out / "calib.npy", rng.standard_normal((64, 1, 16, 16), dtype=np.float32))
np.save(out / "sample.npy", rng.standard_normal((1, 1, 16, 16), dtype=np.float32))
