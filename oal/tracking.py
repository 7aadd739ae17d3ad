"""MLflow tracking: one parent run per pipeline, one child run per stage.

Enabled when a tracking URI is known (`tracking.uri`, else the MLFLOW_TRACKING_URI environment
variable); otherwise every method is a no-op and the pipeline still writes its local files. Credentials
(AWS_*, tokens) are never read here and never logged: params come from the resolved config only.

Metric writes that fail (tracking server down mid-run) do not stop training: they are appended to a
local JSONL buffer and the gap is reported when the run ends. Artifact writes that fail do stop the run,
marked FAILED, so that no run is FINISHED with missing artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oal import config as C
from oal import storage

log = logging.getLogger("oal.tracking")
VIEWED = (".json", ".md", ".png", ".yaml", ".txt")  # a stage's outputs one looks at in MLflow (not weights, tensors)

# Bounded retries: a dead server must cost seconds, not MLflow's default minutes of back-off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetricLogger:
    """Logs metrics to one run through MlflowClient at `uri` (None: MLflow's own resolution, the environment or
    `mlflow.set_tracking_uri`); failed writes go to a local buffer file, the last failure's text to `last_error`."""

    def __init__(self, run_id: str | None, buffer: Path | None = None, uri: str | None = None):
        self.run_id, self.buffer, self.uri, self.failed = run_id, buffer, uri, 0
        self.last_error = ""

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            MlflowClient(tracking_uri=self.uri).log_batch(self.run_id, metrics=items)
        except Exception as e:  # the server is down or refusing: keep training, keep the numbers
            self.failed += len(items)
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("MLflow metric write failed (%s); buffered locally", type(e).__name__)
            if self.buffer is not None:
                self._buffer({"run_id": self.run_id, "step": step, "metrics": metrics})

    def _buffer(self, record: dict) -> None:
        """Append to the buffer file; under an s3:// output_dir, also into the store (the process may run on a
        worker whose disk nobody reads), onto the store's copy when this node has none. A store that fails too
        only costs a warning: the lines stay on this node."""
        assert self.buffer is not None
        try:
            if not self.buffer.is_file():
                storage.pull(self.buffer)
        except Exception as e:
            log.warning("could not fetch %s from the object store (%s)", storage.uri(self.buffer), e)
        self.buffer.parent.mkdir(parents=True, exist_ok=True)
        with self.buffer.open("a") as f:
            f.write(json.dumps(record) + "\n")
        try:
            storage.upload(self.buffer)
        except Exception as e:
            log.warning("could not upload %s to the object store (%s)", storage.uri(self.buffer), e)


@dataclass
class StageRun:
    name: str
    run_id: str | None
    metrics: MetricLogger = field(default_factory=lambda: MetricLogger(None))


