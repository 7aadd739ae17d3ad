"""OOD-detection quality of OAL's loss terms and of its outliers' source, one variant per row, on an embedded
benchmark (default `fashion`; `--quick` runs tiny `digits` settings).

    python -m bench.quality [--preset fashion] [--seeds 0 1 2] [--rows ladder|ablation] [--out runs/bench-quality]
                            [--quick] [key=value ...]

For each seed the shared stages (base CE student, teacher, the diffusion model trained on the ID images,
embeddings, anchors, k-NN outliers, latent outliers) run once under `<out>/q-seed<s>/`, plus two more outlier
chains for the ablations: `q-seed<s>-untrained` (the same stages with the untrained built-in model) and
`q-seed<s>-class` (latents from the trained model conditioned on the plain class prompt, no outlier). Every
variant then trains and evaluates its own student under `<out>/q-seed<s>-<variant>/`, reading the shared
teacher, base student and outlier files. Stages keep their skip-if-done manifests: an interrupted benchmark
resumes, a finished one re-prints at once. `diffusion.checkpoint=PATH` gives every seed one trained diffusion
model (the diffusion stage's checkpoint) instead of training one per seed. Each row is under the score its
evaluation chose on validation (ID validation vs validation OOD, never a test set); metrics follow OpenOOD
v1.5 (oal/evaluate.py). Writes `<out>/quality.md`, `quality.json` and `quality.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from oal import config as C
from oal import registry, stages
from oal.data import build_benchmark
from oal.diffusion import BUILTIN, BUILTIN_LDM
from oal.evaluate import load_report
from oal.storage import load_torch

POSTPROCESSOR = "ebo"  # where an evaluation has no validation choice (no validation OOD set)

# Tiny settings for a smoke run (shared with the tests); no decoded grid needed here.
QUICK = [*C.QUICK_OVERRIDES, "diffusion.grid_samples=0", "ldm.vae_epochs=1", "ldm.epochs=1", "ldm.eval_samples=2",
         "ldm.grid_per_class=0"]
NO_OUTLIER_TERMS = ("loss.w_micl_knn=0", "loss.w_micl_lat=0", "loss.w_energy_knn=0", "loss.w_energy_lat=0",
                    "loss.w_logit_energy_knn=0", "loss.w_logit_energy_lat=0", "loss.w_pixel_oe=0")


@dataclass(frozen=True)
class Variant:
    label: str  # row label in the table
    slug: str  # suffix of the variant's run name
    overrides: tuple[str, ...]  # applied after the user's overrides, so they always hold
    chain: str = "main"  # whose outlier files: main | untrained (untrained diffusion model) | class (class prompt)


BASE_ROW = "CE (base stage)"
VARIANTS = (
    Variant("CE, trained on for the student's epochs (control)", "ce",
            ("loss.w_logit_kd=0", "loss.w_feat_kd=0", *NO_OUTLIER_TERMS)),
    Variant("+ logit/feature KD", "kd", NO_OUTLIER_TERMS),
    Variant("+ k-NN MICL", "knn", ("loss.w_micl_lat=0", "loss.w_energy_knn=0", "loss.w_energy_lat=0")),
    Variant("+ latent MICL (full OAL, reference weights)", "full", ("loss.w_energy_knn=0", "loss.w_energy_lat=0")),
    Variant("KD + energy terms 2.5/2.5 (reference energy_rl variant)", "energy",
            ("loss.w_micl_knn=0", "loss.w_micl_lat=0", "loss.w_energy_knn=2.5", "loss.w_energy_lat=2.5")),
    Variant("full OAL, untrained diffusion model", "full-untrained", ("loss.w_energy_knn=0", "loss.w_energy_lat=0"),
            "untrained"),
    Variant("full OAL, latents of the plain class prompt", "full-class", ("loss.w_energy_knn=0", "loss.w_energy_lat=0"),
            "class"),
)

FULL = ("loss.w_energy_knn=0", "loss.w_energy_lat=0")  # the paper's OAL: KD + both MICL terms, no energy terms
# --rows ablation: full OAL and each of its loss terms removed (the CE row is the base stage's)
ABLATION = (
    Variant("OAL (full, reference weights)", "full", FULL),
    Variant("OAL without logit KD", "no-logit-kd", (*FULL, "loss.w_logit_kd=0")),
    Variant("OAL without feature KD", "no-feat-kd", (*FULL, "loss.w_feat_kd=0")),
    Variant("OAL without k-NN MICL", "no-micl-knn", (*FULL, "loss.w_micl_knn=0")),
    Variant("OAL without latent MICL", "no-micl-lat", (*FULL, "loss.w_micl_lat=0")),
)

# (column header, where in results.json: "id_accuracy" or (near|far, metric))
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("near AUROC", ("near", "auroc")),
    ("far AUROC", ("far", "auroc")),
    ("near FPR@95", ("near", "fpr95")),
    ("far FPR@95", ("far", "fpr95")),
    ("ID acc.", ("id_accuracy",)),
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _metrics(results: dict) -> dict[str, Any]:
    """The table's numbers (fractions) from one variant's results.json, under the score its evaluation chose on
    validation (never on the test sets), named under "score"."""
    pp = results.get("chosen") or POSTPROCESSOR
    out: dict[str, Any] = {"score": pp if pp != "knn" else f"knn K={results.get('knn_k')}"}
    for header, where in COLUMNS:
        if where == ("id_accuracy",):
            out[header] = float(results["id_accuracy"])
        else:
            out[header] = float(results["results"][pp][where[0]][where[1]])
    return out


def variants_for(preset_cfg: C.OALConfig, rows: str = "ladder") -> tuple[Variant, ...]:
    """The rows of `--rows` (ladder: terms added one by one, and the outliers' source; ablation: each term of full
    OAL removed). The untrained-model row only makes sense when the main chain uses the trained model."""
    if rows == "ablation":
        return ABLATION
    return tuple(v for v in VARIANTS if v.chain != "untrained" or preset_cfg.diffusion.model == BUILTIN_LDM)


def _outliers(cfg: C.OALConfig, bench) -> C.OutlierConfig:
    """Run one chain's outlier stages (the registry's, from the embeddings to the latents); return its outlier
    files."""
    local = registry.Local(bench, progress=False)
    done: dict[str, stages.StageResult] = {}
    registry.run_all(cfg, registry.plan(cfg, "embeddings", "latents"), done, lambda stage, c: registry.run(stage, c, local))
    knn, lat = done["knn"], done["latents"]
    # with diffusion.mode=pixel the latents stage also wrote the decoded outliers (pixel OE reads them)
    return replace(cfg.outliers, knn_path=knn.outputs["outliers"], latent_path=lat.outputs["vectors"],
                   pixel_path=lat.outputs.get("images", cfg.outliers.pixel_path))


def student_metrics(cfg: C.OALConfig, bench) -> dict[str, float]:
    """Train (or skip, when up to date) the student of `cfg` and evaluate it; the table's numbers."""
    registry.run_stage("student", cfg, bench, progress=False)
    return _evaluated(registry.evaluate(cfg, bench=bench)[0])


