"""What every job shares: argument parsing, config loading and connecting to Ray with clear errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from oal import config as C
from oal import storage

log = logging.getLogger("oal.jobs")
TOKEN_HELP = ("Ray's token authentication is on (Ray 2.5x+ default): the client needs RAY_AUTH_MODE=token and "
              "the token, read from RAY_AUTH_TOKEN, or the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
              "(print it on the head with `ray get-auth-token`).")
START_HELP = "start a local one with `python -m cluster.stack up` (or `ray start --head`)"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", default="digits", help="preset name or YAML path (default: digits)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a running local head)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.epochs=3")
    return p


def load(args: argparse.Namespace) -> C.OALConfig:
    """The job's config, checked before any work: a bad key, type, range, name or missing input is one line on
    stderr and exit code 2 (as `oal`'s), never a traceback."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        cfg = C.load_config(args.config, args.overrides)
    except C.ConfigError as e:
        _usage_error(f"config error: {e}")
    try:  # an s3:// output_dir's missing bucket or refused credentials: now, not after the first stage
        storage.check_bucket(cfg.output_dir)
    except ValueError as e:
        _usage_error(f"storage error: {e}")
    try:
        # Files are addressed by absolute path: Ray workers do not share the driver's working directory. A given
        # input that does not exist (e.g. data.root) is a ConfigError here.
        return C.absolute_paths(cfg)
    except C.ConfigError as e:
        _usage_error(f"config error: {e}")


def root_error(e: BaseException) -> BaseException:
    """The error under Ray's wrappers: a task's `cause`, a training worker's failure, a controller's failure."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        below = (getattr(e, "cause", None) or (next(iter(failures.values())) if failures else None)
                 or getattr(e, "controller_failure", None) or e.__cause__)
        if not isinstance(below, BaseException):
            break
        e = below
    return e


@contextlib.contextmanager
def data_errors(job: str) -> Iterator[None]:
    """A DataError (an input file that cannot be read, raised in whichever worker read it) ends the job with one
    line naming the file and exit code 1, after Ray's own log of the worker's failure; anything else propagates."""
    from oal.data import DataError

    try:
        yield
    except Exception as e:
        root = root_error(e)
        if not isinstance(root, DataError):
            raise
        import ray

        if ray.is_initialized():
            # Ray's log monitor streams the workers' copies of the error (and, a moment later, its summary of repeated
            # lines): disconnect first, so that this line is the job's last
            ray.shutdown()
        print(f"{job}: data error: {str(root).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)


def _usage_error(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def driver_address(address: str | None = None) -> str:
    """The address a driver joins: `address`, else RAY_ADDRESS, else `auto`."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    # RAY_ADDRESS=http://...:8265 is the job server's address (for `ray job submit`); a driver joins the
    # cluster through the GCS, which `auto` finds on this machine.
    return "auto" if address.startswith("http") else address


def connect(address: str | None = None, **init_options: Any) -> None:
    """Attach to a running Ray cluster, or explain how to get one. Inside `ray job submit` this finds the
    job's cluster by itself. `init_options` go to `ray.init` (e.g. log_to_driver, runtime_env)."""
    import ray

    if ray.is_initialized():
        return
    address = driver_address(address)
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    hostport = re.fullmatch(r"(?:ray://)?([\w.-]+):(\d+)", address)
    if hostport and not _answers(hostport.group(1), int(hostport.group(2))):
        # Nothing listens there: say so now instead of after Ray's minutes of reconnecting.
        sys.exit(f"no Ray cluster at '{address}' (nothing accepts connections there); {START_HELP}")
    try:
        ray.init(address=address, **{"log_to_driver": True, "logging_level": logging.WARNING, **init_options})
    except ConnectionError as e:
        gcs = re.search(r"([\w.-]+):(\d+)\)?\.?$", str(e).strip())  # Ray names the GCS address it tried
        if gcs and _answers(gcs.group(1), int(gcs.group(2))):
            # Something listens there: a cluster that refused us. Ray reports a wrong token this way.
            sys.exit(f"the Ray cluster at {gcs.group(1)}:{gcs.group(2)} answers but refused this client ({e}); "
                     f"most likely the token does not match the cluster's. {TOKEN_HELP}")
        sys.exit(f"no Ray cluster at '{address}' ({str(e).rstrip('.')}); {START_HELP}")
    except Exception as e:  # Ray raises several types for a refused token
        if "auth" in str(e).lower() or "token" in str(e).lower():
            sys.exit(f"Ray refused the connection ({e}). {TOKEN_HELP}")
        raise


def _answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_resources(need: dict[str, float], what: str, cluster: C.ClusterConfig) -> None:
    """Fail fast, with numbers, when the cluster can never provide `need` (Ray would wait forever).

    A fixed cluster can never have more than it has now. An autoscaling one (`cluster.autoscaling`) can grow
    to the maximum its autoscaler publishes in the GCS (autoscaler v2, KubeRay); where none is published the
    check is skipped and Ray waits for nodes."""
    import ray

    selector = selector_now(cluster)
    most = labelled_resources(selector, what) if selector and not cluster.autoscaling else dict(ray.cluster_resources())
    if cluster.autoscaling:
        published: dict[str, int] | None = None
        try:  # private API, also used by Ray Train's own check; absent -> no check
            from ray._private.state import state

            published = state.get_max_resources_from_cluster_config()
        except (ImportError, AttributeError):
            pass
        if not published:
            log.info("autoscaling cluster with no published maximum: not checking that it can hold %s", what)
            return
        most = {k: float(v) for k, v in published.items()}
    short = {k: (v, float(most.get(k, 0))) for k, v in need.items() if v > 0 and float(most.get(k, 0)) < v}
    if short:
        lack = ", ".join(f"{v:g} {k} (the cluster {'can grow to' if cluster.autoscaling else 'has'} {have:g})"
                         for k, (v, have) in short.items())
        raise RuntimeError(f"{what} need {lack}: this would wait forever. Ask for less (cluster.num_workers, "
                           "cluster.synth_actors, cluster.use_gpu=false) or add nodes"
                           + ("" if cluster.autoscaling else "; on an autoscaling cluster set cluster.autoscaling=true"))


def label_matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Whether a node's labels satisfy a Ray label selector: per key `value`, `!value`, `in(a,b)` or `!in(a,b)`."""
    for key, want in selector.items():
        negate = want.startswith("!")
        want = want[1:] if negate else want
        values = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") and want.endswith(")") else [want]
        if (labels.get(key) in values) == negate:
            return False
    return True