class Tracker:
    def __init__(self, uri: str | None, experiment: str = "oal", system_metrics: bool = True,
                 log_model: bool = True):
        self.uri, self.experiment = uri, experiment
        self.system_metrics, self.log_model = system_metrics, log_model
        self.enabled = bool(uri)
        self.failed_metric_writes = 0
        # the Model Registry alias a recorded detector stage gets: a pipeline's "candidate"; a tune search
        # gives its retrained best trial's detector "champion"
        self.detector_alias = "candidate"
        self.parent_id: str | None = None
        if self.enabled and system_metrics:
            # The monitor logs four INFO lines per run it starts and stops (one run per stage): job-log noise. Its
            # warnings stay.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

    @classmethod
    def from_env(cls, cfg: C.OALConfig) -> Tracker:
        t = cfg.tracking
        return cls(t.uri or os.environ.get("MLFLOW_TRACKING_URI"), t.experiment, t.system_metrics, t.log_model)

    @contextmanager
    def pipeline_run(self, cfg: C.OALConfig, kind: str = "pipeline", resume_run_id: str | None = None
                     ) -> Iterator[str | None]:
        if not self.enabled:
            yield None
            return
        import mlflow

        self.check_server()
        mlflow.set_tracking_uri(str(self.uri))
        tags = {"oal.kind": kind, "git_commit": git_commit(), "dataset": cfg.data.benchmark,
                "student": cfg.model.student, "teacher": cfg.teacher.network, "diffusion_model": cfg.diffusion.model,
                "diffusion_untrained": str(cfg.diffusion.model == "builtin-tiny").lower()}
        with self._permission_named():
            mlflow.set_experiment(self.experiment)
            if resume_run_id:  # an interrupted job continues its own run (its children stay together)
                run = mlflow.start_run(run_id=resume_run_id)
            else:
                run = mlflow.start_run(run_name=f"{cfg.name}-{kind}", tags=tags)
        self.parent_id = run.info.run_id
        status = "FAILED"
        try:
            if not resume_run_id:
                self._config(cfg)
            yield self.parent_id
            status = "FINISHED"
        finally:
            if self.failed_metric_writes:
                log.warning("%d metric writes to MLflow failed and were buffered locally (tracking_buffer.jsonl "
                            "in each stage folder)", self.failed_metric_writes)
                mlflow.set_tag("oal.metric_writes_failed", str(self.failed_metric_writes))
            mlflow.end_run(status=status)

    def check_server(self) -> None:
        """Fail fast, naming the URI, when an HTTP tracking server does not answer at the start."""
        import urllib.error
        import urllib.request

        uri = str(self.uri)
        if not uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"MLflow tracking server {uri} does not answer ({e}); start it (`python -m cluster.stack "
                               f"up` for the local one) or unset MLFLOW_TRACKING_URI to run without tracking") from None

    def _config(self, cfg: C.OALConfig) -> None:
        import mlflow

        flat = C.flatten(C.to_dict(cfg))
        mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})
        # The first artifact: an unreachable store fails the run here, before any work.
        with self._writes_fail_clearly("store artifacts"):
            mlflow.log_text(C.to_yaml(cfg), "config.yaml")

    @contextmanager
    def _permission_named(self) -> Iterator[None]:
        """A server behind a login that refuses this user the experiment (HTTP 401/403): one error naming the
        user, the experiment and the ways out, instead of MLflow's traceback (never the password)."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as e:
            if e.error_code not in ("PERMISSION_DENIED", "UNAUTHENTICATED") and not any(
                    f"error code {c}" in str(e) for c in (401, 403)):
                raise
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user '{user}' (MLFLOW_TRACKING_USERNAME)" if user else "an anonymous client (no " \
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set)"
            code = re.search(r"error code (\d{3})", str(e))
            raise RuntimeError(
                f"MLflow at {self.uri} refused {who} access to experiment '{self.experiment}' "
                f"(HTTP {code.group(1) if code else e.error_code}): the experiment belongs to another user. Use an "
                f"experiment of your own (tracking.experiment=NAME), or ask an MLflow admin to grant this user EDIT "
                f"on it (mlflow.server.auth.client.AuthServiceClient.grant_user_permission)") from None

    @contextmanager
    def _writes_fail_clearly(self, what: str) -> Iterator[None]:
        """Turns a failed MLflow write into one error naming the tracking server and the S3 endpoint."""
        try:
            yield
        except Exception as e:
            endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "the one configured on the MLflow server")
            raise RuntimeError(f"cannot {what} through MLflow at {self.uri} (S3 endpoint: {endpoint}): "
                               f"{_gist(e)}") from None

    @contextmanager
    def stage(self, name: str, cfg: C.OALConfig) -> Iterator[StageRun]:
        if not self.enabled:
            yield StageRun(name, None)
            return
        import mlflow

        run = mlflow.start_run(run_name=name, nested=True, tags={"oal.stage": name, "oal.kind": "stage"},
                               log_system_metrics=self.system_metrics)
        sr = StageRun(name, run.info.run_id, MetricLogger(run.info.run_id,
                                                          stages_dir(cfg, name) / "tracking_buffer.jsonl", self.uri))
        status = "FAILED"
        try:
            yield sr
            status = "FINISHED"
        finally:
            self.failed_metric_writes += sr.metrics.failed
            mlflow.end_run(status=status)

    def record_stage(self, result: Any, report: Any = None, cfg: C.OALConfig | None = None,
                     live_metrics: bool = False) -> None:
        """Log a finished stage on its run: its manifest, config and the outputs one looks at (VIEWED), its per-epoch
        history (unless streamed live), the figures it recorded as `metrics`; an evaluation's report (`report`)
        and the student it scored as a model; a detector (an output `spec`) registered. What is logged follows from
        the result and its manifest, never from the stage's name: a new stage is tracked as it is."""
        if not self.enabled:
            return
        with self._writes_fail_clearly(f"record the {result.name} stage's files"):
            self._record_stage(result, report, cfg, live_metrics)

    def _record_stage(self, result: Any, report: Any, cfg: C.OALConfig | None, live_metrics: bool) -> None:
        import mlflow

        mlflow.set_tag("oal.skipped", str(result.skipped).lower())
        mlflow.log_param("fingerprint", result.fingerprint)
        d = Path(result.dir)
        mlflow.set_tag("oal.folder", storage.uri(d.resolve()))  # its files stay there: referenced, not copied
        storage.pull(d / "stage.json")  # with an s3:// output_dir: from the store onto this node's mirror
        manifest = json.loads((d / "stage.json").read_text())
        outputs = manifest.get("outputs", {})
        viewed = [storage.local(u) for u in outputs.values() if Path(str(u)).suffix in VIEWED]
        for path in (d / "stage.json", d / "config.yaml", *viewed):
            storage.pull(path)
            if Path(path).exists():
                mlflow.log_artifact(str(path))
        if not live_metrics:
            for row in manifest.get("history", []):
                mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in row.items()
                                    if isinstance(v, (int, float)) and k != "epoch"}, step=int(row.get("epoch", 0)))
        if manifest.get("metrics"):
            mlflow.log_metrics(manifest["metrics"])
        if "spec" in outputs:
            self._detector(cfg, d, manifest, register=not result.skipped)
        if report is not None:
            # The model first, so that the metrics below are logged against it (the logged model's page shows
            # them). Logged after them, MLflow links them itself by reading each metric's history back: one
            # request per metric, some 200 for digits.
            of = manifest.get("of", "student")
            model_id = None
            if self.log_model and of == "student" and cfg is not None:
                model_id = self._model(cfg, Path(storage.local(manifest["checkpoint"])))
            self._eval(report, d, cfg, prefix="" if of == "student" else f"{of}_", model_id=model_id)

    def log_comparison(self, path: Path) -> None:
        """The CE-baseline-vs-OAL table, on the pipeline's own run."""
        if not self.enabled or self.parent_id is None:
            return
        from mlflow.tracking import MlflowClient

        with self._writes_fail_clearly("record the results table"):
            MlflowClient().log_artifact(self.parent_id, str(path))

    def _eval(self, report: Any, d: Path, cfg: C.OALConfig | None, prefix: str = "",
              model_id: str | None = None) -> None:
        import mlflow

        metrics = {"id_accuracy": report.id_accuracy}
        for pp, r in report.results.items():
            if r.val_auroc is not None:
                metrics[f"{pp}_val_auroc"] = r.val_auroc
            for k in ("auroc", "fpr95", "fpr95_classic"):
                metrics[f"{pp}_near_{k}"] = r.near[k]
                metrics[f"{pp}_far_{k}"] = r.far[k]
            for name, m in r.per_set.items():
                metrics[f"{pp}_{name}_auroc"] = m.auroc
                metrics[f"{pp}_{name}_fpr95"] = m.fpr95
        mlflow.log_metrics(metrics, model_id=model_id)
        mlflow.set_tags({"oal.score": report.headline(cfg.eval.primary if cfg else "ebo"),
                         "oal.score_chosen_on_validation": str(report.chosen is not None).lower(),
                         **({"oal.knn_k": str(report.knn_k)} if report.knn_k else {})})
        if self.parent_id is not None:  # the headline numbers also on the parent, for the runs table
            from mlflow.tracking import MlflowClient

            # the score chosen on validation (eval.primary where the benchmark has no validation OOD set)
            head = report.results[report.headline(cfg.eval.primary if cfg else "ebo")]
            for k, v in {"id_accuracy": report.id_accuracy, "near_auroc": head.near["auroc"],
                         "far_auroc": head.far["auroc"]}.items():
                MlflowClient().log_metric(self.parent_id, prefix + k, v)
        storage.pull_dir(d / "plots")
        if (d / "plots").is_dir():
            mlflow.log_artifacts(str(d / "plots"), "plots")

    def _detector(self, cfg: C.OALConfig | None, d: Path, manifest: dict, register: bool = True) -> None:
        """The detector's choice and figures on its run; the detector as a pyfunc model, registered (the pipeline's
        version under the alias `candidate`) when the stage computed it: a skipped stage's is registered already."""
        import mlflow

        mlflow.set_tags({"oal.score": manifest["score"], "oal.threshold": f"{manifest['threshold']:.6g}",
                         "oal.id_tpr": str(manifest["id_tpr"])})
        mlflow.log_metrics({"threshold": manifest["threshold"],
                            **{f"val_{k.replace(':', '_')}": v for k, v in manifest["validation"].items()},
                            **{f"test_{k.replace(':', '_')}": v for k, v in manifest["test"].items()
                               if isinstance(v, float)}})
        if self.log_model and cfg is not None and register:
            version = log_detector(d / "model", registered_model_name(cfg))
            from mlflow.tracking import MlflowClient

            name, alias = registered_model_name(cfg), self.detector_alias
            MlflowClient().set_registered_model_alias(name, alias, version)
            log.info("detector: registered %s version %s, alias %s (models:/%s@%s)", name, version, alias, name, alias)

    def _model(self, cfg: C.OALConfig, checkpoint: Path) -> str:
        """Log the evaluated student as an MLflow model (logits out); returns its model id."""
        import mlflow
        import torch
        from mlflow.models import infer_signature

        from oal.models import LogitsOnly, build_student
        from oal.train import load_checkpoint_net

        state = storage.load_torch(checkpoint, "student checkpoint")
        meta = state.get("meta", {})
        net = build_student(meta.get("arch", cfg.model.student), meta["num_classes"]).eval()
        load_checkpoint_net(checkpoint, net, cfg.weights, state)  # the weights the evaluation scored
        x = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size)
        served = LogitsOnly(net).eval()
        with torch.no_grad():
            logits = served(x)
        signature = infer_signature(x.numpy(), logits.numpy())
        info = mlflow.pytorch.log_model(served, name="student", serialization_format="pickle", signature=signature,
                                        pip_requirements=model_requirements())
        return info.model_id


