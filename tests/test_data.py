"""Data modules: deterministic splits, binarization semantics, real files, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, shared_copy

from vaelab.datamodules import MNIST, DataNotFoundError, Digits, FashionMNIST


def setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_digits_splits_are_deterministic_and_complete():
    a, b = setup(Digits(binarize="none")), setup(Digits(binarize="none"))
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (1257, 180, 360)
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.test_set.images, b.test_set.images)
    c = setup(Digits(binarize="none", split_seed=1))
    assert not torch.equal(a.val_set.images, c.val_set.images)
    assert torch.equal(a.test_set.images, c.test_set.images[:0]) is False
    # together the splits are the 1,797 images of the data set, each class present
    labels = torch.cat([a.train_set.labels, a.val_set.labels, a.test_set.labels])
    assert len(labels) == 1797 and torch.bincount(labels).min() > 150
    assert a.data_shape == (1, 8, 8) and a.info["num_levels"] == 17


def test_intensities_scale_into_unit_interval():
    dm = setup(Digits(binarize="none"))
    x = dm.to_float(dm.train_set.images)
    assert x.min() == 0.0 and x.max() == 1.0
    torch.testing.assert_close(x * 16, dm.train_set.images.float())


def test_dynamic_binarization_is_fresh_for_training_and_fixed_for_evaluation():
    dm = setup(Digits(binarize="dynamic"))
    imgs = dm.train_set.images[:200]
    x1, x2 = dm.to_float(imgs), dm.to_float(imgs)
    assert set(x1.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(x1, x2)
    # the mean of many draws approaches the intensities
    mean = torch.stack([dm.to_float(imgs) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, imgs.float() / 16, atol=0.15, rtol=0)
    v1 = dm.to_float(dm.val_set.images)
    assert torch.equal(v1, dm.to_float(dm.val_set.images))
    assert torch.equal(dm.val_set.images, setup(Digits(binarize="dynamic")).val_set.images)
    assert set(v1.unique().tolist()) == {0.0, 1.0}


def test_static_binarization_is_fixed_everywhere():
    dm = setup(Digits(binarize="static"))
    x = dm.to_float(dm.train_set.images)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, dm.to_float(dm.train_set.images))


def test_dequantization_stays_in_its_bin():
    dm = setup(Digits(binarize="none", dequantize=True))
    imgs = dm.train_set.images
    x = dm.to_float(imgs)
    assert 0 <= x.min() and x.max() < 1
    assert torch.equal(torch.floor(x * 17).to(torch.uint8), imgs)
    assert dm.info["bin_width"] == pytest.approx(1 / 17)


@pytest.mark.parametrize("binarize", ["dynamic", "static"])
def test_binarized_data_have_bins_one_unit_wide(binarize):
    # x ∈ {0, 1}: a density on x is a probability of the binary value per unit bin, whatever
    # the 17 intensity levels the bits were drawn from (1/16 here made test/bpd 4 bits too high)
    dm = Digits(binarize=binarize)
    assert dm.info["binary"] and dm.info["bin_width"] == 1.0
    assert Digits(binarize="none").info["bin_width"] == pytest.approx(1 / 16)


@pytest.mark.slow
def test_eval_gives_binarized_data_unit_bins_also_from_an_older_checkpoint(tmp_path):
    import json
    import math

    from conftest import REPO, check, run_cli

    run = tmp_path / "run"
    check(run_cli("train.py", "likelihood=gaussian", "data.binarize=dynamic", "trainer.max_epochs=1", "logger=none",
                  "evaluation.test_num_samples=5", "evaluation.val_num_samples=0", "test=false",
                  f"hydra.run.dir={run}", cwd=REPO))
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["hyper_parameters"]["data_info"]["bin_width"] == 1.0
    ckpt["hyper_parameters"]["data_info"]["bin_width"] = 1 / 16  # what vaelab stored before
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    out = tmp_path / "eval"
    check(run_cli("eval.py", f"ckpt_path={old}", "evaluation.test_num_samples=5", f"hydra.run.dir={out}", cwd=REPO))
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    # Δ = 1: bits/dim is the nll over D ln 2, without the log2(16) = 4 bits/dim the old width added
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (64 * math.log(2)), rel=1e-6)


def test_batches_come_whole_from_the_loader():
    dm = setup(Digits(binarize="dynamic", batch_size=50))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (50,)


def test_bad_options_name_the_choices():
    with pytest.raises(ValueError, match="dynamic"):
        Digits(binarize="sometimes")
    with pytest.raises(ValueError, match="batch_size"):
        Digits(batch_size=0)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    dm = MNIST(root=tmp_path / "nowhere", download=False)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "data.download=true" in msg


@pytest.mark.data
@pytest.mark.parametrize(("cls", "folder", "mean"), [(MNIST, "MNIST", 0.1307), (FashionMNIST, "FashionMNIST", 0.286)])
def test_real_data_through_torchvision(tmp_path, cls, folder, mean):
    root = shared_copy(folder, tmp_path)
    dm = setup(cls(root=root, download=True, binarize="none", val_size=10000))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50000, 10000, 10000)
    assert dm.train_set.images.shape[1:] == (1, 28, 28)
    full_mean = torch.cat([dm.train_set.images, dm.val_set.images]).float().mean() / 255
    assert full_mean.item() == pytest.approx(mean, abs=2e-3)


@pytest.mark.data
def test_statically_binarized_mnist_is_larochelles_split(tmp_path):
    from vaelab.datamodules import BinarizedMNIST

    root = tmp_path / "root"
    (root / "BinarizedMNIST").mkdir(parents=True)
    src = SHARED_DATA / "BinarizedMNIST"
    if not src.is_dir():
        pytest.skip(f"{src} is not here")
    for split in ("valid", "test"):  # the text files, parsed as users get them
        (root / "BinarizedMNIST" / f"binarized_mnist_{split}.amat.gz").symlink_to(src / f"binarized_mnist_{split}.amat.gz")
    (root / "BinarizedMNIST" / "binarized_mnist_train.amat.gz").symlink_to(src / "binarized_mnist_train.amat.gz")
    dm = setup(BinarizedMNIST(root=root, download=False))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50000, 10000, 10000)
    x = dm.to_float(dm.test_set.images)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert x.mean().item() == pytest.approx(0.1325, abs=5e-4)  # the test split's known mean
    assert dm.info["binary"] and (root / "BinarizedMNIST" / "binarized_mnist.npz").is_file()
    # the cached arrays give the same data
    again = setup(BinarizedMNIST(root=root, download=False))
    assert torch.equal(again.train_set.images, dm.train_set.images)


def test_binarized_mnist_missing_files_say_where(tmp_path):
    from vaelab.datamodules import BinarizedMNIST

    with pytest.raises(DataNotFoundError, match="binarized_mnist_train.amat"):
        BinarizedMNIST(root=tmp_path, download=False).prepare_data()
    with pytest.raises(ValueError, match="data=mnist"):
        BinarizedMNIST(root=tmp_path, binarize="dynamic")


def test_padding_grows_the_images_and_keeps_them():
    plain, padded = setup(Digits(binarize="none")), setup(Digits(binarize="none", pad=3))
    assert padded.data_shape == (1, 14, 14) and padded.info["shape"] == [1, 14, 14]
    inner = padded.test_set.images[:, :, 3:-3, 3:-3]
    assert torch.equal(inner, plain.test_set.images)
    assert padded.test_set.images.sum() == plain.test_set.images.sum()  # the border is zeros
    with pytest.raises(ValueError, match="data.pad"):
        Digits(pad=-1)


# --- batches as index tensors, data on the training device ----------------------------------------
def test_tensor_batches_are_the_batches_of_a_batch_sampler():
    from torch.utils.data import BatchSampler, RandomSampler

    from vaelab.datamodules import TensorBatchSampler

    for drop_last in (False, True):
        ours = TensorBatchSampler(RandomSampler(range(103), generator=torch.Generator().manual_seed(5)), 10, drop_last)
        theirs = BatchSampler(RandomSampler(range(103), generator=torch.Generator().manual_seed(5)), 10, drop_last)
        got, want = [b.tolist() for b in ours], list(theirs)
        assert got == want and len(ours) == len(theirs) == len(got)
        assert len(got[-1]) == (10 if drop_last else 3)


def test_shuffled_order_is_random_samplers_order_as_one_tensor():
    from torch.utils.data import RandomSampler

    from vaelab.datamodules import ShuffledOrder, TensorBatchSampler

    torch.manual_seed(11)
    theirs = list(RandomSampler(range(1000)))
    torch.manual_seed(11)
    order = ShuffledOrder(range(1000)).order()
    assert order.dtype == torch.long and order.tolist() == theirs
    torch.manual_seed(11)
    assert list(ShuffledOrder(range(1000))) == theirs  # iterating gives the same order
    assert isinstance(ShuffledOrder(range(3)), RandomSampler)  # Lightning shuffles its DDP sampler
    gen = torch.Generator().manual_seed(2)
    assert ShuffledOrder(range(50), generator=gen).order().tolist() == list(
        RandomSampler(range(50), generator=torch.Generator().manual_seed(2)))

    class NotListed(ShuffledOrder):
        def __iter__(self):
            raise AssertionError("TensorBatchSampler listed the order instead of taking order()")

    torch.manual_seed(4)
    batches = [b.tolist() for b in TensorBatchSampler(NotListed(range(10)), 4, False)]
    torch.manual_seed(4)
    want = list(RandomSampler(range(10)))
    assert batches == [want[:4], want[4:8], want[8:]]


def test_the_training_loader_gives_the_batches_it_gave_with_index_lists():
    """The same seed, the same images in the same order as a plain DataLoader(shuffle=True)."""
    from torch.utils.data import DataLoader

    from vaelab.datamodules import _batch_collate

    dm = setup(Digits(binarize="none", batch_size=50))
    torch.manual_seed(3)
    ours = [x for x, _ in dm.train_dataloader()]
    torch.manual_seed(3)
    theirs = [x for x, _ in DataLoader(dm.train_set, batch_size=50, shuffle=True, collate_fn=_batch_collate)]
    assert len(ours) == len(theirs) == 26
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_lightning_rebuilds_the_batch_sampler_around_its_distributed_sampler():
    """What Lightning does to the training loader under DDP: each rank gets its own shard,
    still as index tensors, and together the shards cover the training set."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from vaelab.datamodules import InMemoryImages, TensorBatchSampler

    dm = setup(Digits(binarize="none", batch_size=32))
    n = len(dm.train_set)  # 1257
    dm.train_set = InMemoryImages(dm.train_set.images, torch.arange(n))  # labels name the images
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sharded = _update_dataloader(loader, sampler)
        assert type(sharded.batch_sampler) is TensorBatchSampler and len(sharded) == 20
        shards.append(torch.cat([y for _, y in sharded]).tolist())
        assert shards[-1] == list(sampler)  # the sampler's order, batch after batch
    assert len(shards[0]) == len(shards[1]) == 629  # 1257 / 2, one image repeated as padding
    assert set(shards[0]) | set(shards[1]) == set(range(n)) and len(set(shards[0]) & set(shards[1])) == 1


