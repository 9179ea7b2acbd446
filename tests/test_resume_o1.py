"""Resume in O(1): a loader started at batch b of an epoch gives the full epoch's batches from b
on, bit for bit, without reading (let alone decoding) batches 0..b-1; a run resumed mid-epoch
with either pipeline gives the uninterrupted run's losses."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from fastmoco.pipelines import (
    build_labelled_train_loader,
    build_train_loader,
    get_linear_recipe,
    get_recipe,
    scan_image_folder,
    scan_webdataset,
)
from fastmoco.pipelines.webdataset import MemberReader
from hydra import compose, initialize_config_module

from fastmoco.config import TrainConfig, from_hydra
from fastmoco.training.loop import train
from fastmoco.training.position import RunPosition, epoch_batches
from fastmoco.weights.checkpoint import list_checkpoints, load_checkpoint

CPU = torch.device("cpu")
BATCH, WORLD, RANK = 8, 2, 1  # 48 images: 3 batches per rank and epoch
dali = pytest.param("dali", marks=pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                                    reason="NVIDIA DALI is not installed"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, cifar_root) -> dict:
    """48 CIFAR-10 JPEGs of 4 classes as an image folder (symlinks) and as 3 tar shards with .cls."""
    root = tmp_path_factory.mktemp("resume_o1")
    classes = sorted(p.name for p in (cifar_root / "train").iterdir())[:4]
    files = []
    for c, name in enumerate(classes):
        (root / "folder" / name).mkdir(parents=True)
        for f in sorted((cifar_root / "train" / name).iterdir())[:12]:
            (root / "folder" / name / f.name).symlink_to(f)
            files.append((f, c))
    (root / "shards").mkdir()
    for s in range(3):
        with tarfile.open(root / "shards" / f"{s}.tar", "w") as tf:
            for i, (f, c) in enumerate(files[s::3]):
                for member, payload in ((f"{s}_{i:03d}.jpg", f.read_bytes()), (f"{s}_{i:03d}.cls", b"%d\n" % c)):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTMOCO_CACHE", raising=False)
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        shards = scan_webdataset(root / "shards")
    return {"folder": scan_image_folder(root / "folder"), "shards": shards}


def _loader(kind: str, files, labelled: bool, workers: int | None = None):
    build, recipe = ((build_labelled_train_loader, get_linear_recipe("cifar")) if labelled
                     else (build_train_loader, get_recipe("cifar")))
    workers = (2 if kind == "dali" else 0) if workers is None else workers
    return build(kind, files, recipe, BATCH, device=CPU, num_workers=workers, rank=RANK, world_size=WORLD, seed=7)


@pytest.mark.parametrize("labelled", [False, True], ids=["two_view", "labelled"])
@pytest.mark.parametrize("fmt", ["folder", "shards"])
@pytest.mark.parametrize("kind", [dali, "torchvision"])
def test_starting_at_batch_b_gives_the_full_epochs_batches_from_b(data, kind, fmt, labelled):
    full_loader = _loader(kind, data[fmt], labelled)
    full_loader.set_epoch(1)
    full = list(full_loader)
    assert len(full) == len(full_loader) == 3
    assert not torch.equal(full[0][0], full[1][0])  # the batches differ: nothing trivially equal below
    for b in range(1, len(full) + 1):
        loader = _loader(kind, data[fmt], labelled)  # a fresh process's loader, as after a restart
        loader.set_epoch(1, start=b)
        got = list(loader)
        assert len(got) == len(full) - b and len(loader) == len(full)
        for step, (ours, theirs) in enumerate(zip(got, full[b:]), b):
            for x, y in zip(ours, theirs):
                assert torch.equal(x, y), (kind, fmt, b, step)


@pytest.mark.parametrize("kind", [dali, "torchvision"])
def test_epoch_batches_starts_where_the_progress_stands(data, kind):
    """The loop's one call site: epoch_batches passes batch_in_epoch, then moves to the next epoch."""
    reference = _loader(kind, data["folder"], False)
    reference.set_epoch(2)
    full = list(reference)
    progress = RunPosition(step=7, epoch=2, batch_in_epoch=2, total_steps=100)
    got = list(epoch_batches(_loader(kind, data["folder"], False), progress))
    assert len(got) == 1 and all(torch.equal(x, y) for x, y in zip(got[0], full[2]))
    assert (progress.epoch, progress.batch_in_epoch) == (3, 0)


@pytest.mark.parametrize("kind", [dali, "torchvision"])
def test_a_start_outside_the_epoch_names_the_cause(data, kind):
    loader = _loader(kind, data["folder"], False)
    with pytest.raises(ValueError, match="batch_in_epoch"):
        loader.set_epoch(0, start=len(loader) + 1)
    loader.set_epoch(0, start=len(loader))  # a checkpoint taken after the epoch's last batch
    assert list(loader) == []


# --- what a resume at the last batch reads ----------------------------------------------------

