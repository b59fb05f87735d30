"""A whole node lost in the middle of each stage, on a real multi-node Ray (`ray.cluster_utils.Cluster`, slow).

One cluster for the module: a head with `CPU: 0` (it runs the driver and Ray's own services, no work) and three
worker nodes of 1 CPU each, every node on 127.0.0.1. `run_dir` and `train.storage_path` are a local folder, which
every simulated node sees: shared storage. In each stage the node of one of its workers is removed
(`Cluster.remove_node`, its processes killed at once, as a reclaimed spot node) while that worker is mid-way, and the
result must equal a fault-free run's: for the statistics and the images an independent single-process computation
(cheaper than a second cluster run, and independent of Ray), for training an uninterrupted run on the same cluster.

Where the fault strikes is chosen, not raced: the worker that is to lose its node is the real product class or
training loop with one hold point added by this test (pickled by value into the workers): the first process to
reach it writes its node id to a marker file and waits there; the test removes that node, and the replacement
process, finding the marker taken, carries on. Nothing else in the product is changed.

The statistics are also run with nodes removed during the tree reduction itself: the adding collector's node right
after it added its peer's sums, then the node that holds the finished total before the driver reads it (there the
driver's reduction is paused by wrapping the product's `reduce_state`). The run completes with the fault-free sums:
a lost node is a lost actor, replaced, its batches redone, and that key reduced again (stats/reduce.py).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.exceptions import ObjectLostError
from ray_heads import loopback_nodes, wait_until
from safetensors.torch import load_file
from stats_reference import raw_sums, reference, rel_err

import nullbooth.models.sampler as sampler_module
import nullbooth.stats.dealer as dealer_module
import nullbooth.train.loop as loop_module
from nullbooth.config import load_config
from nullbooth.layout import LORA_DIR, LORA_WEIGHTS, projection_file
from nullbooth.models.sampler import load_sampling_pipeline, sample_batch, sample_images
from nullbooth.nullspace import null_space
from nullbooth.stats.build import build_covariance
from nullbooth.stats.collector import Collector
from nullbooth.stats.reduce import reduce_state, tree_reduce
from nullbooth.train.run import train

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["preserve.max_prompts=10", "preserve.holdout=2", "sampling.num_inference_steps=2",
         "covariance.num_workers=2", "covariance.batch_size=2", "covariance.eigh_group_size=64",
         "covariance.product_dtype=float64", "covariance.dtype=float64",
         "train.num_workers=2", "train.train_batch_size=1", "train.max_train_steps=4", "train.checkpoint_every=2",
         "train.metrics_every=4", "train.max_failures=1", "train.learning_rate=1e-2"]
PROMPTS = ["a photo of sks teapot", "a red circle", "a teapot on a table", "a blue square"]
SEEDS = [11, 12, 13, 14]


def make_config(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *SMALL, *extra])


# The GCS declares a node dead after 5 failed health checks 3 s apart (Ray's defaults); a removed node refuses the
# checks at once, so 3 checks 0.5 s apart find it as surely, about 13 s sooner per fault. The 10 s timeout of each
# check is kept: a busy node that answers late is not declared dead.
QUICK_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


# -- the cluster and the fault ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="nbmn-", dir="/tmp")  # private, and short: socket paths must fit in 107 bytes
    nodes = None
    try:  # a node that fails to start (Ray waits 30 s for a raylet) leaves no temp dir behind either
        with loopback_nodes():
            nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                  "temp_dir": temp, "_system_config": QUICK_DEATH})
            for _ in range(3):
                nodes.add_node(num_cpus=1)
            nodes.connect()
        yield nodes
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def holder(marker: Path):
    """The hold point: the first process to call it records its node and waits to be removed with it."""
    marker = str(marker)

    def hold() -> None:
        import os
        import time

        import ray

        try:
            os.close(os.open(marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # a replacement: the fault has happened
        with open(marker + ".tmp", "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        os.replace(marker + ".tmp", marker)
        time.sleep(600)  # the test removes this node (and this process) long before

    return hold


def remove_held_node(cluster: Cluster, marker: Path) -> Future:
    """In a background thread: wait for the marker, then remove the node it names, abruptly; the future holds the
    removed node's id."""
    done: Future = Future()

    def watch() -> None:
        try:
            node_id = wait_until(lambda: marker.exists() and marker.read_text(), f"a worker to reach {marker.name}",
                                 900)
            assert node_id != cluster.head_node.node_id  # the head (the driver's node) is never the one lost
            [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
            cluster.remove_node(node, allow_graceful=False)
            done.set_result(node_id)
        except BaseException as err:  # noqa: BLE001 - surfaced by done.result()
            done.set_exception(err)

    threading.Thread(target=watch, daemon=True).start()
    return done


def add_node_back(cluster: Cluster) -> None:
    """Three worker nodes again for the next stage."""
    with loopback_nodes():
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


# -- statistics ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lost_stats(cluster, tmp_path_factory):
    """Collector 0 holds in its second batch (one absorbed, one in hand) and its node is removed."""
    folder = tmp_path_factory.mktemp("multinode-stats")
    hold = holder(folder / "collector.held")

    class HeldCollector(Collector):
        def absorb(self, batch_id, first_index, prompts, collect=True):
            if self.slot == 0 and self.batches_absorbed == 1:
                hold()
            return super().absorb(batch_id, first_index, prompts, collect)

    before = alive_nodes()
    removed = remove_held_node(cluster, folder / "collector.held")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dealer_module, "Collector", HeldCollector)
        summary = build_covariance(make_config(folder / "run"))
    lost = {"before": before, "after": alive_nodes(), "node": removed.result()}
    add_node_back(cluster)
    return folder / "run", summary, lost