def base_metrics(shared: C.OALConfig, base_ckpt: str, bench) -> dict[str, float]:
    """The CE row: the base student's evaluation (or its record, when up to date)."""
    return _evaluated(registry.evaluate(shared, base_ckpt, bench=bench, of="base")[0])


def _evaluated(result: stages.StageResult) -> dict[str, float]:
    # results.json is there whether the evaluation ran now or was skipped as up to date.
    return _metrics(load_report(Path(result.dir) / "results.json"))


def shared_stages(shared: C.OALConfig, bench) -> tuple[list[str], str, dict]:
    """The stages every variant reads: base CE student, teacher and (builtin-ldm) the diffusion model. Returns the
    override that points a variant at the teacher, the base checkpoint, and the diffusion stage's quality.json."""
    registry.run_stage("base", shared, bench, progress=False)
    registry.run_stage("teacher", shared, bench, progress=False)
    teacher = str(stages.stage_dir(shared, "teacher") / "checkpoint.pt")
    info: dict = {}
    if stages.trained_diffusion(shared):
        if shared.diffusion.checkpoint is None:  # else a given one (e.g. one model for every seed)
            registry.run_stage("diffusion", shared, bench, progress=False)
        q = Path(str(stages.diffusion_config(shared).checkpoint)).parent / "quality.json"
        info = json.loads(q.read_text()) if q.exists() else {}
    return [f"teacher.checkpoint={teacher}"], str(stages.base_checkpoint(shared)), info


