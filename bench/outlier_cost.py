"""What synthetic outliers buy per unit of compute: for 300, 1,000 and 3,000 latent outliers, the seconds to make
them (latent only, and latent + VAE decode), the seconds to train the student with them, and the near and far
AUROC it reaches, for three ways of using them: latent MICL (OAL's deep CLUB term), logit energy (VOS-style,
on the energy score EBO reads) and pixel outlier exposure (the outliers decoded, Dream-OOD-style).

    python -m bench.outlier_cost [--preset fashion] [--sizes 300 1000 3000] [--seed 0]
                                 [--out runs/bench-outlier-cost] [--quick] [key=value ...]

Every row trains from the same base student with the same KD from the same teacher (bench.quality's shared
stages: base, teacher, the diffusion model trained on the ID images, embeddings, anchors, k-NN outliers) and
only one outlier term switched on, at its own paper's weight (OAL 0.2, VOS 0.1, OE 0.5); the first row has no
outlier term at all. Latents are sampled once per size for the latent-only terms and once more in pixel mode
(every outlier decoded) for pixel OE, each run timed on its own; the pixel OE row's synthesis cost is the
latter. Training seconds are the student's epoch times (evaluation and start-up excluded). Everything is one
process on this machine, one seed (the numbers are single runs: compare within the table). Finished parts are
skipped on a rerun, their recorded times kept. Writes `<out>/cost.md`, `cost.json` and `cost.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.quality import NO_OUTLIER_TERMS, POSTPROCESSOR, from_base, save_report, setup, shared_stages
from oal import config as C
from oal import registry, stages
from oal.data import build_benchmark
from oal.evaluate import load_report
from oal.storage import load_torch, write_json
from oal.synthesize import IMAGES, MANIFEST, VECTORS, synthesize
from oal.train import resolve_device


@dataclass(frozen=True)
class Method:
    label: str
    slug: str
    overrides: tuple[str, ...]
    pixel: bool  # needs the outliers decoded


METHODS = (
    Method("latent MICL (OAL, 0.2)", "micl", ("loss.w_micl_lat=0.2",), False),
    Method("logit energy (VOS-style, 0.1)", "energy", ("loss.w_logit_energy_lat=0.1",), False),
    Method("pixel OE (decoded, 0.5)", "oe", ("loss.w_pixel_oe=0.5", "diffusion.mode=pixel"), True),
)
NONE = Method("KD only, no outliers", "none", (), False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_synthesis(shared: C.OALConfig, n: int, pixel: bool, out: Path) -> tuple[dict, float]:
    """`n` latent outliers from the shared k-NN outliers, decoded too when `pixel`, into `out`; returns the
    manifest and the seconds it took (the recorded seconds when a previous run already finished it)."""
    timing = out / "seconds.json"
    if (out / MANIFEST).is_file() and timing.is_file():
        return json.loads((out / MANIFEST).read_text()), json.loads(timing.read_text())["seconds"]
    knn = load_torch(stages.output_of(shared, "knn", "outliers"), "k-NN outliers")
    cfg = replace(stages.diffusion_config(shared), num_outliers=n, mode="pixel" if pixel else "latent", grid_samples=0)
    t0 = time.perf_counter()
    manifest = synthesize(cfg, knn["class_names"], knn["outliers"], out, shared.seed, resolve_device(shared.device),
                          fingerprint=f"outlier-cost:{n}:{cfg.mode}", progress=False)
    seconds = time.perf_counter() - t0
    write_json({"seconds": seconds, "count": manifest["count"]}, timing)
    return manifest, seconds


def train_row(preset: str, common: list[str], name: str, method: Method, outliers: C.OutlierConfig,
              given: list[str], bench) -> dict[str, float]:
    cfg = C.load_config(preset, [*common, f"name={name}", *NO_OUTLIER_TERMS, *method.overrides, *given])
    cfg = replace(cfg, outliers=outliers)
    res = registry.run_stage("student", cfg, bench, progress=False)
    history = json.loads((Path(res.dir) / "stage.json").read_text())["history"]
    ev, _ = registry.evaluate(cfg, bench=bench)
    r = load_report(Path(ev.dir) / "results.json")
    pp = r.get("chosen") or POSTPROCESSOR  # the score chosen on validation; EBO only where there is no choice
    score = r["results"][pp]
    return {"train_s": sum(h["epoch_seconds"] for h in history), "near": score["near"]["auroc"], "score": pp,
            "far": score["far"]["auroc"], "id_acc": r["id_accuracy"]}


def run(preset: str, base: list[str], sizes: list[int], seed: int, out: Path) -> list[dict]:
    common = [*base, f"seed={seed}", f"output_dir={out}"]
    shared = C.load_config(preset, [*common, f"name=c-seed{seed}"])
    bench = build_benchmark(shared.data)
    t0 = time.perf_counter()
    given, base_ckpt, _ = shared_stages(shared, bench)
    given = [*given, *from_base(shared, base_ckpt)]
    registry.run_stage("embeddings", shared, bench)
    registry.run_stage("anchors", shared)
    registry.run_stage("knn", shared)
    _log(f"shared stages: {time.perf_counter() - t0:.0f} s")
    rows = [{"method": NONE.label, "outliers": 0, "synth_s": 0.0,
             **train_row(preset, common, f"c-seed{seed}-none", NONE, shared.outliers, given, bench)}]
    for n in sizes:
        made = {}
        for pixel in (False, True):
            d = out / f"c-seed{seed}-outliers" / f"{n}-{'pixel' if pixel else 'latent'}"
            made[pixel] = timed_synthesis(shared, n, pixel, d), d
            _log(f"{n} outliers, {'latent + decode' if pixel else 'latent only'}: {made[pixel][0][1]:.1f} s")
        for m in METHODS:
            (manifest, synth_s), d = made[m.pixel]
            outliers = replace(shared.outliers, latent_path=str(d / VECTORS),
                               pixel_path=str(d / IMAGES) if m.pixel else None)
            row = train_row(preset, common, f"c-seed{seed}-{m.slug}-{n}", m, outliers, given, bench)
            rows.append({"method": m.label, "outliers": manifest["count"], "synth_s": synth_s,
                         "latent_only_s": made[False][0][1], **row})
            _log(f"{n} outliers, {m.label}: near {100 * row['near']:.2f}, far {100 * row['far']:.2f}, "
                 f"train {row['train_s']:.0f} s")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| term | outliers | synthesis s | training s | near AUROC | far AUROC | ID acc. |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['outliers']:,} | {r['synth_s']:.1f} | {r['train_s']:.1f} | "
                     f"{100 * r['near']:.2f} | {100 * r['far']:.2f} | {100 * r['id_acc']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Near and far AUROC against seconds of compute (synthesis + training), one line per term through its
    sizes; dashed: the row without outliers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "near", "near-OOD"), (axes[1], "far", "far-OOD")):
        for m in METHODS:
            pts = sorted((r["synth_s"] + r["train_s"], 100 * r[key], r["outliers"]) for r in rows
                         if r["method"] == m.label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m.label)
            for x, y, n in pts:
                ax.annotate(f"{n:,}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(100 * rows[0][key], color="grey", linestyle="--", linewidth=1, label=rows[0]["method"])
        ax.set_xlabel("seconds: synthesis + student training")
        ax.set_ylabel(f"{title} AUROC (%), validation-chosen score")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.outlier_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="embedded preset (default fashion; digits with --quick)")
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000], help="latent outliers per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-outlier-cost", help="output root")
    p.add_argument("--quick", action="store_true", help="tiny digits settings, for checking that it runs")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every row")
    args = p.parse_args(argv)
    if min(args.sizes) < 1:
        p.error(f"--sizes must be >= 1; got {args.sizes}")
    preset, base, probe = setup(p, args, ["eval.baseline=false"])
    out = Path(args.out)
    t0 = time.perf_counter()
    rows = run(preset, base, args.sizes, args.seed, out)
    bench = build_benchmark(probe.data)
    text = "\n".join([
        f"# Outlier cost on `{preset}`{' (--quick settings)' if args.quick else ''}, seed {args.seed}",
        "",
        "AUROC in %, each row under the score its evaluation chose on validation; "
        f"near-OOD: {', '.join(bench.near)}; far-OOD: {', '.join(bench.far)}. Every row: the base "
        "student fine-tuned with KD from the teacher plus the one term named (weight in brackets). Synthesis s: "
        "latent only for the latent terms, latent + VAE decode for pixel OE. Device: "
        f"{resolve_device(probe.device)}, one process.",
        f"Overrides: {' '.join(base)}",
        "",
        table(rows),
        "",
        f"Runtime: {time.perf_counter() - t0:.0f} s (parts finished by an earlier run take ~0 s).",
        "",
    ])
    save_report(out, "cost", text, lambda path: plot(rows, path),
                {"preset": preset, "seed": args.seed, "overrides": base, "rows": rows})

if __name__ == "__main__":
    main()