def projector(basis: torch.Tensor) -> torch.Tensor:
    """U·Uᵀ: the null space itself, whatever the eigenvectors' signs or order within it."""
    return basis.double() @ basis.double().T


@functools.cache
def fault_free() -> dict:
    """`reference` of the runs' config, computed once: it does not depend on run_dir, the only thing that differs."""
    return reference(make_config(ROOT / "runs" / "unused"))


def assert_fault_free_statistics(run_dir: Path) -> None:
    """The run's sums, row counts and bases equal a fault-free single-process computation's (relative 1e-12)."""
    ref = fault_free()  # fault-free, single process, no Ray
    manifest, sums = raw_sums(run_dir)
    assert manifest.text_rows == ref["text_rows"] == 8 * 32 * 2  # prompts × tokens × (cond + negative)
    assert rel_err(sums["text"], ref["text_sum"]) < 1e-12
    assert manifest.timesteps == ref["plan"] and set(ref["sums"]) == set(ref["plan"])
    covs = {"text": {"text": ref["text_sum"] / ref["text_rows"]}}
    for t in ref["plan"]:
        assert set(ref["sums"][t]) == set(manifest.image_layers)
        for name in manifest.image_layers:
            assert manifest.image_rows[str(t)][name] == ref["rows"][t][name]
            assert rel_err(sums[(t, name)], ref["sums"][t][name]) < 1e-12, (t, name)
        covs[t] = {name: ref["sums"][t][name] / ref["rows"][t][name] for name in manifest.image_layers}
    covs["global"] = {name: sum(covs[t][name] for t in ref["plan"]) / len(ref["plan"]) for name in manifest.image_layers}
    # Bases: the same null spaces as the reference's covariances give.
    kind, value = manifest.threshold["kind"], manifest.threshold["value"]
    for which, by_key in covs.items():
        stored = load_file(str(run_dir / projection_file(which)))
        for key, cov in by_key.items():
            prefix = "" if which == "text" else f"{key}."
            basis, eigenvalues, _ = null_space(torch.as_tensor(cov), kind, value)
            assert stored[f"{prefix}basis"].shape == basis.shape, (which, key)
            assert rel_err(stored[f"{prefix}eigenvalues"], eigenvalues) < 1e-12, (which, key)
            if basis.shape[1]:
                assert rel_err(projector(stored[f"{prefix}basis"]), projector(basis)) < 1e-9, (which, key)


def test_a_lost_collector_node_gives_the_fault_free_sums_rows_and_bases(lost_stats):
    run_dir, summary, lost = lost_stats
    assert lost["node"] in lost["before"] and lost["after"] == lost["before"] - {lost["node"]}
    assert summary["actor_failures"] == 1
    assert_fault_free_statistics(run_dir)