def from_base(shared: C.OALConfig, base_ckpt: str) -> list[str]:
    """The override that starts a variant's student from the shared base checkpoint (when the preset does)."""
    return [f"base.checkpoint={base_ckpt}"] if shared.student.init == "base" else []


def run_seed(preset: str, base: list[str], seed: int, out: Path,
             rows: str = "ladder") -> tuple[dict[str, dict[str, float]], dict]:
    """All variants for one seed: shared stages once, then one student and one evaluation per variant."""
    common = [*base, f"seed={seed}", f"output_dir={out}"]
    shared = C.load_config(preset, [*common, f"name=q-seed{seed}"])
    bench = build_benchmark(shared.data)
    t0 = time.perf_counter()
    given, base_ckpt, info = shared_stages(shared, bench)
    chains = {"main": _outliers(shared, bench)}
    chosen = variants_for(shared, rows)
    if any(v.chain == "untrained" for v in chosen):
        cfg = C.load_config(preset, [*common, f"name=q-seed{seed}-untrained", f"diffusion.model={BUILTIN}", *given])
        chains["untrained"] = _outliers(cfg, bench)
    if any(v.chain == "class" for v in chosen):
        ckpt = [f"diffusion.checkpoint={stages.diffusion_config(shared).checkpoint}"] if stages.trained_diffusion(
            shared) else []
        cfg = C.load_config(preset, [*common, f"name=q-seed{seed}-class", "diffusion.conditioning=class", *ckpt, *given])
        chains["class"] = _outliers(cfg, bench)
    _log(f"[seed {seed}] shared stages: {time.perf_counter() - t0:.0f} s")
    rows = {BASE_ROW: base_metrics(shared, base_ckpt, bench)}
    for v in chosen:
        t1 = time.perf_counter()
        cfg = C.load_config(preset, [*common, f"name=q-seed{seed}-{v.slug}", *v.overrides, *given,
                                     *from_base(shared, base_ckpt)])
        rows[v.label] = student_metrics(replace(cfg, outliers=chains[v.chain]), bench)
        _log(f"[seed {seed}] {v.label}: {time.perf_counter() - t1:.0f} s")
    lat = load_torch(chains["main"].latent_path, "latent outliers")["outliers"]
    info["latent_vectors"] = list(lat.shape)
    return rows, info


def _mean_std(values: list[float]) -> str:
    a = 100 * np.asarray(values)
    std = a.std(ddof=1) if len(a) > 1 else 0.0  # sample std over seeds
    return f"{a.mean():.2f} ± {std:.2f}"