def labelled_nodes(selector: dict[str, str]) -> list[dict[str, Any]]:
    """The alive Ray nodes (ray.nodes() entries) whose labels match `selector`."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and label_matches(n.get("Labels") or {}, selector)]


def labelled_resources(selector: dict[str, str], what: str) -> dict[str, float]:
    """The resources of the alive nodes whose labels match `selector` (cluster.label_selector) summed; one clear
    error when no node matches (Ray would wait forever for one)."""
    import ray

    chosen = labelled_nodes(selector)
    if not chosen:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        seen = "; ".join(f"{n.get('NodeManagerAddress')}: "
                         + (", ".join(f"{k}={v}" for k, v in sorted((n.get("Labels") or {}).items())
                                      if not k.startswith("ray.io/")) or "no labels of its own")
                         for n in alive)
        raise RuntimeError(f"{what}: no alive node carries the labels {selector} (cluster.label_selector), so Ray "
                           f"would wait forever. The nodes: {seen}. Start a node with `ray start --address ... "
                           "--labels key=value`, or clear the selector (cluster.label_selector={})")
    total: dict[str, float] = {}
    for n in chosen:
        for k, v in (n.get("Resources") or {}).items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def placement(cluster: C.ClusterConfig) -> dict[str, Any]:
    """Ray options that keep a task, an actor or a training worker on the nodes cluster.label_selector names
    (`selector_now`)."""
    selector = selector_now(cluster)
    return {"label_selector": dict(selector)} if selector else {}


def in_worker(object_cache: str) -> None:
    """First thing in every Ray worker process of a job (tasks, training workers, synthesis actors, trials): the
    driver's object cache root is this process's too (the paths handed over are the driver's mirror paths, see
    oal.storage; on each node that path is the node's own disk), and the node's id goes into the manifests'
    `written_by`."""
    import ray

    from oal import stages

    os.environ[storage.OBJECT_CACHE_ENV] = object_cache
    os.environ[stages.NODE_ENV] = ray.get_runtime_context().get_node_id()


def _worker_task(cluster: C.ClusterConfig, what: str) -> Any:
    """`_logged` as a Ray task with a training worker's resources (checked against the cluster first)."""
    import ray

    gpus = 1 if cluster.use_gpu else 0
    require_resources({"CPU": cluster.cpus_per_worker, "GPU": gpus}, what, cluster)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Outside any placement group: a Ray Tune trial captures its child tasks into its own group, which holds no
    # CPU (jobs.tune.TRIAL_RESOURCES); the task takes the cluster's resources like the trial's trainer does.
    outside = PlacementGroupSchedulingStrategy(placement_group=None)  # type: ignore[arg-type]
    return ray.remote(num_cpus=cluster.cpus_per_worker, num_gpus=gpus, max_retries=cluster.max_failures,
                      scheduling_strategy=outside, **placement(cluster))(_logged)


def on_worker(cluster: C.ClusterConfig, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a Ray worker process with a training worker's resources (`cluster.cpus_per_worker`
    CPUs, and one GPU when `cluster.use_gpu`), retried on another worker when its process dies; returns what `fn`
    returns. The driver (on a cluster, the head) only waits: it needs neither the data nor a GPU."""
    import ray

    return ray.get(_worker_task(cluster, what).remote(fn, args, kwargs, str(storage.cache_root())))


def shard_count(cluster: C.ClusterConfig) -> int:
    return cluster.shards or cluster.num_workers


def on_shards(cluster: C.ClusterConfig, what: str, shard_fn: Any, finish_fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Data-parallel `on_worker`: `shard_fn(*args, shard=(i, n), **kwargs)` for i < n (`shard_count`) as n Ray
    tasks at once, each on its slice of the data, then `finish_fn(parts)` in one more task, given
    the shards' results in shard order (Ray hands them over worker to worker; the driver never holds them). A
    shard whose worker dies is retried alone. With one shard this is `on_worker(shard_fn)` then `finish_fn`.
    Placed on labelled nodes (cluster.label_selector) that are all lost, the shards still waiting go on on any
    node (`placed`)."""
    import ray

    n = shard_count(cluster)
    cache = str(storage.cache_root())

    def shards(which: list[int]) -> list[Any]:
        task = _worker_task(cluster, what)
        return [task.remote(shard_fn, args, {**kwargs, "shard": (i, n)}, cache) for i in which]

    def merged(_: list[int] | None = None) -> list[Any]:
        # Merging, scoring and writing need no GPU: one CPU, so that an autoscaler starts no GPU node for them.
        merge = _worker_task(cluster, what).options(num_cpus=min(1.0, cluster.cpus_per_worker), num_gpus=0)
        return [merge.remote(_gathered, (finish_fn,), {}, cache, *parts)]

    parts = shards(list(range(n)))
    log.info("%s: %d shard(s) on Ray workers", what, n)
    try:
        parts = placed(cluster, what, parts, shards)
        return ray.get(placed(cluster, what, merged(), merged)[0])
    except BaseException:
        for ref in parts:  # a failed shard (or an interrupted driver) stops the others, not only the merge
            ray.cancel(ref)
        raise


STRANDED_CHECK_S = 2.0  # how often tasks placed on labelled nodes that wait check whether those nodes are gone (one GCS call)


def placed(cluster: C.ClusterConfig, what: str, refs: list[Any], again: Any) -> list[Any]:
    """`refs` (tasks placed by cluster.label_selector) once all are done. While some wait, every STRANDED_CHECK_S
    seconds: when no alive node carries the labels any more (the nodes were lost, and Ray retries their tasks with
    the same selector, which would wait for such a node to join), the waiting ones are cancelled and made again by
    `again(their indices)`, which places them on any node now (`labels_lost` recorded the loss: `selector_now`).
    Done tasks are kept: nothing is computed twice. Without a selector this returns at once (ray.get waits)."""
    import ray

    if not selector_now(cluster):
        return refs
    refs = list(refs)
    while True:
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=STRANDED_CHECK_S, fetch_local=False)
        if not waiting:
            return refs
        stranded = [i for i, r in enumerate(refs) if r in waiting]
        if not labels_lost(cluster.label_selector, what, f"{len(stranded)} waiting task(s) go on on any node"):
            continue
        for i in stranded:
            ray.cancel(refs[i])
        for i, ref in zip(stranded, again(stranded)):
            refs[i] = ref
        return refs


