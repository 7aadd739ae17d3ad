"""`oal`: single-process command line (no Ray). `oal <command> --config PRESET key=value ...`"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from oal import config as C

_PACKAGE = Path(__file__).resolve().parent
# Each stage's subcommand is its name (its folder, its MLflow run), in pipeline order (`oal.registry.STAGES`; its
# help here, so that `oal --help` and a config error need no torch). A stage of the registry not listed here runs
# as `oal <name>` too. The names these subcommands had before, each one clear error naming the new one.
STAGE_HELP = {
    "base": "train the student with cross-entropy alone (the CE baseline; the OAL student's start)",
    "teacher": "fine-tune the teacher on the ID training set",
    "diffusion": "train the built-in latent diffusion model on the ID images (diffusion.model=builtin-ldm)",
    "embeddings": "teacher features of the ID training set, by class [C, N, D]",
    "anchors": "class anchors from the diffusion text encoder, and the teacher->conditioning projection",
    "knn": "k-NN boundary outlier embeddings [C, M, E]",
    "latents": "latent outliers from the diffusion model (never decoded for training)",
    "student": "train the OAL student (needs a teacher checkpoint for KD and outlier files for MICL)",
    "eval": "score a student checkpoint on the ID and OOD test sets (--of base: the base stage's, into eval_base)",
    "detector": "package the evaluated student as a deployable OOD detector (score chosen on validation, threshold)",
}
RENAMED = {"embed": "embeddings", "synthesize": "latents", "train": "student", "evaluate": "eval"}


def _parser(extra_stage: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oal", description="Outlier-aware learning for OOD detection (single process).")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {**STAGE_HELP, "pipeline": "all stages in order, skipping those already done",
             "config": "print the resolved config"}
    if extra_stage:
        helps[extra_stage] = f"the {extra_stage} stage (oal.registry)"
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", "-c", default="digits", help="preset name or YAML path (default: digits)")
        s.add_argument("--force", action="store_true", help="redo the stage even if its outputs are up to date")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "config":
            s.add_argument("--help-keys", action="store_true",
                           help="list every config key with its type, default, accepted values and meaning")
        if name == "eval":
            s.add_argument("--checkpoint", help="checkpoint to score (default: <run>/<--of>/checkpoint.pt)")
            s.add_argument("--of", choices=("student", "base"), default="student",
                           help="whose checkpoint: the OAL student's or the base (CE) student's")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.epochs=3 loss.w_micl_knn=0")
    text = "run a detector over image files on this machine; one line per file (JSON)"
    s = sub.add_parser("score", help=text, description=text)
    s.add_argument("--model", required=True,
                   help="a detector folder (<run>/detector/model) or an MLflow model URI (models:/oal-fashion@candidate)")
    s.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv else ""
    if first in RENAMED:
        print(f"oal: `oal {first}` is now `oal {RENAMED[first]}`: a stage's subcommand is its name (the folder it "
              f"writes, its MLflow run)", file=sys.stderr)
        return 2
    extra = None
    if first and not first.startswith("-") and first not in (*STAGE_HELP, "pipeline", "config", "score"):
        from oal import registry  # a stage of the registry without a line above: its name is its subcommand

        try:
            extra = registry.named(first).name
        except ValueError as e:
            print(f"oal: {e}, and the commands pipeline, config, score", file=sys.stderr)
            return 2
    args = _parser(extra).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "score":
        return score(args.model, args.files)
    if args.command == "config" and args.help_keys:
        print(C.help_keys())
        return 0
    try:
        cfg = C.load_config(args.config, args.overrides)
    except C.ConfigError as e:
        print(f"oal: config error: {e}", file=sys.stderr)
        return 2
    from oal import storage

    if args.command != "config":
        try:
            storage.check_bucket(cfg.output_dir)
        except ValueError as e:
            print(f"oal: storage error: {e}", file=sys.stderr)
            return 2
        try:  # a given input that does not exist (e.g. data.root): now, not after the stages before it
            C.absolute_paths(cfg)
        except C.ConfigError as e:
            print(f"oal: config error: {e}", file=sys.stderr)
            return 2
    from oal import registry  # torch and the rest: only once the config is known to be good
    from oal.data import DataError

    progress = not args.no_progress
    try:
        if args.command == "config":
            print(C.to_yaml(cfg), end="")
        elif args.command == "eval":
            res, _ = registry.evaluate(cfg, checkpoint=args.checkpoint, force=args.force, of=args.of)
            _show(res)
            print(storage.pull(res.outputs["table"]).read_text())
        elif args.command != "pipeline":
            _show(registry.run_stage(args.command, cfg, progress=progress, force=args.force))
        else:
            results = registry.run_pipeline(cfg, progress=progress)
            for r in results.values():
                _show(r)
            print(storage.pull(results["eval"].outputs["table"]).read_text())
            print((cfg.run_dir / "results.md").read_text())
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # a fault inside torch or a dependency: its traceback is the useful part. A DataError names its file in one
        # line, also when a DataLoader worker raised it (torch re-raises it from its own frame)
        if not _raised_by_us(e) and not isinstance(e, DataError):
            traceback.print_exc()
        print(f"oal {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def score(model: str, files: list[str]) -> int:
    """`oal score`: the detector's answer for each file, one JSON line each (unreadable files included, with their
    error); exit 1 if any file could not be scored."""
    import json

    from oal.detector import Detector

    try:
        if Path(model).is_dir():
            det = Detector.load(model)
        else:
            import mlflow

            det = mlflow.pyfunc.load_model(model).unwrap_python_model().detector
    except Exception as e:  # a wrong path or URI, a registry that cannot be reached
        print(f"oal score: error: cannot load the detector '{model}': {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        return 2
    images: list = []
    for f in files:
        try:
            images.append(Path(f).read_bytes())
        except OSError as e:
            images.append(f"cannot read: {e.strerror}")  # not base64: becomes that row's error
    out = det.predict(images)
    for i, f in enumerate(files):
        row = {k: out[k][i] for k in out}
        if isinstance(images[i], str):
            row["error"] = f"'{f}': {images[i]}"
        print(json.dumps({"file": f, **row}))
    return 1 if any(e is not None for e in out["error"]) else 0


def _raised_by_us(e: BaseException) -> bool:
    """True when the innermost frame of `e`'s traceback is in this package: a deliberate, self-explaining error."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def _show(r) -> None:
    state = "skipped (up to date)" if r.skipped else "done"
    outs = ", ".join(f"{k}={v}" for k, v in r.outputs.items())
    print(f"[{r.name}] {state}: {outs}")


if __name__ == "__main__":
    sys.exit(main())