def labels(per_seed: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    return list(next(iter(per_seed.values())))


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    header = ("| variant | score (chosen on validation, by seed) | " + " | ".join(h for h, _ in COLUMNS)
              + " | near / far vs CE |")
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for label in labels(per_seed):
        chosen = ", ".join(str(per_seed[s][label].get("score", POSTPROCESSOR)) for s in per_seed)
        cells = [chosen, *(_mean_std([per_seed[s][label][h] for s in per_seed]) for h, _ in COLUMNS)]
        gain = [100 * np.mean([per_seed[s][label][h] - per_seed[s][BASE_ROW][h] for s in per_seed])
                for h in ("near AUROC", "far AUROC")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain[0]:+.2f} / {gain[1]:+.2f} |")
    return "\n".join(lines)


def plot(per_seed: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    """Near and far AUROC per variant, mean and sample std over seeds, beside the CE row's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = labels(per_seed)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    y = np.arange(len(names))
    for k, (col, colour) in enumerate((("near AUROC", "tab:blue"), ("far AUROC", "tab:orange"))):
        vals = 100 * np.array([[per_seed[s][n][col] for s in per_seed] for n in names])  # (V, S)
        err = vals.std(axis=1, ddof=1) if vals.shape[1] > 1 else None
        ax.barh(y + (k - 0.5) * 0.38, vals.mean(axis=1), height=0.38, xerr=err, color=colour, label=col)
        ax.axvline(vals[0].mean(), color=colour, linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("AUROC (%), each under its validation-chosen score; dashed: CE")
    lo = 100 * min(per_seed[s][n][c] for s in per_seed for n in names for c in ("near AUROC", "far AUROC"))
    ax.set_xlim(max(0.0, lo - 10), 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setup(p: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> tuple[str, list[str], C.OALConfig]:
    """What both benches do with their common arguments: the preset (fashion, digits with --quick), quiet bars and
    logs, and the base overrides (no plots, `extra`, --quick's, then the user's), checked on a probe config before
    any training. Returns (preset, base overrides, probe config)."""
    preset = args.preset or ("digits" if args.quick else "fashion")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.ERROR)  # warnings that matter are stated in the tables' notes
    # Plots are not needed for the table; the user's overrides come after and may turn them back on.
    base = ["eval.plots=false", *extra, *(QUICK if args.quick else []), *args.overrides]
    probe = C.load_config(preset, base)  # fail on a bad override before any training
    if POSTPROCESSOR not in probe.eval.postprocessors:
        p.error(f"eval.postprocessors must include '{POSTPROCESSOR}'")
    return preset, base, probe


def save_report(out: Path, stem: str, text: str, draw: Callable[[Path], None], record: dict) -> None:
    """Print the report and write `<out>/<stem>.md`, `.png` (by `draw`) and `.json`."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    draw(out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="embedded preset (default fashion; digits with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-quality", help="output root (one run folder per seed and variant)")
    p.add_argument("--quick", action="store_true", help="tiny digits settings, for checking that it runs")
    p.add_argument("--rows", choices=["ladder", "ablation"], default="ladder",
                   help="ladder: loss terms added one by one and the outliers' source; ablation: full OAL and each "
                        "of its terms removed")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every variant")
    args = p.parse_args(argv)
    preset, base, probe = setup(p, args, [])
    out = Path(args.out)
    t0 = time.perf_counter()
    per_seed, info = {}, {}
    for s in args.seeds:
        per_seed[s], info[s] = run_seed(preset, base, s, out, args.rows)
    seconds = time.perf_counter() - t0
    bench = build_benchmark(probe.data)
    model = {BUILTIN: "the built-in UNTRAINED tiny model (random weights): latent terms here exercise the machinery",
             BUILTIN_LDM: "the built-in model trained on the ID images by the diffusion stage"}.get(
                 probe.diffusion.model, probe.diffusion.model)
    quality = [f"seed {s}: {100 * info[s]['accuracy']:.1f}% (teacher on real ID validation images: "
               f"{100 * info[s]['teacher_val_accuracy']:.1f}%)" for s in info if "accuracy" in info[s]]
    text = "\n".join([
        f"# OAL variants on `{preset}`{' (--quick settings)' if args.quick else ''}",
        "",
        f"Each row under the score its validation data chose (named per seed); mean ± sample std over seeds "
        f"{' '.join(map(str, args.seeds))}, in %; the last column is the mean per-seed AUROC difference to the CE "
        "row. FPR@95 is OpenOOD v1.5's. "
        f"Near-OOD: {', '.join(bench.near)}; far-OOD: {', '.join(bench.far)}.",
        f"Diffusion model: {model}."
        + (f" Class-conditional accuracy of its samples (judged by the teacher): {'; '.join(quality)}." if quality
           else ""),
        f"Overrides: {' '.join(base) or '(none)'}",
        "",
        table(per_seed),
        "",
        f"Runtime: {seconds:.0f} s on this machine (stages skipped as up to date take ~0 s).",
        "",
    ])
    save_report(out, "quality" if args.rows == "ladder" else f"quality-{args.rows}", text, lambda path: plot(per_seed, path),
                {"preset": preset, "seeds": args.seeds, "overrides": base, "per_seed": per_seed, "diffusion": info})

if __name__ == "__main__":
    main()