@pytest.fixture(scope="module")
def lost_in_reduction(cluster, lost_stats, tmp_path_factory):
    """Two nodes lost during the tree reduction of one statistics run (2 collectors on 2 of the 3 worker nodes, so
    the tree crosses nodes: collector 0 adds collector 1's partial, read from collector 1's node).

    1. First timestep: collector 0 holds right after adding collector 1's sums into its buffer, and its node is
       removed: its own sums, the buffer with its peer's sums and its object-store copies go with it.
    2. Second timestep: every addition has succeeded and the total lies in collector 0's (the replacement's) node's
       object store only; the driver's reduction is paused there (the product's `reduce_state`, wrapped by this
       test) while a node is added and that node removed, then reads the total: it is gone with the node.
    The text side was reduced and released before either: the replacements must not add it again.
    """
    folder = tmp_path_factory.mktemp("multinode-reduction")
    hold = holder(folder / "fold.held")
    lost_reads: list[BaseException] = []
    timesteps_seen: list[int] = []

    class HeldInFold(Collector):
        def fold(self, which, peer):
            rows = super().fold(which, peer)
            if self.slot == 0 and which != "text":
                hold()  # the first one only: a replacement finds the marker taken
            return rows

    def losing_reduce(nodes, which):
        if which == "text" or which in timesteps_seen:
            return reduce_state(nodes, which)
        timesteps_seen.append(which)
        if len(timesteps_seen) != 2:
            return reduce_state(nodes, which)
        total, folds, _ = tree_reduce(nodes, which)
        ray.get(folds)
        ray.wait([total], fetch_local=False)  # computed, and in its node's object store only
        node_id = ray.get(nodes[0][0].node_id.remote())
        add_node_back(cluster)  # a node for the replacement, as an autoscaler would add
        [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
        cluster.remove_node(node, allow_graceful=False)
        lost_nodes.append(node_id)
        try:
            return ray.get(total)
        except BaseException as err:
            lost_reads.append(err)
            raise

    lost_nodes: list[str] = []
    before = alive_nodes()
    removed = remove_held_node(cluster, folder / "fold.held")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dealer_module, "Collector", HeldInFold)
        patch.setattr(dealer_module, "reduce_state", losing_reduce)
        summary = build_covariance(make_config(folder / "run"))
    lost = {"before": before, "after": alive_nodes(), "nodes": [removed.result(), *lost_nodes],
            "reads": lost_reads, "timesteps": timesteps_seen}
    add_node_back(cluster)
    return folder / "run", summary, lost


def test_nodes_lost_during_the_tree_reduction_give_the_fault_free_sums_rows_and_bases(lost_in_reduction):
    """The decision (stats/reduce.py): a node lost during the reduction is survived, exactly once. The actors never
    modify their own sums while reducing, and the driver takes a key's total only once every addition succeeded;
    so when an actor, its buffer or an object-store copy is lost, the driver replaces the actor, redoes its batches
    (for the keys not yet released) and reduces that key again from the live actors' own sums."""
    run_dir, summary, lost = lost_in_reduction
    first, second = lost["nodes"]
    assert first != second and not {first, second} & lost["after"]
    assert first in lost["before"] and len(lost["after"]) == len(lost["before"]) - 1  # one node added meanwhile
    assert len(lost["timesteps"]) == 2
    # The second loss was of the total itself, in the lost node's object store: reading it failed as lost.
    assert len(lost["reads"]) == 1 and isinstance(lost["reads"][0], ObjectLostError), lost["reads"]
    assert summary["actor_failures"] == 2
    assert_fault_free_statistics(run_dir)


# -- training --------------------------------------------------------------------------------------------------------
def lora_of(summary) -> dict[str, torch.Tensor]:
    """The final checkpoint's LoRA (run_dir/lora is replaced by every later training in the same run_dir)."""
    return load_file(str(Path(summary["checkpoint"]) / LORA_DIR / LORA_WEIGHTS))


@pytest.fixture(scope="module")
def clean_train(lost_stats):
    summary = train(make_config(lost_stats[0], "train.name=clean"))
    return summary, lora_of(summary)


