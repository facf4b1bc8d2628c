"""Extract the UCI optical handwritten digits from scikit-learn into flctl's package data.

Kept for provenance: flctl ships the resulting `digits.npz` so that neither the
workstation nor the hosts need scikit-learn at run time. Re-running it must
reproduce the bundled file's arrays bit for bit.

Usage: python scripts/make_digits.py [--out flctl/data/digits.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "flctl" / "data" / "digits.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from sklearn.datasets import load_digits  # only this script needs scikit-learn

    bunch = load_digits()
    x = np.asarray(bunch.data)
    y = np.asarray(bunch.target)
    # Pixel counts are integers 0..16 and labels 0..9: uint8 is lossless and 4x smaller.
    if not (np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= 16):
        raise SystemExit("unexpected pixel values in scikit-learn digits")
    x8 = x.astype(np.uint8)
    y8 = y.astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x=x8, y=y8)
    print(f"wrote {args.out}: x {x8.shape} {x8.dtype}, y {y8.shape} {y8.dtype}, "
          f"classes {np.bincount(y8).tolist()}")


if __name__ == "__main__":
    main()
