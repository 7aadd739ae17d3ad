"""`python -m oal.data fashion`: make Fashion-MNIST's idx files available offline (Debian's folder if installed,
else Debian's package fetched without root into the cache) and print what was found.

`python -m oal.data export NAME DEST [--config PRESET] [key=value ...]`: write an embedded benchmark (digits,
fashion) in the folder layout of `data.benchmark=folder`, with an imglist/ folder of lists for the same files, into
DEST (a new local folder, or an s3:// prefix); its split is the one PRESET (default: NAME's preset) and the
overrides give."""

from __future__ import annotations

import argparse
import sys

from oal.data import fashion


def fetch_fashion() -> int:
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


def export(argv: list[str]) -> int:
    from oal.config import ConfigError, load_config
    from oal.data.folder import export as write

    p = argparse.ArgumentParser(prog="python -m oal.data export", description=__doc__.split("\n\n")[1])
    p.add_argument("name", choices=["digits", "fashion"], help="the embedded benchmark")
    p.add_argument("dest", help="a new local folder, or an s3:// prefix")
    p.add_argument("--config", help="the preset whose data section chooses the split (default: NAME)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.split_seed=1")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config or args.name, args.overrides)
    except ConfigError as e:
        print(f"python -m oal.data export: {e}", file=sys.stderr)
        return 2
    if cfg.data.benchmark != args.name:
        print(f"python -m oal.data export: the preset's data.benchmark is {cfg.data.benchmark}, not {args.name}",
              file=sys.stderr)
        return 2
    try:
        counts = write(args.name, cfg.data, args.dest)
    except FileExistsError as e:
        print(f"python -m oal.data export: {e}", file=sys.stderr)
        return 2
    for k, n in counts.items():
        print(f"{k}: {n} images")
    print(f"{args.name} written to {args.dest} (folder layout; lists in {args.dest.rstrip('/')}/imglist). "
          f"Run it: oal pipeline --config folder data.root={args.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export(argv[1:])
    p = argparse.ArgumentParser(prog="python -m oal.data", description=__doc__)
    p.add_argument("dataset", choices=["fashion"], help="the dataset to make available (or: export, see above)")
    p.parse_args(argv)
    return fetch_fashion()


if __name__ == "__main__":
    raise SystemExit(main())
