"""Data modules: deterministic splits, binarization semantics, real files, clear errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
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
    # a data.root that cannot be made is named as such, not as a failed download (helper 30)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataNotFoundError) as err:
        MNIST(root=tmp_path / "a_file" / "data", download=True).prepare_data()
    assert f"mnist: the folder {tmp_path / 'a_file' / 'data' / 'MNIST' / 'raw'} cannot be made (NotADirectoryError" \
        in str(err.value) and "point data.root at a folder that can be written" in str(err.value)
    assert "no network" not in str(err.value)


@pytest.mark.data
@pytest.mark.parametrize("download", [True, False])
@pytest.mark.parametrize(("cls", "folder", "mean"), [(MNIST, "MNIST", 0.1307), (FashionMNIST, "FashionMNIST", 0.286)])
def test_real_data_through_torchvision(tmp_path, cls, folder, mean, download, monkeypatch):
    """The four .gz files as downloaded (all the shared folder holds) are used with either
    setting of data.download, unpacked next to themselves, and nothing is fetched."""
    _no_downloads(monkeypatch)
    root = shared_copy(folder, tmp_path)
    raw = root / folder / "raw"
    assert not (raw / "t10k-images-idx3-ubyte").exists()  # only the .gz files are there
    dm = setup(cls(root=root, download=download, binarize="none", val_size=10000))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50000, 10000, 10000)
    assert dm.train_set.images.shape[1:] == (1, 28, 28)
    full_mean = torch.cat([dm.train_set.images, dm.val_set.images]).float().mean() / 255
    assert full_mean.item() == pytest.approx(mean, abs=2e-3)
    assert (raw / "t10k-images-idx3-ubyte").stat().st_size == 16 + 10000 * 28 * 28
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith(".")) == []  # no temporary left


# --- files as downloaded, used without a download ------------------------------------------------
def _no_downloads(monkeypatch):
    """Make any download torchvision starts fail the test (the socket guard stops it too)."""
    import torchvision.datasets.cifar as tvc
    import torchvision.datasets.mnist as tvm
    import torchvision.datasets.utils as tvu

    def fetch(*args, **kwargs):
        raise AssertionError(f"a download was started: {args}")

    for module in (tvm, tvc, tvu):
        monkeypatch.setattr(module, "download_and_extract_archive", fetch)
    monkeypatch.setattr(tvu, "download_url", fetch)


def _md5(path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_mnist(raw, n_train=30, n_test=12):
    """Small idx files (MNIST's format: big-endian header, then uint8 values), gzipped as
    downloaded into ``raw``: {name: (md5, array)}."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    raw.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            gz = raw / f"{split}-{kind}-ubyte.gz"
            gz.write_bytes(gzip.compress(head + arr.tobytes(), mtime=0))
            out[gz.name] = (_md5(gz), arr)
    return out


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST])
def test_mnist_gz_files_as_downloaded_are_used_without_download(tmp_path, monkeypatch, cls):
    """data.download=false with only the .gz files in raw/ (what the missing-data message asks
    for): each is checked against its published MD5 and unpacked there, offline, as torchvision
    does after a download. Small files stand in for the real ones, with their MD5s published."""
    import torchvision.datasets as tvd

    tv = getattr(tvd, cls.torchvision_class)
    raw = tmp_path / tv.__name__ / "raw"
    files = _fake_mnist(raw)
    assert sorted(files) == sorted(name for name, _ in tv.resources)  # torchvision's own names
    monkeypatch.setattr(tv, "resources", [(name, files[name][0]) for name, _ in tv.resources])
    _no_downloads(monkeypatch)
    dm = cls(root=tmp_path, download=False)
    dm.prepare_data()
    for train, split in ((True, "train"), (False, "t10k")):
        images, labels = dm.load(train)
        assert images.shape == (len(files[f"{split}-labels-idx1-ubyte.gz"][1]), 1, 28, 28)
        assert torch.equal(images[:, 0], torch.from_numpy(files[f"{split}-images-idx3-ubyte.gz"][1]))
        assert labels.tolist() == files[f"{split}-labels-idx1-ubyte.gz"][1].tolist()
    # the .gz files stay; the unpacked ones are next to them, nothing else is
    names = sorted(p.name for p in raw.iterdir())
    assert names == sorted([*files, *(name.removesuffix(".gz") for name in files)])
    # a second data module reads the unpacked files (the .gz may go)
    for name in files:
        (raw / name).unlink()
    assert torch.equal(cls(root=tmp_path, download=False).load(False)[0], images)


