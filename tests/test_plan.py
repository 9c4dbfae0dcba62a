"""The epoch plan: equal steps per rank, no sample twice per epoch, exact eval, resumable."""

import numpy as np
import pytest

from shardtrain.data.plan import TrainPlan, check_batch_layout, epoch_order, eval_ids

UNEVEN = (20, 20, 20, 20, 10)  # 5 shards, 90 samples: webdataset gives ranks 7 vs 6 batches


def plans(sizes, world, batch, accum=1, window=2, seed=0):
    return [TrainPlan(sizes, batch, world, r, accum, seed, window) for r in range(world)]


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_epoch_order_is_a_permutation_and_seeded(window):
    order = epoch_order(UNEVEN, seed=3, epoch=1, window=window)
    assert sorted(order.tolist()) == list(range(90))
    assert np.array_equal(order, epoch_order(UNEVEN, seed=3, epoch=1, window=window))
    assert not np.array_equal(order, epoch_order(UNEVEN, seed=3, epoch=2, window=window))


def test_block_shuffle_touches_at_most_window_shards_at_a_time():
    sizes = (20,) * 6
    order = epoch_order(sizes, seed=0, epoch=0, window=2)
    shard_of = order // 20
    for w in range(3):  # each block of 40 samples comes from exactly two shards
        assert len(set(shard_of[w * 40:(w + 1) * 40].tolist())) == 2


@pytest.mark.parametrize("world,batch,accum", [(2, 8, 1), (2, 16, 2), (3, 12, 1), (4, 8, 1),
                                                (8, 16, 1)])
def test_equal_steps_and_no_repeats_on_uneven_shards(world, batch, accum):
    ps = plans(UNEVEN, world, batch, accum)
    micro = ps[0].micro_per_epoch
    assert all(p.micro_per_epoch == micro for p in ps)  # same step count on every rank
    seen = []
    for p in ps:
        for i in range(micro):
            epoch, ids = p.micro_batch(i)
            assert epoch == 0 and len(ids) == batch // (world * accum)
            seen += ids.tolist()
    assert len(seen) == len(set(seen)) == (90 // batch) * batch  # at most one batch dropped


def test_fewer_shards_than_ranks_times_workers():
    ps = plans((30, 30), world=4, batch=8)
    assert all(p.steps_per_epoch == 7 for p in ps)
    ids = np.concatenate([p.micro_batch(i)[1] for p in ps for i in range(7)])
    assert len(set(ids.tolist())) == 56


def test_optimizer_step_samples_do_not_depend_on_world_size():
    """Resuming with another world size keeps the sample schedule of every step."""
    def step_sets(world, accum):
        ps = plans(UNEVEN, world, 16, accum)
        steps = []
        for s in range(ps[0].steps_per_epoch * 2):  # two epochs
            ids = [p.micro_batch(s * accum + m)[1] for p in ps for m in range(accum)]
            steps.append(sorted(np.concatenate(ids).tolist()))
        return steps

    assert step_sets(1, 1) == step_sets(2, 1) == step_sets(4, 1) == step_sets(2, 2)


@pytest.mark.parametrize("n,world", [(33, 2), (33, 4), (5, 8), (100, 3)])
def test_eval_counts_every_sample_exactly_once(n, world):
    ids = np.concatenate([eval_ids(n, world, r) for r in range(world)])
    assert sorted(ids.tolist()) == list(range(n))


def test_bad_layouts_are_explained():
    with pytest.raises(ValueError, match="not divisible"):
        check_batch_layout(10, 4, 1, 100)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        check_batch_layout(64, 2, 1, 40)


def node_plans(sizes, world, nodes, canonical, batch, accum=1, window=2, partition="node"):
    return [TrainPlan(sizes, batch, world, r, accum, 0, window, partition, canonical, nodes)
            for r in range(world)]


def shards_per_node(ps, sizes, epoch):
    """{node: set of shards its ranks read in `epoch`}."""
    starts = np.cumsum((0,) + sizes)
    out = {}
    for p in ps:
        for i in range(epoch * p.micro_per_epoch, (epoch + 1) * p.micro_per_epoch):
            ids = p.micro_batch(i)[1]
            out.setdefault(p.node, set()).update((np.searchsorted(starts, ids, "right") - 1)
                                                 .tolist())
    return out


@pytest.mark.parametrize("sizes", [(20,) * 8, (20, 20, 20, 20, 10, 17, 3)])
def test_node_partition_each_shard_read_by_one_node(sizes):
    ps = node_plans(sizes, world=4, nodes=2, canonical=2, batch=8, accum=1)
    assert len({p.micro_per_epoch for p in ps}) == 1
    for epoch in range(3):
        seen = np.concatenate([p.micro_batch(i)[1] for p in ps
                               for i in range(epoch * ps[0].micro_per_epoch,
                                              (epoch + 1) * ps[0].micro_per_epoch)])
        assert len(seen) == len(set(seen.tolist())) == ps[0].steps_per_epoch * 8  # no repeats
        node_shards = shards_per_node(ps, sizes, epoch)
        assert len(node_shards[0] & node_shards[1]) <= 1  # at most C-1 shards straddle
    glob = node_plans(sizes, world=4, nodes=2, canonical=1, batch=8, partition="global")
    both = shards_per_node(glob, sizes, 0)
    assert both[0] == both[1] == set(range(len(sizes)))  # global plan: every node, every shard


def test_node_plan_steps_do_not_depend_on_the_physical_node_count():
    sizes = (20, 20, 20, 20, 10, 17, 3, 30)
    layouts = [(2, 1), (4, 2), (4, 4), (8, 8), (2, 2)]  # (world, nodes), C = 4 throughout
    per_layout = []
    for world, nodes in layouts:
        ps = node_plans(sizes, world, nodes, canonical=4, batch=16, accum=2)
        steps = []
        for step in range(ps[0].steps_per_epoch * 2):
            ids = [p.micro_batch(step * 2 + m)[1] for p in ps for m in range(2)]
            steps.append(sorted(np.concatenate(ids).tolist()))
        per_layout.append(steps)
    assert all(steps == per_layout[0] for steps in per_layout[1:])


def test_node_layout_checks():
    from shardtrain.data.plan import check_node_layout

    check_node_layout(16, nodes=2, canonical_nodes=4, num_samples=100)
    with pytest.raises(ValueError, match="divide one another"):
        check_node_layout(16, nodes=3, canonical_nodes=4, num_samples=100)
    with pytest.raises(ValueError, match="divisible by max"):
        check_node_layout(6, nodes=2, canonical_nodes=4, num_samples=100)


def test_node_plan_block_shuffles_within_each_canonical_node():
    from shardtrain.data.plan import node_orders

    rows = node_orders((20,) * 8, seed=0, epoch=0, window=2, canonical_nodes=2)
    assert rows.shape == (2, 80) and sorted(rows.ravel().tolist()) == list(range(160))
    for row in rows:  # two windows of 2 shards each: reads stay within 2 shards at a time
        for w in range(2):
            shards = row[w * 40:(w + 1) * 40] // 20
            assert len(set(shards.tolist())) == 2
            assert np.count_nonzero(np.diff(shards)) > 1  # the two shards' samples interleave
