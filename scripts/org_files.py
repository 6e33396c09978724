"""Demo data for the partition = "own" example: three organisations' own CSV files cut from the AG News copy.

    python scripts/org_files.py runs/orgs        # runs/orgs/org0.csv, org1.csv, org2.csv

Organisation i holds 800 training-split rows, 80% of them of class i (the seed protocol's skew); each file
has the data directory's columns (label,title,description), so any organisation's real file with those
columns works the same way. The files are disjoint. Then:

    fedslip deploy-local --workdir runs/three_orgs --config configs/three_orgs.toml
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from fedslip.partition import counts_for

ROWS, DOMINANT = 800, 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FEDSLIP_DATA_DIR",
                                                                             "../shared/data/ag_news")))
    args = parser.parse_args()
    train = pd.read_csv(args.data_dir / "train.csv.gz", keep_default_na=False)
    args.out.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()
    for org in range(3):
        shares = np.full(4, (1 - DOMINANT) / 3)
        shares[org] = DOMINANT
        picks = [train[(train.label == k) & ~train.index.isin(used)].head(n)
                 for k, n in enumerate(counts_for(shares, ROWS))]
        rows = pd.concat(picks).sample(frac=1, random_state=org)
        used |= set(rows.index)
        rows.to_csv(args.out / f"org{org}.csv", index=False)
        counts = rows.label.value_counts().sort_index().tolist()
        print(f"{args.out / f'org{org}.csv'}: {len(rows)} rows, per class {counts}")


if __name__ == "__main__":
    main()