def test_mnist_gz_with_the_wrong_md5_is_not_unpacked_but_named(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from vaelab.datamodules import DataCorruptError

    raw = tmp_path / "MNIST" / "raw"
    files = _fake_mnist(raw)
    published = {name: md5 for name, (md5, _) in files.items()}
    published["t10k-labels-idx1-ubyte.gz"] = "0" * 32  # this file is not the published one
    monkeypatch.setattr(tvd.MNIST, "resources", list(published.items()))
    _no_downloads(monkeypatch)
    with pytest.raises(DataCorruptError) as err:
        MNIST(root=tmp_path, download=False).prepare_data()
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    assert f"{bad} (its MD5 is not the published one" in str(err.value) and f"rm {bad}" in str(err.value)
    assert not (raw / "t10k-labels-idx1-ubyte").exists()  # never unpacked
    assert (raw / "t10k-images-idx3-ubyte").is_file()  # the intact ones are


def test_an_archive_that_cannot_be_unpacked_says_why_and_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    raw = tmp_path / "MNIST" / "raw"
    files = _fake_mnist(raw)
    monkeypatch.setattr(tvd.MNIST, "resources", [(name, md5) for name, (md5, _) in files.items()])

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(raw))

    monkeypatch.setattr("torchvision.datasets.utils.extract_archive", read_only)
    with pytest.raises(DataNotFoundError) as err:
        MNIST(root=tmp_path, download=False).prepare_data()
    msg = str(err.value)
    assert f"{raw / 'train-images-idx3-ubyte.gz'} is there but could not be unpacked into {raw}" in msg
    assert "Permission denied" in msg and "writable" in msg
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)  # nothing half-written left