@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_torchvision_resume_at_the_last_batch_decodes_one_batch(data, fmt):
    counts = {}
    for name, start in (("full", 0), ("last", 2)):
        loader = _loader("torchvision", data[fmt], False)
        dataset = loader.loader.dataset
        load, n = dataset.load, [0]

        def counting(item, load=load, n=n):
            n[0] += 1
            return load(item)
        dataset.load = counting
        loader.set_epoch(1, start=start)
        list(loader)
        counts[name] = n[0]
    assert counts == {"full": 3 * BATCH, "last": BATCH}


def test_dali_folder_resume_at_the_last_batch_hands_dali_one_batch(data, monkeypatch):
    """DALI decodes only what its reader is given: the files of the batches from `start` on."""
    dali_loaders = pytest.importorskip("fastmoco.pipelines.dali")

    given = []

    class Counting(dali_loaders.FileReader):
        def __call__(self):
            given.append(len(self.files))
            return super().__call__()
    monkeypatch.setattr(dali_loaders, "FileReader", Counting)
    for start, expected in ((0, 3 * BATCH), (2, BATCH)):
        given.clear()
        loader = _loader("dali", data["folder"], False)
        loader.set_epoch(1, start=start)
        assert len(list(loader)) == 3 - start
        assert given == [expected]


def test_dali_shards_resume_at_the_last_batch_reads_one_batch(data, monkeypatch):
    """Over tar shards the members are read here, by offset, and handed to DALI's decoder: count them."""
    pytest.importorskip("nvidia.dali")
    reads = [0]
    read = MemberReader.__call__

    def counting(self, *args):
        reads[0] += 1
        return read(self, *args)
    monkeypatch.setattr(MemberReader, "__call__", counting)
    for start, expected in ((0, 3 * BATCH), (2, BATCH)):
        reads[0] = 0
        loader = _loader("dali", data["shards"], False)
        loader.set_epoch(1, start=start)
        assert len(list(loader)) == 3 - start
        assert reads[0] == expected


# --- exact resume of a training run -------------------------------------------------------------

FAST = ["backbone=resnet18_cifar", "+backbone.kwargs.channels=[8,16,32,64]", "pipeline.num_workers=1",
        "method.queue_size=64", "method.bn_splits=4", "schedule.batch_size=16", "run.log_every=1",
        "run.progress=false", "knn.enabled=false"]


def make_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module(config_module="fastmoco.conf", version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=overrides))


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.parametrize("kind", [dali, "torchvision"])
def test_resume_late_in_an_epoch_gives_the_same_losses(tiny_cifar, tmp_path, kind):
    """A run stopped late in its epoch (the step checkpoint at batch 4 of 6) and restarted gives
    the uninterrupted run's losses step by step, bit for bit: the same batches from the same
    images and augmentations, the same model, queue and optimizer states."""
    common = FAST + [f"pipeline={kind}", f"data.root={tiny_cifar}", "data.max_images=96", "schedule.epochs=1",
                     "run.checkpoint_every_steps=4", "run.keep_checkpoints=10"]
    a = tmp_path / "a"
    train(make_config(common + [f"run.dir={a}"]))
    full = losses(a)
    assert sorted(full) == list(range(1, 7))
    (late,) = [p for p in list_checkpoints(a) if load_checkpoint(p)["progress"]["step"] == 4]
    assert load_checkpoint(late)["progress"]["batch_in_epoch"] == 4
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(late, b / "checkpoints" / late.name)
    train(make_config(common + [f"run.dir={b}"]))
    resumed = losses(b)
    assert sorted(resumed) == [5, 6]
    # Exact by construction (the same process, kernels and summation order on both sides): a
    # resume that read other images, drew other augmentations or lost any state moves the loss.
    for step, loss in resumed.items():
        assert loss == full[step], step


@pytest.mark.parametrize("labelled", [False, True], ids=["two_view", "labelled"])
def test_gpu_graphs_with_per_batch_states_pass_the_placement_check(labelled):
    """The states reach the random operators as CPU argument inputs: the GPU training graphs
    (serialized without CUDA) keep decode on "mixed" and every image operator on "gpu"."""
    pytest.importorskip("nvidia.dali")
    from fastmoco.pipelines.dali_graph import (
        FileReader,
        RandomStates,
        labelled_pipeline,
        two_view_pipeline,
    )
    from fastmoco.pipelines.graph_check import check_gpu_graph, parse_pipeline
    from fastmoco.pipelines.seeds import dali_states

    states = RandomStates(lambda i, n: dali_states(0, 0, 0, i, n), 4)
    if labelled:
        pipe = labelled_pipeline(FileReader(["x.jpg"], [0]), get_linear_recipe("v2"), 4, device_id=None, gpu=True,
                                 states=states)
    else:
        pipe = two_view_pipeline(["x.jpg"], get_recipe("v2"), 4, device_id=None, gpu=True, states=states)
    serialized = pipe.serialize()
    assert check_gpu_graph(serialized, torch.float32, n_outputs=2, n_labels=int(labelled)) == []
    ops, _ = parse_pipeline(serialized)
    random_ops = [op for op in ops if op.kind.startswith("random__") or op.kind == "RandomResizedCrop"]
    assert states.count == len(random_ops) > 0  # every random operator takes a state of its own