# What loading the pickled student needs (MLflow adds itself). Named here rather than inferred: MLflow's inference
# loads the model in a subprocess to see what it imports, 10-20 s per logged model on 2 cores, and finds this list.
MODEL_PACKAGES = ("torch", "cloudpickle", "numpy", "oal")


def model_requirements(packages: tuple[str, ...] = MODEL_PACKAGES) -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]  # torch 2.14.1+cu130 -> 2.14.1


def stages_dir(cfg: C.OALConfig, name: str) -> Path:
    return cfg.run_dir / name


def registered_model_name(cfg: C.OALConfig) -> str:
    return cfg.tracking.registered_model or f"oal-{cfg.name}"


DETECTOR_PACKAGES = ("torch", "numpy", "pillow", "faiss-cpu", "pandas", "oal")


def log_detector(folder: Path, name: str) -> str:
    """Log the detector folder as a pyfunc model registered under `name`; returns the new version."""
    import mlflow

    from oal.serving import DetectorModel, signature

    storage.pull_dir(folder)
    info = mlflow.pyfunc.log_model(name="detector", python_model=DetectorModel(), artifacts={"detector": str(folder)},
                                   signature=signature(), pip_requirements=model_requirements(DETECTOR_PACKAGES),
                                   registered_model_name=name)
    return str(info.registered_model_version)


def _gist(e: Exception, limit: int = 300) -> str:
    """A failed write's error in a line: its first line cut to `limit` characters, and what urllib3 names as the cause
    when the cut hides it (a request's long URL comes first: 'too many 500 error responses', 'Connection refused')."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    gist = first[:limit]
    cause = re.search(r"\(Caused by (.*)\)\s*$", first)
    if cause and len(first) > limit:
        gist += f" ... (caused by {cause.group(1)[:limit]})"
    return gist