def _fake_cifar10(monkeypatch, tmp_path, n=4):
    """A small cifar-10-python.tar.gz made as the real one is (pickled batches under
    cifar-10-batches-py/), with its MD5 and those of its files published in torchvision's
    CIFAR10 in place of the real ones. Returns (the tarball, train images [N, 3, 32, 32],
    train labels, test images)."""
    import hashlib
    import io
    import pickle
    import tarfile

    import numpy as np
    import torchvision.datasets as tvd

    tv = tvd.CIFAR10
    rng = np.random.default_rng(1)
    members, batches = {}, {}
    for name, _ in (*tv.train_list, *tv.test_list):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batches[name] = (data.reshape(n, 3, 32, 32), labels)
        members[name] = pickle.dumps({"data": data, "labels": labels})
    members[tv.meta["filename"]] = pickle.dumps({tv.meta["key"]: [f"class{i}" for i in range(10)]})
    tarball = tmp_path / "made" / tv.filename
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{tv.base_folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    monkeypatch.setattr(tv, "tgz_md5", _md5(tarball))
    monkeypatch.setattr(tv, "train_list", [[name, md5[name]] for name, _ in tv.train_list])
    monkeypatch.setattr(tv, "test_list", [[name, md5[name]] for name, _ in tv.test_list])
    monkeypatch.setattr(tv, "meta", {**tv.meta, "md5": md5[tv.meta["filename"]]})
    train = [batches[name] for name, _ in tv.train_list]
    test = batches[tv.test_list[0][0]]
    return (tarball, torch.from_numpy(np.concatenate([b[0] for b in train])),
            [y for b in train for y in b[1]], torch.from_numpy(test[0]))


def test_cifar10_missing_data_message_names_where_the_tarball_goes_and_that_works(tmp_path, monkeypatch):
    """The message names torchvision's own file and folder names, and putting the tarball
    exactly where it says is enough with data.download=false: it is unpacked there, offline."""
    import re
    import shutil

    import torchvision.datasets as tvd

    from vaelab.datamodules import CIFAR10

    tv = tvd.CIFAR10
    tarball, train_images, train_labels, test_images = _fake_cifar10(monkeypatch, tmp_path)
    _no_downloads(monkeypatch)
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10(root=root, download=False).prepare_data()
    msg = str(err.value)
    assert f"Put {tv.filename} into {root} " in msg and f"into {root / tv.base_folder}" not in msg
    assert f"unpacked there into {tv.base_folder}/" in msg and "MD5" in msg
    assert not root.exists()  # a failed look leaves nothing behind
    # follow the message to the letter
    name, folder = re.search(r"Put (\S+) into (\S+) ", msg).groups()
    Path(folder).mkdir(parents=True)
    shutil.copy(tarball, Path(folder) / name)
    dm = CIFAR10(root=root, download=False)
    images, labels = dm.load(train=True)
    assert images.shape == (len(train_labels), 3, 32, 32) and torch.equal(images, train_images)
    assert labels.tolist() == train_labels
    assert torch.equal(dm.load(train=False)[0], test_images)
    assert sorted(p.name for p in (root / tv.base_folder).iterdir()) == sorted(
        [*(n for n, _ in (*tv.train_list, *tv.test_list)), tv.meta["filename"]])


def test_cifar10_tarball_inside_its_folder_is_used_too_and_a_damaged_one_named(tmp_path, monkeypatch):
    """Where vaelab's message used to send it (root/cifar-10-batches-py/): found there as well.
    A tarball that is not the published one is never unpacked; the error names it."""
    import shutil

    import torchvision.datasets as tvd

    from vaelab.datamodules import CIFAR10, DataCorruptError

    tv = tvd.CIFAR10
    tarball, train_images, _, _ = _fake_cifar10(monkeypatch, tmp_path)
    _no_downloads(monkeypatch)
    inside = tmp_path / "root" / tv.base_folder / tv.filename
    inside.parent.mkdir(parents=True)
    shutil.copy(tarball, inside)
    assert torch.equal(CIFAR10(root=tmp_path / "root", download=False).load(True)[0], train_images)

    damaged = tmp_path / "bad" / tv.base_folder / tv.filename
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(tarball.read_bytes()[:-100])
    with pytest.raises(DataCorruptError) as err:
        CIFAR10(root=tmp_path / "bad", download=False).prepare_data()
    assert f"{damaged} (its MD5 is not the published one" in str(err.value)
    assert sorted(p.name for p in damaged.parent.iterdir()) == [tv.filename]  # nothing unpacked


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


def test_damaged_binarized_mnist_files_are_named_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    """Larochelle's text files (here small ones: 6/2/2 rows) are parsed once and cached as
    binarized_mnist.npz, written whole or not at all. A cache cut short is parsed again from
    the text files, with a warning, and rewritten; without them it is a DataCorruptError naming
    it with the rm command, as is a text file cut short. Before, each was a bare traceback
    (BadZipFile, EOFError), and a run killed while writing the cache left it cut short for every
    later run."""
    import gzip

    from vaelab.datamodules import BinarizedMNIST, DataCorruptError

    class Small(BinarizedMNIST):
        split_sizes = {"train": 6, "valid": 2, "test": 2}

    where = tmp_path / "BinarizedMNIST"
    where.mkdir()
    gen = torch.Generator().manual_seed(0)
    want = {k: torch.randint(0, 2, (n, 784), generator=gen).numpy().astype("uint8")
            for k, n in Small.split_sizes.items()}
    for split, rows in want.items():
        with gzip.open(where / f"binarized_mnist_{split}.amat.gz", "wt") as f:
            f.write("\n".join(" ".join(map(str, r)) for r in rows) + "\n")
    npz = where / "binarized_mnist.npz"

    def read() -> dict:
        return Small(root=tmp_path, download=False)._arrays_from_disk()

    old_umask = os.umask(0o022)
    try:
        got = read()
    finally:
        os.umask(old_umask)
    assert all((got[k] == want[k]).all() for k in want) and npz.is_file()
    assert [p.name for p in where.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # readable by a shared folder's other users, as a file the process writes (not the temporary file's 0600)
    assert npz.stat().st_mode & 0o777 == 0o644
    # the cache cut short (a run killed while writing it, before it was written whole)
    npz.write_bytes(npz.read_bytes()[:300])
    with pytest.warns(UserWarning, match="binarized_mnist.npz, the parsed cache of binarized MNIST, is damaged"):
        got = read()
    assert all((got[k] == want[k]).all() for k in want)
    with warnings.catch_warnings():  # rewritten: read again without a warning
        warnings.simplefilter("error")
        assert all((read()[k] == want[k]).all() for k in want)
    # ... and nothing to rebuild it from
    npz.write_bytes(npz.read_bytes()[:300])
    for split in want:
        (where / f"binarized_mnist_{split}.amat.gz").rename(tmp_path / f"{split}.gz")
    with warnings.catch_warnings():  # (no "parsing again" first: there is nothing to parse)
        warnings.simplefilter("error")
        with pytest.raises(DataCorruptError, match=rf"{npz}, the parsed cache of the data, is damaged .*rm {npz}"):
            read()
    npz.unlink()
    # a text file cut short
    for split in want:
        (tmp_path / f"{split}.gz").rename(where / f"binarized_mnist_{split}.amat.gz")
    valid = where / "binarized_mnist_valid.amat.gz"
    intact = valid.read_bytes()
    valid.write_bytes(intact[:40])
    with pytest.raises(DataCorruptError, match=rf"{valid} is damaged or cut short \(EOFError.*rm {valid}"):
        read()
    assert not npz.exists()
    middle = len(intact) // 2  # bytes changed inside the compressed stream, not cut short
    valid.write_bytes(intact[:middle] + bytes(b ^ 0xFF for b in intact[middle:middle + 64]) + intact[middle + 64:])
    with pytest.raises(DataCorruptError, match=rf"{valid} is damaged or cut short \((error|BadGzipFile|EOFError)"):
        read()
    # a cache that cannot be written whole is not written at all
    valid.write_bytes(gzip.compress(("\n".join(" ".join(map(str, r)) for r in want["valid"]) + "\n").encode()))

    def cut_short(file, **arrays):
        file.write(b"PK\x03\x04 half of an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("numpy.savez_compressed", cut_short)
    assert all((read()[k] == want[k]).all() for k in want)
    assert sorted(p.name for p in where.iterdir()) == [f"binarized_mnist_{k}.amat.gz" for k in ("test", "train", "valid")]


def test_an_unreadable_binarized_mnist_cache_is_not_called_damaged(tmp_path, monkeypatch):
    """Another user's binarized_mnist.npz in a shared data folder that this user may not read
    (PermissionError: the tests run as root, which reads every file, so open() refuses here) is
    not damaged: the text files are parsed without a "damaged" warning, and without them the
    error says it cannot be read (no permission), not that it is damaged."""
    import builtins

    from vaelab import datamodules
    from vaelab.datamodules import BinarizedMNIST, DataCorruptError

    class Small(BinarizedMNIST):
        split_sizes = {"train": 3, "valid": 1, "test": 1}

    where = tmp_path / "BinarizedMNIST"
    where.mkdir()
    rows = {k: torch.randint(0, 2, (n, 784), generator=torch.Generator().manual_seed(1)).numpy().astype("uint8")
            for k, n in Small.split_sizes.items()}
    for split, r in rows.items():
        np.savetxt(where / f"binarized_mnist_{split}.amat", r, fmt="%d")
    npz = where / "binarized_mnist.npz"
    np.savez_compressed(npz, **rows)

    def open_as_another_user(file, *args, **kwargs):
        if Path(file) == npz:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(datamodules, "open", open_as_another_user, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = Small(root=tmp_path, download=False)._arrays_from_disk()
    assert all((got[k] == rows[k]).all() for k in rows)
    for split in rows:
        (where / f"binarized_mnist_{split}.amat").unlink()
    with pytest.raises(DataCorruptError, match=rf"{npz}, the parsed cache of the data, cannot be read \(no permission\)"):
        Small(root=tmp_path, download=False)._arrays_from_disk()


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


class _Numbered(Digits):
    """Digits whose labels name the images (0, 1, ... over the training file), so that a test
    can tell which images a batch holds."""

    def load(self, train):
        images, labels = super().load(train)
        return images, torch.arange(len(labels))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_resumed_inside_an_epoch_trains_on_the_rest_of_that_epochs_order(tmp_path, num_workers):
    """Stopped at step 40 of 26-batch epochs, resumed from the checkpoint of step 33 under
    another seed: steps 33-51 take the batches the uninterrupted run took there (the rest of
    epoch 1's order, every training image once over the epoch), and Lightning does not warn
    that the loader cannot resume. DataLoader workers read the sampler ahead of training; the
    place saved is the batches training took."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self, stop_at=None):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen, self.stop_at = [], stop_at

        def training_step(self, batch, batch_idx):
            if self.global_step == self.stop_at:
                raise RuntimeError("stopped")
            self.seen.append(batch[1].clone())
            return self.w * batch[0].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(module, name, seed, **kwargs):
        pl.seed_everything(seed, verbose=False)
        trainer = pl.Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path / name, **kwargs.pop("trainer", {}))
        trainer.fit(module, _Numbered(batch_size=50, num_workers=num_workers), **kwargs)

    whole = Recorder()
    fit(whole, "whole", 7)
    assert len(whole.seen) == 2 * 26
    stopped = Recorder(stop_at=40)
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=33, save_top_k=-1)
    with pytest.raises(RuntimeError, match="stopped"):
        fit(stopped, "stopped", 7, trainer={"callbacks": [saves]})
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert "step=33" in ckpt.name and len(stopped.seen) == 40
    resumed = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(resumed, "resumed", 12345, ckpt_path=str(ckpt))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert len(resumed.seen) == 52 - 33
    got = stopped.seen[:33] + resumed.seen
    assert all(torch.equal(a, b) for a, b in zip(got, whole.seen, strict=True))
    epoch_1 = torch.cat(got[26:])
    assert len(epoch_1) == len(set(epoch_1.tolist())) == 1257  # every training image once


def test_a_resumed_loader_continues_its_shard_of_the_epoch_under_ddp():
    """Lightning's DistributedSampler under DDP: each rank's loader, given the state rank 0
    saved at the 7th batch of epoch 3, takes the rest of its shard of epoch 3, whatever epoch
    its fresh sampler was at when the iterator was made."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = setup(_Numbered(batch_size=32))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()

    def shard(rank):
        return _update_dataloader(loader, DistributedSampler(dm.train_set, num_replicas=2, rank=rank, seed=0))

    saving = shard(0)
    saving.batch_sampler.sampler.set_epoch(3)
    batches = iter(saving)
    for _ in range(7):
        next(batches)
    state = saving.state_dict()
    assert state["batches_done"] == 7 and state["sampler_epoch"] == 3 and state["num_batches"] == 20
    for rank in (0, 1):
        resumed = shard(rank)
        resumed.load_state_dict(state)
        rest = [y for _, y in resumed]
        epoch_3 = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, seed=0)
        epoch_3.set_epoch(3)
        assert torch.equal(torch.cat(rest), dm.train_set.labels[list(epoch_3)[7 * 32:]])
        assert resumed.state_dict()["batches_done"] == 20
        # the next pass is a whole epoch again
        assert len([y for _, y in resumed]) == 20


def test_a_loader_state_it_cannot_continue_gives_a_whole_fresh_epoch():
    """A state from an epoch's end (or start) resumes nothing; one from another batch size or
    number of processes cannot be continued and says so, and the epoch is whole and fresh."""
    dm = setup(_Numbered(batch_size=50))
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    first = [y for _, y in loader]
    state = loader.state_dict()
    assert state["batches_done"] == len(first) == 26 and isinstance(state["order_key"], int)
    for done in (0, 26):
        resumed = dm.train_dataloader()
        resumed.load_state_dict({**state, "batches_done": done})
        assert len([y for _, y in resumed]) == 26
    other = setup(_Numbered(batch_size=64)).train_dataloader()
    with pytest.warns(UserWarning, match="had 26 batches a process, this run's has 20"):
        other.load_state_dict({**state, "batches_done": 5})
    again = [y for _, y in other]
    assert len(again) == 20 and not torch.equal(torch.cat(again), torch.cat(first)[:1257])
    # within an epoch, the same order from the key, whatever torch's seed now
    resumed = dm.train_dataloader()
    resumed.load_state_dict({**state, "batches_done": 5})
    torch.manual_seed(99)
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in resumed], first[5:], strict=True))


