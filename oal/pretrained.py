"""Pretrained built-in diffusion models (`diffusion.model=builtin-ldm`), so that a run need not train one.

A pretrained model is a folder: `model.safetensors` (the UNet, autoencoder and text encoder weights, fp16, nothing
that runs code) and `README.md`, its model card, whose YAML front matter says what the weights are for: the
benchmark and split they were trained on (and that split's fingerprint), the ID class names, the image size, the
prompt, the training recipe and steps, the class-conditional accuracy measured on the shipped weights, the
command that made them and the weights' sha256. `ldm.pretrained` names one: a folder, or the name of one shipped
in `oal/weights/` (`fashion-ldm`, used by the fashion preset).

The diffusion stage uses it instead of training only when the card matches the run (weights' sha256, split
fingerprint, class names, image size, prompt); any mismatch trains as before, after one log line saying why. It
measures the model either way (class-conditional accuracy, grid). `python -m oal.pretrained export` writes a
folder from a finished diffusion stage.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from oal import config as C
from oal.storage import atomic_path, load_torch, save_torch, sha256

log = logging.getLogger("oal.pretrained")

SHIPPED = Path(__file__).parent / "weights"
WEIGHTS = "model.safetensors"
CARD = "README.md"
MODULES = ("unet", "vae", "text_encoder")


def split_fp(data: C.DataConfig) -> str:
    """What chooses the ID training images (and so which images a model trained on them has seen): the benchmark,
    its split seed and per-class cap, and the image size. Not the folder it is read from, nor batch sizes."""
    return C.fingerprint("split", data.benchmark, data.openood_root is not None, data.split_seed,
                         data.train_per_class, data.image_size)


def folder(name: str) -> Path:
    """`ldm.pretrained` as a folder: a shipped model's name, or a path."""
    shipped = SHIPPED / name
    return shipped if "/" not in name and shipped.is_dir() else Path(name).expanduser()


def read_card(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (between the first two `---` lines)."""
    text = path.read_text()
    parts = text.split("---\n", 2)
    if not text.startswith("---\n") or len(parts) < 3:
        raise ValueError(f"model card '{path}' has no YAML front matter (a '---' line, the fields, a '---' line)")
    card = yaml.safe_load(parts[1])
    if not isinstance(card, dict):
        raise ValueError(f"model card '{path}': its front matter is not a mapping")
    return card


def card_of(cfg: C.OALConfig) -> dict[str, Any] | None:
    """The card of `ldm.pretrained`, or None (not set, or no readable card: `check` says why)."""
    if cfg.ldm.pretrained is None:
        return None
    try:
        return read_card(folder(cfg.ldm.pretrained) / CARD)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def check(cfg: C.OALConfig, class_names: list[str] | None = None) -> tuple[Path | None, str]:
    """(the weights file, "") when `ldm.pretrained` fits this run, else (None, why not; "" when it is not set).
    `class_names`: the benchmark's, where it is built (the split fingerprint already covers the benchmark)."""
    if cfg.ldm.pretrained is None:
        return None, ""
    d = folder(cfg.ldm.pretrained)
    weights = d / WEIGHTS
    try:
        card = read_card(d / CARD)
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"its model card cannot be read ({e})"
    if not weights.is_file():
        return None, f"'{weights}' does not exist"
    wanted = {"split_fingerprint": split_fp(cfg.data), "image_size": cfg.data.image_size,
              "prompt": cfg.diffusion.prompt, "model": "builtin-ldm"}
    if class_names is not None:
        wanted["class_names"] = list(class_names)
    for key, value in wanted.items():
        if card.get(key) != value:
            return None, f"its card's {key} is {card.get(key)!r}, this run's is {value!r}"
    digest = sha256(weights)
    if card.get("sha256") != digest:
        return None, f"'{weights}' has sha256 {digest}, its card says {card.get('sha256')}"
    return weights, ""


def usable(cfg: C.OALConfig, class_names: list[str] | None = None) -> Path | None:
    """`check`, with one log line when a pretrained model is set but not used (the stage then trains)."""
    weights, why = check(cfg, class_names)
    if why:
        log.warning("diffusion: ldm.pretrained=%s is not used, %s; training the model instead", cfg.ldm.pretrained,
                    why)
    return weights


def to_checkpoint(weights: Path, card: dict[str, Any], fingerprint: str, path: Path) -> None:
    """Write the pretrained weights as the diffusion stage's checkpoint (fp32, the layout `oal.ldm.load_trained`
    reads), its meta naming where they came from."""
    from safetensors.torch import load_file

    flat = load_file(str(weights))
    modules: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODULES}
    for key, tensor in flat.items():
        module, name = key.split(".", 1)
        modules[module][name] = tensor.float()
    save_torch({"modules": modules, "epoch": card["training"]["vae_epochs"] + card["training"]["epochs"],
                "history": [], "resumed_from_epoch": 0, "scaling_factor": float(card["scaling_factor"]),
                "meta": {"kind": "builtin-ldm", "image_size": card["image_size"], "seed": card["seed"],
                         "class_names": card["class_names"], "prompt": card["prompt"], "fingerprint": fingerprint,
                         "pretrained": {"weights": str(weights), "sha256": card["sha256"]}}}, path)


