"""Placing a job's work on labelled Ray nodes (cluster.label_selector), and an actor pool that works around actors the
cluster has no room for. The two-node run itself: tests/test_two_nodes.py."""

from __future__ import annotations

import threading

import pytest
import torch

from oal.config import ConfigError, load_config
from tests.conftest import QUICK


def test_label_selector_is_a_map_of_the_users_labels():
    cfg = load_config("digits", ["cluster.label_selector.oal-role=work"])
    assert cfg.cluster.label_selector == {"oal-role": "work"}
    assert load_config("digits", ["cluster.label_selector={oal-role: work, zone: b}"]).cluster.label_selector == \
        {"oal-role": "work", "zone": "b"}
    assert load_config("digits").cluster.label_selector == {}
    with pytest.raises(ConfigError, match=r"'cluster.label_selector' is 'work'.*it is a map.*"
                                          r"cluster.label_selector.<key>=<value>"):
        load_config("digits", ["cluster.label_selector=work"])
    with pytest.raises(ConfigError, match="unknown config key 'cluster.label_selectr'"):
        load_config("digits", ["cluster.label_selectr.a=b"])


@pytest.mark.parametrize(("labels", "selector", "matches"), [
    ({"oal-role": "work"}, {"oal-role": "work"}, True),
    ({"oal-role": "head"}, {"oal-role": "work"}, False),
    ({}, {"oal-role": "work"}, False),
    ({"oal-role": "head"}, {"oal-role": "!work"}, True),
    ({}, {"oal-role": "!work"}, True),
    ({"oal-role": "work"}, {"oal-role": "!work"}, False),
    ({"zone": "b"}, {"zone": "in(a, b)"}, True),
    ({"zone": "c"}, {"zone": "in(a,b)"}, False),
    ({"zone": "c"}, {"zone": "!in(a,b)"}, True),
    ({"zone": "b", "oal-role": "work"}, {"zone": "b", "oal-role": "head"}, False),
])
def test_label_matching_follows_rays_selector_syntax(labels, selector, matches):
    from jobs.common import label_matches

    assert label_matches(labels, selector) is matches


@pytest.mark.ray
def test_a_selector_no_node_satisfies_is_one_error_naming_the_nodes_labels(ray_head):
    import ray

    from jobs.common import require_resources

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    cluster = load_config("digits", ["cluster.label_selector.oal-role=nowhere"]).cluster
    with pytest.raises(RuntimeError, match=r"the embeddings stage: no alive node carries the labels "
                                           r"\{'oal-role': 'nowhere'\}.*The nodes: 127\.0\.0\.1: no labels"):
        require_resources({"CPU": 1.0}, "the embeddings stage", cluster)
    require_resources({"CPU": 1.0}, "the embeddings stage", load_config("digits").cluster)  # no selector: fits


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_the_cluster_has_no_room_for_holds_no_shard(ray_head, tmp_path):
    """Three synthesis actors of 1 CPU on a head of 2 CPUs: the third stays pending. The two that started do every
    shard (a pending actor given a shard would hold it until the job ends: the pool waited forever)."""
    import ray

    from jobs.synthesize import run_pool
    from oal.synthesize import plan_shards

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    count = 2 * (cpus + 1)  # a shard of 2 for each actor: the pending one is handed a shard by the old dispatch
    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", f"diffusion.num_outliers={count}",
                                 "diffusion.shard_size=2", f"cluster.synth_actors={cpus + 1}",
                                 "cluster.synth_cpus_per_actor=1"])
    outliers = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    done: dict = {}
    # In a thread: before the fix the pool waited forever, and a test must fail rather than hang the suite.
    worker = threading.Thread(target=lambda: done.update(manifest=run_pool(
        cfg, tmp_path / "latents", ["zero", "one", "two"], outliers, fingerprint="fp", progress=False)), daemon=True)
    worker.start()
    worker.join(180)
    assert "manifest" in done, "the pool is still waiting: a shard went to the actor that cannot start"
    manifest = done["manifest"]
    plan = plan_shards(count, 2, cfg.seed)
    assert manifest["count"] == count and manifest["shards"] == [s.filename for s in plan]
    assert sorted(p.name for p in (tmp_path / "latents").glob("shard_*.pt")) == [s.filename for s in plan]
