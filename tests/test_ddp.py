"""torchrun (issue 14 §4): `mas3-edge prototypes` and `mas3-edge train` as two gloo workers on the CPU.

Each test launches the real command under `python -m torch.distributed.run --standalone` (a free
rendezvous port of its own), with the GPU hidden so the workers use gloo wherever the tests run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from mas3_edge import bundle, dist, prototypes, train
from mas3_edge.config import preset
from mas3_edge.data import open_dataset
from mas3_edge.synth import write_folder

SMALL = replace(preset("tiny"), input_size=(64, 128))


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """`mas3-edge ARGS` as two workers; fails the test with the workers' output if they fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mas3_edge", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _source_bundle(data: Path, root: Path) -> None:
    """A model trained for 60 steps (2-3 s): right on a few hundred grid cells of 3-4 classes, so
    the GMM has something in it (an untrained one calls every pixel one class the scenes lack)."""
    items = [pair for pair in open_dataset(data, size=SMALL.input_size)]
    train.train(items, SMALL, train.TrainConfig(steps=60, batch_size=4, lr=5e-3), root, root / "ckpt")


def test_two_workers_write_the_prototypes_of_one(tmp_path: Path):
    # 20 images, batches of 8: rank 0 embeds batches 0 and 2 (12 images), rank 1 batch 1 (8), so a
    # missing all-reduce would leave rank 0's file with a share of the counts, not all of them
    data = write_folder(tmp_path / "data", "synthetic", 20, size=SMALL.input_size)
    _source_bundle(data, tmp_path / "b")
    _torchrun("prototypes", "--bundle", str(tmp_path / "b"), "--data", str(data), "--device", "cpu",
              "--min-count", "1")
    ver = bundle.load_version(tmp_path / "b")
    two = safetensors.torch.load_file(str(ver.prototypes_path))
    one = prototypes.fit(ver.net, open_dataset(data, size=SMALL.input_size), min_count=1)
    assert one.counts.sum() > 300 and (one.counts > 0).sum() >= 3  # something to compare
    assert torch.equal(two["counts"], one.counts)  # integer sums: exact whatever the order
    # the float64 sums differ only in summation order (~1e-16); the file is float32, where that can
    # at most move a value by one rounding step
    for name in ("alpha", "mean", "chol"):
        torch.testing.assert_close(two[name], getattr(one, name), rtol=1e-6, atol=1e-7)


def test_train_under_two_workers_writes_one_version(tmp_path: Path):
    data = write_folder(tmp_path / "data", "synthetic", 4, size=(64, 128))
    out = _torchrun("train", "--data", str(data), "--bundle", str(tmp_path / "b"), "--steps", "2",
                    "--batch-size", "2", "--device", "cpu")
    assert bundle.version_ids(tmp_path / "b") == ["v0001"]  # rank 1 wrote no second version
    assert out.stdout.count("wrote ") == 1
    meta = bundle.load_version(tmp_path / "b").meta
    assert meta["info"]["train"]["workers"] == 2


def test_ranks_see_disjoint_shards_reshuffled_each_epoch():
    # no process group needed: the sampler is told rank and world
    cfg = train.TrainConfig(batch_size=3, seed=7)
    ranks = [dist.Context(rank=r, world=2) for r in range(2)]
    rng = np.random.default_rng(0)  # unused under torchrun: the sampler is seeded by cfg.seed

    def epoch(ctx: dist.Context, e: int) -> np.ndarray:  # 6 images per rank and epoch: 2 steps of 3
        return np.concatenate([train._indices(12, s, cfg, ctx, rng) for s in (2 * e, 2 * e + 1)])

    first, second = [epoch(c, 0) for c in ranks], [epoch(c, 1) for c in ranks]
    assert sorted(np.concatenate(first).tolist()) == list(range(12))  # one epoch: every image once
    assert sorted(np.concatenate(second).tolist()) == list(range(12))
    assert not np.array_equal(first[0], second[0])  # set_epoch reshuffled
    # a batch across an epoch boundary (6 per rank per epoch, batches of 4), and the same on resume
    wide = train.TrainConfig(batch_size=4, seed=7)
    assert np.array_equal(train._indices(12, 1, wide, ranks[0], rng), train._indices(12, 1, wide, ranks[0], rng))
    assert set(train._indices(12, 1, wide, ranks[0], rng)[:2]) <= set(first[0].tolist())
