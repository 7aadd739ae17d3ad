"""Latent outlier synthesis on a pool of Ray actors.

Each actor loads the diffusion model once and holds one GPU (or `cluster.synth_cpus_per_actor` CPUs).
Shards go out as a work queue: an actor gets the next shard when it returns one, so faster devices take
more. The driver writes each returned shard (write, then rename), so outputs are idempotent and live
where the driver's run folder is. A dead actor's shard goes back on the queue and a replacement actor
is started: the job ends with every shard present exactly once, then the manifest is written.

Why actors and not Ray Data `map_batches`: a shard's content is fixed by (seed, shard index), and
the resume unit is a named file per shard; Ray Data writes randomly named files and would need the same
bookkeeping on top. The pool here is ~60 lines and every failure path is ours to test.

    python -m jobs.synthesize --config digits cluster.synth_actors=2
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from jobs.common import STRANDED_CHECK_S  # also how often a pool whose shards wait on actors that cannot start looks
from oal import config as C
from oal import stages, storage
from oal.storage import load_torch, save_torch
from oal.synthesize import LatentSynthesizer, ShardSpec, finalize, plan_shards, shard_ok

log = logging.getLogger("oal.jobs.synthesize")


class SynthActor:
    """Holds one diffusion model; computes shards on request."""

    def __init__(self, diffusion: dict, class_names: list[str], outliers: torch.Tensor, model_seed: int,
                 use_gpu: bool, threads: int, object_cache: str):
        from jobs.common import in_worker

        in_worker(object_cache)  # the model checkpoint is named by the driver's mirror path
        torch.set_num_threads(max(1, threads))  # share the node's cores with the other actors
        self.synth = LatentSynthesizer(C.DiffusionConfig(**diffusion), class_names, outliers,
                                       "cuda" if use_gpu else "cpu", model_seed)

    def run(self, spec: ShardSpec) -> dict[str, Any]:
        return self.synth.run(spec)

    def ready(self) -> bool:
        return True


def check_resources(cfg: C.ClusterConfig) -> None:
    """The cluster must be able to hold one synthesis actor (more only make it faster)."""
    from jobs.common import require_resources

    need = {"GPU": 1.0, "CPU": 1.0} if cfg.use_gpu else {"CPU": cfg.synth_cpus_per_actor}
    require_resources(need, "a synthesis actor" + (" with one GPU" if cfg.use_gpu else ""), cfg)


class ActorPool:
    """`cluster.synth_actors` SynthActors (fewer if there are fewer shards); a dead one is replaced."""

    def __init__(self, cfg: C.OALConfig, class_names: list[str], outliers: torch.Tensor, size: int | None = None):
        import ray

        k = cfg.cluster
        check_resources(k)
        from jobs.common import placement, selector_now

        opts = {"num_gpus": 1, "num_cpus": 1} if k.use_gpu else {"num_cpus": k.synth_cpus_per_actor}
        self._selector = dict(selector_now(k))
        self._anywhere: Any = ray.remote(**opts)(SynthActor)
        self._remote: Any = ray.remote(**opts, **placement(k))(SynthActor) if self._selector else self._anywhere
        self._args = (C.to_dict(cfg.diffusion), class_names, ray.put(outliers), cfg.seed, k.use_gpu,
                      max(1, int(k.synth_cpus_per_actor)), str(storage.cache_root()))
        self.actors: list[Any] = [self._remote.remote(*self._args) for _ in range(size or k.synth_actors)]
        self._placed = set(self.actors) if self._selector else set()  # made with the selector (may be stranded)

    def replace(self, dead: Any) -> Any:
        import ray

        from jobs.common import labels_lost

        ray.kill(dead)  # already dead: only frees the handle
        self.actors.remove(dead)
        self._placed.discard(dead)
        remote = self._remote
        if labels_lost(self._selector, "synthesis", "the replacement synthesis actor runs on any node"):
            remote = self._anywhere
        self.actors.append(remote.remote(*self._args))
        if remote is not self._anywhere:
            self._placed.add(self.actors[-1])
        return self.actors[-1]

    def unstrand(self, starting: dict[Any, Any]) -> dict[Any, Any]:
        """When no alive node carries the pool's labels any more (its node was lost after the replacements were
        made), the actors still waiting to start would wait forever: each is replaced by one that runs on any node.
        Takes them out of `starting` and returns the replacements' ready refs. Actors already made on any node are
        left to start (loading the model takes a while)."""
        from jobs.common import labelled_nodes

        stranded = [ref for ref, actor in starting.items() if actor in self._placed]
        if not stranded or labelled_nodes(self._selector):
            return {}
        fresh = {}
        for ref in stranded:
            new = self.replace(starting.pop(ref))  # on any node now (replace says so)
            fresh[new.ready.remote()] = new
        return fresh

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model (the constructor ran)."""
        import ray

        ray.get([a.ready.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def run_pool(cfg: C.OALConfig, out: Path, class_names: list[str], outliers: torch.Tensor, fingerprint: str,
             progress: bool = True, pool: ActorPool | None = None, stats: dict[str, Any] | None = None,
             redo: bool = False) -> dict[str, Any]:
    """Compute every missing shard (`redo`: every shard) on the actor pool, then finalize (vectors file, manifest
    last).
    `pool`: actors already started (kept running afterwards); default: a pool for this call only. `stats`, when
    given, receives `actors_replaced` and `requeued_shards` (the indices of shards whose actor died under them)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    d, k = cfg.diffusion, cfg.cluster
    plan = plan_shards(d.num_outliers, d.shard_size, cfg.seed)
    queue: deque[ShardSpec] = deque(s for s in plan if redo or not shard_ok(out / s.filename))
    log.info("synthesis on Ray: %d of %d shards to do, %d actors", len(queue), len(plan),
             len(pool.actors) if pool else k.synth_actors)
    if queue:
        own = pool is None
        pool = pool or ActorPool(cfg, class_names, outliers, min(k.synth_actors, len(queue)))
        running: dict[Any, tuple[Any, ShardSpec]] = {}
        replaced, t0, done = 0, time.perf_counter(), 0  # actors replaced during this call
        requeued: list[int] = []
        bar = tqdm(total=sum(s.count for s in queue), desc="latent outliers (ray)", unit="outlier",
                   disable=not progress, dynamic_ncols=True)
        # Shards go only to actors that have loaded their model: an actor the cluster has no room for yet (its
        # CPUs busy, its labelled nodes full) stays pending without holding a shard, and the others do the work.
        starting = {a.ready.remote(): a for a in pool.actors}
        idle: list[Any] = []

        def died(actor: Any, e: Exception, spec: ShardSpec | None) -> None:
            nonlocal replaced
            if isinstance(e, RayTaskError) and not isinstance(e.cause, RayActorError):
                raise e  # a bug in the model's loading or the shard's computation: retrying would fail again
            replaced += 1
            if replaced > k.synth_max_replacements:
                raise RuntimeError(f"{replaced} synthesis actors died (cluster.synth_max_replacements="
                                   f"{k.synth_max_replacements}); last error: {e}") from None
            if spec is None:
                log.warning("synthesis actor died while loading its model; actor replaced (%d/%d)",
                            replaced, k.synth_max_replacements)
            else:
                log.warning("synthesis actor died on shard %d; shard re-queued, actor replaced (%d/%d)",
                            spec.index, replaced, k.synth_max_replacements)
                queue.appendleft(spec)
                requeued.append(spec.index)
            new = pool.replace(actor)
            starting[new.ready.remote()] = new

        try:
            while queue or running:
                while queue and idle:
                    actor, spec = idle.pop(), queue.popleft()
                    running[actor.run.remote(spec)] = (actor, spec)
                ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=STRANDED_CHECK_S)
                if not ready:
                    if not running and not idle:  # shards wait, and only actors that have not started could take them
                        for ref, actor in pool.unstrand(starting).items():
                            starting[ref] = actor
                    continue
                if ready[0] in starting:
                    actor = starting.pop(ready[0])
                    try:
                        ray.get(ready[0])
                        idle.append(actor)
                    except (RayActorError, RayTaskError) as e:
                        died(actor, e, None)
                    continue
                actor, spec = running.pop(ready[0])
                try:
                    shard = ray.get(ready[0])
                except (RayActorError, RayTaskError) as e:
                    died(actor, e, spec)
                    continue
                save_torch(shard, out / spec.filename)
                done += spec.count
                bar.update(spec.count)
                idle.append(actor)
        finally:
            bar.close()
            if own:
                pool.shutdown()
        seconds = time.perf_counter() - t0
        log.info("synthesis on Ray: %d outliers in %.1f s (%.2f outliers/s, %d actor(s) replaced)",
                 done, seconds, done / max(seconds, 1e-9), replaced)
        if stats is not None:
            stats.update(actors_replaced=replaced, requeued_shards=requeued)
    from oal.diffusion import model_id

    return finalize(d, plan, out, cfg.seed, model_id(d, cfg.seed), fingerprint)


def run_stage(cfg: C.OALConfig, progress: bool = True, force: bool = False) -> stages.StageResult:
    """The `latents` stage of the pipeline, on the actor pool, unless its outputs are up to date."""
    from oal import registry

    return registry.run(registry.named("latents"), cfg, Pool(progress), force)


class Pool:
    """Executor (`oal.registry`) of the latents stage on the synthesis actor pool (`run_pool`)."""

    def __init__(self, progress: bool = True):
        self.progress = progress

    def compute(self, stage: Any, cfg: C.OALConfig, fp: str, force: bool) -> stages.StageResult:
        out = stages.stage_dir(cfg, "latents")
        knn = load_torch(stages.output_of(cfg, "knn", "outliers"), "k-NN outliers")
        cfg = replace(cfg, diffusion=stages.diffusion_config(cfg))  # builtin-ldm: the trained checkpoint's path
        manifest = run_pool(cfg, out, knn["class_names"], knn["outliers"], fp, self.progress, redo=force)
        from jobs.common import on_worker

        # the decoded grid (a VAE decode) on a worker too
        return on_worker(cfg.cluster, "the latents stage's grid", stages.finish_latents, cfg, manifest)


def main(argv: list[str] | None = None) -> int:
    from jobs import common

    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = common.load(args)
    common.connect(args.address)
    with common.data_errors("jobs.synthesize"):
        res = run_stage(cfg, progress=not args.no_progress)
    print(f"[latents] {'skipped (up to date)' if res.skipped else 'done'}: {res.outputs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