def labels_lost(selector: dict[str, str], what: str, goes_on: str, wait_s: float = 0.0) -> bool:
    """Whether what was placed on the nodes `selector` (cluster.label_selector) names must go on elsewhere: no
    alive node carries those labels (any more), so whatever Ray still holds for such a node would wait for one to
    join. Then one warning: "`what`: no alive node carries the labels ... any more: `goes_on`". `wait_s`: how long
    to wait for the labelled nodes to be declared dead (the GCS notices a lost node a few seconds after its workers
    failed) before saying no. No selector: False."""
    import time

    if not selector:
        return False
    deadline = time.monotonic() + wait_s
    while labelled_nodes(selector):
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)
    log.warning("%s: no alive node carries the labels %s (cluster.label_selector) any more: %s; so does what "
                "follows in this job until a node with those labels joins", what, selector, goes_on)
    if dict(selector) not in _LOST:
        _LOST.append(dict(selector))
    return True


_LOST: list[dict[str, str]] = []  # the selectors whose nodes this process saw all lost (labels_lost)


def selector_now(cluster: C.ClusterConfig) -> dict[str, str]:
    """The label selector to place with now: cluster.label_selector, or none once this process saw every node
    carrying it lost (`labels_lost`, e.g. during an earlier stage of the same pipeline) while none has joined
    since. A selector that no node ever carried here is kept, and meets `require_resources`' clear error."""
    selector = cluster.label_selector
    if selector and dict(selector) in _LOST and not labelled_nodes(selector):
        return {}
    return selector