@pytest.fixture(scope="module")
def lost_train(cluster, lost_stats, clean_train, tmp_path_factory):
    """Worker 0 holds before step 3 (after the step-2 checkpoint); its node is removed while worker 1 waits in the
    step's all-reduce."""
    folder = tmp_path_factory.mktemp("multinode-train")
    hold = holder(folder / "train.held")

    def held_loop(loop_config):
        from nullbooth.train import loop

        real_step = loop._train_step

        def step(worker, experiment, progress):
            if worker.rank == 0 and worker.step + 1 == 3:
                hold()
            return real_step(worker, experiment, progress)

        loop._train_step = step
        return loop.train_loop_per_worker(loop_config)

    before = alive_nodes()
    removed = remove_held_node(cluster, folder / "train.held")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "train_loop_per_worker", held_loop)
        summary = train(make_config(lost_stats[0], "train.name=lost"))
    lost = {"before": before, "after": alive_nodes(), "node": removed.result()}
    add_node_back(cluster)
    return summary, lora_of(summary), lost


def test_a_lost_train_worker_node_resumes_and_ends_equal_to_the_uninterrupted_run(clean_train, lost_train):
    summary, lora, lost = lost_train
    assert lost["after"] == lost["before"] - {lost["node"]}
    assert summary["resumed_from"] == [2] and summary["steps"] == 4
    assert clean_train[0]["resumed_from"] == [] and clean_train[0]["steps"] == 4
    assert summary["report"]["loss_history"] == clean_train[0]["report"]["loss_history"]
    assert lora.keys() == clean_train[1].keys() and lora
    for key, value in clean_train[1].items():
        assert torch.equal(lora[key], value), key


# -- generation (Ray Data actor pool) --------------------------------------------------------------------------------
def sample_here(config, lora_dir: str) -> list[dict]:
    """The fault-free reference: each prompt alone (the pool's batch size is 1), base then fine-tuned, with the
    sampler's own functions in this process, on one thread as in a 1-CPU actor, so the floats are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_sampling_pipeline(config, "cpu", lora_dir)
        rows = []
        for prompt, seed in zip(PROMPTS, SEEDS):
            pipe.disable_lora()
            (base_image,), (base_latent,) = sample_batch(config, pipe, [prompt], [seed])
            pipe.enable_lora()
            (image,), (latent,) = sample_batch(config, pipe, [prompt], [seed])
            rows.append({"prompt": prompt, "seed": seed, "image": image, "latent": latent,
                         "base_image": base_image, "base_latent": base_latent})
        return rows
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generated(cluster, lost_stats, clean_train, tmp_path_factory):
    """The prompts sampled by a pool of 2 actors whose first actor holds in its first batch and loses its node."""
    config = make_config(lost_stats[0])
    lora_dir = str(Path(clean_train[0]["checkpoint"]) / LORA_DIR)
    folder = tmp_path_factory.mktemp("multinode-generate")
    hold = holder(folder / "sampler.held")

    class HeldSampler(sampler_module._SamplerActor):
        def __call__(self, batch):
            hold()
            return super().__call__(batch)

    before = alive_nodes()
    removed = remove_held_node(cluster, folder / "sampler.held")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler_module, "_SamplerActor", HeldSampler)
        lost = sample_images(config, PROMPTS, SEEDS, lora_dir=lora_dir, num_workers=2, batch_size=1, with_base=True)
    fault = {"before": before, "after": alive_nodes(), "node": removed.result()}
    add_node_back(cluster)
    return sample_here(config, lora_dir), lost, fault


def test_a_lost_generation_node_still_gives_every_image_in_order_equal_to_the_fault_free_run(generated):
    clean, lost, fault = generated
    assert fault["after"] == fault["before"] - {fault["node"]}
    assert [(r["prompt"], r["seed"]) for r in lost] == list(zip(PROMPTS, SEEDS))
    for a, b in zip(lost, clean):
        for key in ("image", "latent", "base_image", "base_latent"):
            assert np.array_equal(a[key], b[key]), (a["prompt"], key)
    # The LoRA is live in these samples: fine-tuned and base differ for some prompt.
    assert any(not np.array_equal(r["latent"], r["base_latent"]) for r in clean)


def test_every_node_is_on_loopback_and_the_driver_on_the_head(cluster):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