class _Trainer:
    """What ``data_device`` reads of a trainer: its strategy's root device."""

    def __init__(self, device):
        self.strategy = type("Strategy", (), {"root_device": torch.device(device)})()


def test_data_moves_to_the_training_device_when_asked():
    """The meta device stands in for a GPU here: setup places every split there, and the
    training loader's index tensors are made there too."""
    dm = Digits(binarize="dynamic", batch_size=50)
    dm.trainer = _Trainer("meta")
    setup(dm)
    assert {s.device.type for s in (dm.train_set, dm.val_set, dm.test_set)} == {"meta"}
    assert dm.train_dataloader().batch_sampler.device.type == "meta"
    assert not dm.train_dataloader().pin_memory
    x, y = next(iter(dm.train_dataloader()))
    assert x.device.type == y.device.type == "meta" and x.shape == (50, 1, 8, 8)
    x, y = next(iter(dm.val_dataloader()))  # index lists (the evaluation samplers) go over too
    assert x.device.type == "meta" and x.shape == (50, 1, 8, 8)
    # on the CPU, or when switched off, the data stay on the host
    for device, on_device in (("cpu", "auto"), ("meta", False)):
        dm = Digits(binarize="none", on_device=on_device)
        dm.trainer = _Trainer(device)
        assert setup(dm).train_set.device.type == "cpu"
    # data loader workers cannot read GPU tensors: auto keeps the data on the host for them
    dm = Digits(binarize="none", num_workers=1)
    dm.trainer = _Trainer("meta")
    assert dm.data_device.type == "cpu"


def test_auto_keeps_data_too_large_for_the_free_gpu_memory_on_the_host(monkeypatch):
    from vaelab import datamodules

    dm = setup(Digits(binarize="none"))  # 1,797 images of 64 bytes, labels 8 bytes each
    dm.trainer = _Trainer("cuda:0")
    size = sum(s.images.nbytes + s.labels.nbytes for s in (dm.train_set, dm.val_set, dm.test_set))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(size / datamodules.ON_DEVICE_SHARE), 0))
    assert dm.data_device == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(size / datamodules.ON_DEVICE_SHARE) - 1, 0))
    assert dm.data_device == torch.device("cpu")


def test_on_device_options_are_checked_and_name_the_fix():
    with pytest.raises(ValueError, match="auto, true or false"):
        Digits(on_device="gpu")
    with pytest.raises(ValueError, match="num_workers=0"):
        Digits(on_device=True, num_workers=2)