def test_an_evaluation_loader_leaves_torchs_random_stream_alone():
    """Its workers' base seed is drawn outside torch's stream: an uninterrupted run makes the
    iterator in its sanity check, a run resumed inside an epoch at its first validation, and
    the training's draws after that must not depend on which (found by comparing the two), nor
    on data.num_workers (without workers every pass drew one)."""
    from vaelab.datamodules import EvalLoader

    for workers in (1, 0):
        loader = setup(Digits(batch_size=50, num_workers=workers)).val_dataloader()
        assert isinstance(loader, EvalLoader) and loader.persistent_workers == (workers > 0)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        for _ in range(2):
            assert sum(len(x) for x, _ in loader) == 180
        assert torch.equal(torch.get_rng_state(), before), workers


def test_the_training_draws_the_same_numbers_whatever_data_num_workers():
    """An epoch's one draw from torch's stream is its order: with loader workers (persistent,
    listing batches ahead) and without (a new iterator each epoch, which drew its workers' base
    seed from the stream every time), the same batches, and the same stream after each epoch."""
    def epochs(workers):
        loader = setup(Digits(batch_size=100, num_workers=workers)).train_dataloader()
        torch.manual_seed(0)
        seen = []
        for _ in range(3):
            seen.append((torch.cat([y for _, y in loader]), torch.get_rng_state()))
        return seen

    for (a, state_a), (b, state_b) in zip(epochs(0), epochs(2), strict=True):
        assert torch.equal(a, b) and torch.equal(state_a, state_b)


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


