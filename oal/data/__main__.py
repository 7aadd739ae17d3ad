"""`python -m oal.data fashion`: make Fashion-MNIST's idx files available offline (Debian's folder if installed,
else Debian's package fetched without root into the cache) and print what was found."""

from __future__ import annotations

import argparse

from oal.data import fashion


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oal.data", description=__doc__)
    p.add_argument("dataset", choices=["fashion"], help="the dataset to make available")
    p.parse_args(argv)
    try:
        d = fashion.find_dir(None)
    except FileNotFoundError:
        print(f"fetching Debian's {fashion.DEBIAN_PACKAGE} into {fashion.cache_dir()} ...", flush=True)
        d = fashion.fetch()
    for split in ("train", "test"):
        x, y = fashion.load_split(d, split)
        print(f"{split}: {len(x)} images {x.shape[1]}x{x.shape[2]}, classes {sorted(set(y.tolist()))}")
    print(f"Fashion-MNIST idx files: {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