def _gathered(finish_fn: Any, *parts: Any) -> Any:
    return finish_fn(list(parts))


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def _logged(fn: Any, args: tuple, kwargs: dict, object_cache: str, *resolved: Any) -> Any:
    """In the worker: the stage's own INFO lines (a worker's root logger drops them) go to its stderr, which Ray
    forwards to the driver and the job log, as they did when the stage ran in the driver. The driver's object
    cache root is this process's too: the paths handed over are the driver's mirror paths (oal.storage)."""
    in_worker(object_cache)
    ours = logging.getLogger("oal")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    return fn(*args, *resolved, **kwargs)


class Workers:
    """Executor (`oal.registry`) of the stages that run as Ray tasks: a sharded stage as one task per slice of its
    data then a merging task (`on_shards`), a whole one as one task (`on_worker`); each with a training worker's
    resources. `what` names the stage in logs and errors (default: "the <name> stage").
    `jobs.pipeline.RayExecutor` adds the training stages (Ray Train) and the latents (the actor pool)."""

    def __init__(self, what: str | None = None):
        self.what = what

    def compute(self, stage: Any, cfg: C.OALConfig, fp: str, force: bool) -> Any:
        what = self.what or f"the {stage.name} stage"
        if stage.runs == "sharded":
            shard_fn, finish = stage.work(cfg, fp, None)  # each task builds its own benchmark
            return on_shards(cfg.cluster, what, shard_fn, finish)
        if stage.runs == "whole":
            return on_worker(cfg.cluster, what, stage.work(cfg, fp, None))
        raise ValueError(f"stage {stage.name} runs {stage.runs}, which Ray tasks alone do not run; "
                         "use jobs.pipeline.RayExecutor")


def evaluate_on_workers(cfg: C.OALConfig, what: str, checkpoint: str | None = None, out_dir: Any = None,
                        force: bool = False, of: str = "student") -> Any:
    """`oal.registry.evaluate` over `shard_count` Ray workers: (StageResult, its report, or None when skipped)."""
    from oal import registry

    res = registry.run(registry.evaluation(of, checkpoint, out_dir), cfg, Workers(what), force)
    return res, res.report