def export(stage_dir: Path, out: Path, command: str, note: str = "") -> dict[str, Any]:
    """A pretrained folder from a finished diffusion stage (its checkpoint, config.yaml and quality.json): fp16
    weights, then the card (last)."""
    import json

    from safetensors.torch import save_file

    state = load_torch(stage_dir / "checkpoint.pt", "builtin-ldm checkpoint")
    meta = state["meta"]
    if meta.get("kind") != "builtin-ldm" or state.get("scaling_factor") is None:
        raise ValueError(f"'{stage_dir}' holds no finished builtin-ldm checkpoint")
    cfg = C.from_dict(yaml.safe_load((stage_dir / "config.yaml").read_text()))
    quality = json.loads((stage_dir / "quality.json").read_text())
    flat = {f"{m}.{k}": v.half().contiguous() for m in MODULES for k, v in state["modules"][m].items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(flat, str(tmp), metadata={"format": "pt", "model": "builtin-ldm"})
    ldm = asdict(cfg.ldm)
    ldm.pop("pretrained", None)
    history = state.get("history", [])
    card = {"model": "builtin-ldm", "library_name": "oal", "weights": WEIGHTS, "dtype": "float16",
            "sha256": sha256(out / WEIGHTS), "bytes": (out / WEIGHTS).stat().st_size,
            "benchmark": cfg.data.benchmark, "split_seed": cfg.data.split_seed,
            "train_per_class": cfg.data.train_per_class, "image_size": meta["image_size"],
            "split_fingerprint": split_fp(cfg.data), "class_names": list(meta["class_names"]),
            "prompt": meta["prompt"], "seed": meta["seed"], "scaling_factor": float(state["scaling_factor"]),
            "training": {**ldm, "epochs_done": state["epoch"],
                         "seconds": round(sum(h.get("epoch_seconds", 0.0) for h in history), 1)},
            "command": command, **({"note": note} if note else {})}
    card["measured"] = {"note": "the stage's own measurement of the fp32 weights; make demo measures the fp16 ones",
                        "class_conditional_accuracy": quality["accuracy"], "samples_per_class": quality.get(
                            "samples_per_class"), "teacher_val_accuracy": quality.get("teacher_val_accuracy"),
                        "steps": quality.get("steps"), "guidance_scale": quality.get("guidance_scale"),
                        "scheduler": quality.get("scheduler")}
    write_card(card, out / CARD)
    return card


def write_card(card: dict[str, Any], path: Path) -> None:
    front = yaml.safe_dump(card, sort_keys=False, width=120)
    name = path.parent.name
    fp16 = card["measured"].get("fp16_class_conditional_accuracy")
    fp16 = f", {fp16:.3f} for these fp16 ones" if fp16 is not None else ""
    body = f"""# {name}

The built-in latent diffusion model (`diffusion.model=builtin-ldm`, `oal/ldm.py`) trained by this project's own
`diffusion` stage on the {card['benchmark']} benchmark's ID training images ({len(card['class_names'])} classes:
{', '.join(card['class_names'])}), so that a run on the same split can sample outliers without training it
(`ldm.pretrained={name}`). Weights only (`{card['weights']}`, {card['dtype']}, {card['bytes']:,} bytes): the UNet,
the autoencoder and the text encoder, keyed `unet.*`, `vae.*`, `text_encoder.*`.

The fields above are checked before use: a run whose split fingerprint, class names, image size or prompt
differ, or whose copy of the file has another sha256, trains its own model instead (one log line says why).

Made with:

    {card['command']}

Class-conditional accuracy (the fine-tuned teacher names the class of samples of each class's prompt):
{card['measured']['class_conditional_accuracy']:.3f} for the fp32 weights at export{fp16}; every run that uses the
file measures it again and logs it (`diffusion/quality.json`, MLflow metric `class_conditional_accuracy`).
"""
    with atomic_path(path) as tmp:
        tmp.write_text(f"---\n{front}---\n{body}")


def record_fp16_accuracy(folder: Path, quality: dict[str, Any]) -> dict[str, Any]:
    """Add a diffusion stage's measurement of the shipped fp16 weights (its quality.json) to their card."""
    card = read_card(folder / CARD)
    card["measured"]["fp16_class_conditional_accuracy"] = quality["accuracy"]
    card["measured"]["fp16_per_class"] = quality["per_class"]
    card["measured"]["note"] = ("class_conditional_accuracy: the training stage's measure of the fp32 weights; fp16_*: "
                                "a diffusion stage that used this file (ldm.pretrained), same teacher and settings")
    write_card(card, folder / CARD)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oal.pretrained", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a pretrained folder (fp16 weights + card) from a finished diffusion stage")
    e.add_argument("stage_dir", type=Path, help="the diffusion stage's folder (<output_dir>/<name>/diffusion)")
    e.add_argument("out", type=Path, help="the folder to write (e.g. oal/weights/fashion-ldm)")
    e.add_argument("--command", default="", help="the command that trained the stage, for the card")
    e.add_argument("--note", default="", help="anything else a reader of the card should know (how it was run)")
    m = sub.add_parser("measured", help="add a diffusion stage's measure of the fp16 weights to their card")
    m.add_argument("folder", type=Path, help="the pretrained folder (e.g. oal/weights/fashion-ldm)")
    m.add_argument("quality", type=Path, help="quality.json of a diffusion stage that used it")
    args = p.parse_args(argv)
    if args.cmd == "measured":
        import json

        card = record_fp16_accuracy(args.folder, json.loads(args.quality.read_text()))
        print(f"{args.folder / CARD}: fp16 class-conditional accuracy {card['measured']['fp16_class_conditional_accuracy']:.3f}")
        return 0
    card = export(args.stage_dir, args.out, args.command or shlex.join(sys.argv), args.note)
    print(f"wrote {args.out / WEIGHTS} ({card['bytes']:,} bytes, sha256 {card['sha256']}) and {args.out / CARD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