def test_a_batch_larger_than_the_training_split_with_drop_last_is_refused_naming_the_fix():
    """data.drop_last=true with data.batch_size over the training images left no batch: the
    run trained nothing, tested the untrained model and said it had finished."""
    from vaelab.errors import SettingError

    assert len(list(setup(Digits(batch_size=2000)).train_dataloader())) == 1  # without drop_last: one short batch
    with pytest.raises(SettingError, match=r"data.batch_size=2000 with data.drop_last=true leaves no training batch "
                                           r"\(1257 training images\): lower data.batch_size, or data.drop_last=false"):
        setup(Digits(batch_size=2000, drop_last=True)).train_dataloader()


def test_limits_that_leave_an_epoch_no_batch_or_fewer_than_a_validation_interval_are_named():
    """trainer.limit_train_batches=0.01 of 20 batches, and trainer.val_check_interval=30 steps
    with 20 batches an epoch, stopped in Lightning's set-up with a traceback; named with the
    fix before it (and under DDP, per process)."""
    from types import SimpleNamespace

    from vaelab.errors import SettingError

    dm = setup(Digits(batch_size=64))  # 1257 training images: 20 batches

    def loader(world_size=1, **limits):
        dm.trainer = SimpleNamespace(world_size=world_size, **{"limit_train_batches": 1.0, "val_check_interval": 1.0,
                                                               "check_val_every_n_epoch": 1, "limit_val_batches": 1.0,
                                                               **limits})
        try:
            return dm.train_dataloader()
        finally:
            dm.trainer = None

    for fine in ({}, {"limit_train_batches": 0.05}, {"val_check_interval": 20}, {"limit_train_batches": 3},
                 {"val_check_interval": 30, "check_val_every_n_epoch": None}, {"val_check_interval": 0.5}):
        loader(**fine)
    with pytest.raises(SettingError, match=r"trainer.limit_train_batches=0.01 of an epoch's 20 training batches is "
                                           r"none: at least trainer.limit_train_batches=0.05"):
        loader(limit_train_batches=0.01)
    with pytest.raises(SettingError, match=r"trainer.val_check_interval=30 steps is more than an epoch's 20 training "
                                           r"batches: to validate every 30 steps across epochs, "
                                           r"trainer.check_val_every_n_epoch=null"):
        loader(val_check_interval=30)
    with pytest.raises(SettingError, match=r"val_check_interval=12 steps is more than an epoch's 10 training batches "
                                           r"over 2 processes"):
        loader(world_size=2, val_check_interval=12)
    with pytest.raises(SettingError, match=r"val_check_interval=4 steps is more than an epoch's 3 training batches"):
        loader(limit_train_batches=3, val_check_interval=4)
