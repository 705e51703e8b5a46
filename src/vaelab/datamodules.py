"""LightningDataModules for image data.

Every data set here is small enough to hold in memory as one uint8 tensor ``[N, C, H, W]``
(MNIST: 47 MB; CIFAR-10: 150 MB), so batches are sliced from it in one indexing operation
instead of decoding one PIL image at a time in DataLoader workers. When training on a GPU the
tensors live on the GPU (``on_device``): an epoch's shuffled order goes to the device once,
and each batch is one gather there, with no copy from the host and no wait for the device in
the step. Otherwise the uint8 batch travels to the device. Either way it becomes float on the
device (``on_after_batch_transfer``), where binarization and dequantization happen too.

Pixel values: an image with L intensity levels k ∈ {0, …, L−1} becomes x = k / (L−1) ∈ [0, 1]
(the torchvision convention), or with ``dequantize=true`` x = (k + u) / L with u ~ U[0, 1),
the uniform dequantization under which a continuous density's bits/dim bounds the discrete
data's (Theis et al. 2016).

Binarization for Bernoulli likelihoods (``binarize``):

* ``dynamic``: x ~ Bernoulli(k / (L−1)) afresh for every training batch (Burda et al. 2015);
  validation and test are binarized once with a fixed seed, so their numbers are comparable
  across epochs and runs.
* ``static``: every split binarized once with a fixed seed.
* ``none``: the intensities themselves.
* ``auto``: ``dynamic`` if the likelihood needs binary data, else ``none`` (resolved by the
  training entry point before anything is logged).

Splits are deterministic: the held-out validation set is drawn from the training files with
``split_seed``, and the test split is the data set's own.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zlib
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any
from urllib.error import URLError

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from vaelab.distributed import eval_sampler
from vaelab.errors import ExplainedError, SettingError

BINARIZE_MODES = ("none", "dynamic", "static", "auto")
ON_DEVICE_MODES = ("auto", True, False)

#: ``on_device=auto`` holds the data on the device when it takes at most this share of the
#: device memory that is free
ON_DEVICE_SHARE = 0.25


class DataNotFoundError(FileNotFoundError, ExplainedError):
    """The data files are not where the config says, and could not be downloaded."""


class DataCorruptError(OSError, ExplainedError):
    """A data file is there but damaged or truncated (its checksum or size is wrong)."""


def _idx_problem(path: Path) -> str | None:
    """An uncompressed MNIST idx file whose size disagrees with its own header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        return f"{size} bytes, shorter than its header"
    nd, kind = head[3], head[2]
    if kind != 8 or not 1 <= nd <= 3 or len(head) < 4 + 4 * nd:
        return "not an idx file of 8-bit values"
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    want = 4 + 4 * nd + math.prod(dims)
    return None if size == want else f"{size} bytes where its header promises {want}"


def archives(tv_class: Any, root: Path, folder: str) -> list[tuple[Path, str, Path, list[Path]]]:
    """The archives of a torchvision data set as its download leaves them under ``root``, each
    as (where it may lie, its published MD5, the folder it unpacks into, the files unpacking it
    gives): MNIST's (and Fashion-MNIST's) four ``.gz`` files in ``root/folder``; CIFAR's
    tarball in ``root``, where torchvision downloads it, or inside the folder it unpacks to."""
    found: list[tuple[Path, str, Path, list[Path]]] = []
    for name, md5 in getattr(tv_class, "resources", ()):
        gz = root / folder / name
        found.append((gz, md5, gz.parent, [gz.with_suffix("")]))
    if hasattr(tv_class, "tgz_md5"):
        unpacked = root / tv_class.base_folder
        gives = [unpacked / name for name, _ in (*tv_class.train_list, *tv_class.test_list)]
        gives.append(unpacked / tv_class.meta["filename"])
        for place in (root, unpacked):
            found.append((place / tv_class.filename, tv_class.tgz_md5, root, gives))
    return found


def _unpack(archive: Path, into: Path) -> None:
    """Unpack ``archive`` into ``into`` with torchvision's own ``extract_archive`` (what its
    ``download_and_extract_archive`` does after a download), by way of a temporary folder in
    ``into``: an interrupted unpacking leaves no half-written file under a name that torchvision
    would read, and two runs unpacking at once do not write into each other's files."""
    from torchvision.datasets.utils import extract_archive

    with tempfile.TemporaryDirectory(dir=into, prefix=".unpacking-") as tmp:
        extract_archive(str(archive), tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                dest = into / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)


def damaged_files(tv_class: Any, root: Path, folder: str) -> list[tuple[Path, str]]:
    """The files of a torchvision data set under ``root`` that are there but damaged: a
    download whose MD5 is not the published one, or an idx file cut short. Run only after a
    failure, so its cost (reading the files once) does not matter."""
    from torchvision.datasets.utils import check_integrity

    expected: list[tuple[Path, str | None]] = []
    for archive, md5, _, _ in archives(tv_class, root, folder):
        expected.append((archive, md5))
    for name, _ in getattr(tv_class, "resources", ()):
        expected.append(((root / folder / name).with_suffix(""), None))
    if hasattr(tv_class, "tgz_md5"):
        for name, md5 in (*tv_class.train_list, *tv_class.test_list):
            expected.append((root / tv_class.base_folder / name, md5))
        expected.append((root / tv_class.base_folder / tv_class.meta["filename"], tv_class.meta["md5"]))
    bad = []
    for path, md5 in expected:
        if not path.is_file():
            continue
        if md5 is not None and not check_integrity(str(path), md5):
            bad.append((path, "its MD5 is not the published one: truncated or damaged"))
        elif md5 is None and (why := _idx_problem(path)):
            bad.append((path, why))
    return bad


def _indices_to(device: torch.device, idx: torch.Tensor) -> torch.Tensor:
    """Host index tensor ``idx`` on ``device``. To a GPU through pinned memory: that copy does
    not wait for the device, a copy from pageable memory does."""
    if idx.device == device:
        return idx
    if device.type == "cuda":
        idx = idx.pin_memory()
    return idx.to(device, non_blocking=True)


class InMemoryImages(Dataset):
    """uint8 images ``[N, C, H, W]`` and integer labels ``[N]``, fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader take a batch with one fancy-indexing operation; it
    still works with any sampler, the DistributedSampler that DDP injects included.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError("images and labels differ in length")
        # row-major, so that a batch is one gather of contiguous rows: a column-major array
        # (as numpy may hand over) makes every batch ~30x slower to gather
        self.images = images.contiguous()
        self.labels = labels.long().contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> InMemoryImages:
        """The same images and labels on ``device`` (this data set itself if they are there)."""
        if self.images.device == torch.device(device):
            return self
        return InMemoryImages(self.images.to(device), self.labels.to(device))

    def __getitems__(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(indices, torch.Tensor):  # TensorBatchSampler: on this data's device already
            idx = indices
        else:
            idx = _indices_to(self.images.device, torch.as_tensor(indices, dtype=torch.long))
        # index_select gathers whole rows; advanced indexing (images[idx]) is several times slower
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def _stream_number() -> int:
    """The next number of torch's global random stream, drawn as a DataLoader draws its workers'
    base seed and ``RandomSampler`` its seed."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class ShuffledOrder(RandomSampler):
    """``RandomSampler(data)``: every example once an epoch, in a random order drawn the same
    way (a generator seeded from torch's global one, then ``randperm``), so a seed gives the
    order a ``DataLoader(shuffle=True)`` gives. ``order()`` hands the epoch's order over as one
    tensor, where iterating builds a list of Python ints first: 50,000 of them and a tensor
    made from them cost ~5 ms at every epoch's first batch on this project's CPU machine, ~0.2 %
    of an MLP epoch. A ``RandomSampler`` still, so Lightning shuffles its DistributedSampler.

    ``key`` is what the latest order was drawn from (the seed; with a ``generator`` of one's own,
    its state before the draw): ``order(key)`` draws that order again, which is how a run
    resumed inside an epoch gets the rest of that epoch's order.
    """

    def __init__(self, data_source: Sized, generator: torch.Generator | None = None):
        super().__init__(data_source, generator=generator)
        self.key: int | torch.Tensor | None = None

    def draw_key(self) -> int | None:
        """The next order's key, drawn from torch's global stream as ``order()`` would draw it
        (None with a ``generator`` of one's own, whose state is the key)."""
        return _stream_number() if self.generator is None else None

    def order(self, key: int | torch.Tensor | None = None) -> torch.Tensor:
        if self.generator is None:
            seed = self.draw_key() if key is None else int(key)
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.key = seed
        else:
            generator = self.generator
            if key is not None:
                generator.set_state(key)
            self.key = generator.get_state()
        return torch.randperm(len(self.data_source), generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.order().tolist()


class TensorBatchSampler(BatchSampler):
    """Lists the same batches as ``BatchSampler(sampler, batch_size, drop_last)``, each as one
    index tensor on ``device``: the epoch's order goes to the device in one copy, and every
    batch is a slice of it. No Python list of indices per step, and no host-to-device copy
    (which would wait for the device) inside an epoch.

    A ``BatchSampler`` with its ``(sampler, batch_size, drop_last)`` signature, so that
    Lightning can rebuild it around the ``DistributedSampler`` it injects under DDP.

    ``resume_at(key, batches_done)`` makes the next pass take the order drawn from ``key`` (see
    ``ShuffledOrder``; other samplers list theirs again, which for Lightning's
    ``DistributedSampler`` is the epoch's order) and start after its first ``batches_done``
    batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool,
                 device: torch.device | str = "cpu"):
        super().__init__(sampler, batch_size, drop_last)
        self.device = torch.device(device)
        self.pending: tuple[int | torch.Tensor | None, int] | None = None

    def resume_at(self, key: int | torch.Tensor | None, batches_done: int) -> None:
        self.pending = (key, int(batches_done))

    def draw_order(self) -> None:
        """Draw the next pass's order now, from torch's stream (``ShuffledOrder``), rather than
        at its first batch: a DataLoader's iterator lists batches ahead of the first when it
        has workers, and at the first when it has none; drawn here, the same draw comes at the
        same point of the stream either way (``ResumableLoader``)."""
        if self.pending is None and isinstance(self.sampler, ShuffledOrder):
            key = self.sampler.draw_key()
            if key is not None:
                self.pending = (key, 0)

    @property
    def key(self) -> int | torch.Tensor | None:
        """What the latest pass's order was drawn from (``None`` for a sampler without one)."""
        return getattr(self.sampler, "key", None)

    def __iter__(self):
        (key, batches_done), self.pending = self.pending or (None, 0), None
        if isinstance(self.sampler, ShuffledOrder):
            order = self.sampler.order(key)
        else:  # any other sampler (Lightning's DistributedSampler under DDP) lists its order
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        order = _indices_to(self.device, order)
        n = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(batches_done * self.batch_size, n, self.batch_size):
            yield order[start:start + self.batch_size]


class ResumableLoader(DataLoader):
    """The training loader: a ``DataLoader`` over a ``TensorBatchSampler`` whose place in the
    epoch Lightning saves in every checkpoint and gives back on resume (the ``state_dict`` /
    ``load_state_dict`` pair it looks for on a loader). The place is the epoch's order (its
    ``key``), the sampler's epoch (a ``DistributedSampler``'s, under DDP) and the batches this
    loader has handed to training so far: counted here, where Lightning takes them, not in the
    sampler, which DataLoader workers read ahead of training. So a run resumed from a
    checkpoint saved inside an epoch trains on the rest of that epoch's order, every example
    once (under DDP, as Lightning's DistributedSampler shards it: it repeats up to one example
    a process so that the shards are even), as the uninterrupted run would have.
    """

    batch_sampler: TensorBatchSampler
    _handed_out = 0

    def __iter__(self):
        pending = self.batch_sampler.pending  # (a resumed epoch's order and place)
        self._handed_out = pending[1] if pending else 0
        if pending is None:
            # an epoch's draws from torch's random stream, made here whatever data.num_workers:
            # the number a plain DataLoader draws for its workers' base seed, then the order (so
            # a seed gives DataLoader(shuffle=True)'s order); the iterator's own base-seed draw
            # is kept out of the stream (_iterator_outside_the_stream). A resumed epoch's were
            # made before its checkpoint, and the resumed run's streams continue after them.
            _stream_number()
            self.batch_sampler.draw_order()
        batches = _iterator_outside_the_stream(super().__iter__)
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self._handed_out, "num_batches": len(self), "order_key": self.batch_sampler.key,
                "sampler_epoch": getattr(self.batch_sampler.sampler, "epoch", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done, num_batches = int(state["batches_done"]), int(state["num_batches"])
        if num_batches != len(self):
            rank_zero_warn(f"The checkpoint's training epoch had {num_batches} batches a process, this run's has "
                           f"{len(self)} (another batch size or number of processes): the rest of the interrupted "
                           "epoch takes a fresh order, so over that epoch some examples are seen twice and others "
                           "not at all. Resume with the run's own settings to continue its order.")
            return
        if not 0 < done < num_batches:  # the checkpoint is at an epoch's start or end: a fresh order
            return
        epoch = state.get("sampler_epoch")
        if epoch is not None and hasattr(self.batch_sampler.sampler, "set_epoch"):
            # Lightning sets it before the epoch's first batch, but DataLoader workers may list
            # the order as soon as the iterator exists
            self.batch_sampler.sampler.set_epoch(epoch)
        self.batch_sampler.resume_at(state["order_key"], done)


def _iterator_outside_the_stream(make: Any) -> Any:
    """A DataLoader's new iterator, made without a draw from torch's random stream. Making one
    draws its workers' base seed from the stream: at every pass without workers or with
    workers that do not persist, once with persistent workers (``data.num_workers > 0``), which
    an uninterrupted run makes in its sanity check and a run resumed inside an epoch (which
    Lightning runs without one) at its first validation. Drawn from the stream, the training's
    later draws depended on ``data.num_workers`` and, after a resume, on where it resumed. The
    base seed is still the stream's next number (the same in a resumed run), just not taken."""
    with torch.random.fork_rng(devices=[]):
        return make()


class EvalLoader(DataLoader):
    """A validation or test loader whose passes leave torch's random stream alone
    (``_iterator_outside_the_stream``): the training draws the same numbers with or without
    them, and whatever ``data.num_workers``."""

    def __iter__(self):
        return _iterator_outside_the_stream(super().__iter__)


def _batch_collate(batch: Any) -> Any:
    """The batch is already stacked by ``__getitems__``."""
    return batch


def _binarize_once(images: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """Bernoulli(k / (L−1)) drawn once with a fixed seed, stored back as {0, L−1}."""
    gen = torch.Generator().manual_seed(seed)
    probs = images.float() / (levels - 1)
    return (torch.bernoulli(probs, generator=gen) * (levels - 1)).to(torch.uint8)


class ImageDataModule(pl.LightningDataModule):
    """Base class: subclasses implement ``load(train: bool) -> (uint8 images, labels)``."""

    #: a short name, used in messages and run names
    name: str = "images"
    #: intensity levels per pixel in the stored data (256 for 8-bit images)
    num_levels: int = 256

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int | float = 5000,
        binarize: str = "none",
        dequantize: bool = False,
        download: bool = True,
        split_seed: int = 0,
        binarize_seed: int = 1234,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        pad: int = 0,
        on_device: bool | str = "auto",
    ):
        super().__init__()
        if binarize not in BINARIZE_MODES:
            raise SettingError(f"data.binarize={binarize!r} is not an option: choose one of {BINARIZE_MODES}")
        if binarize == "auto":
            raise ValueError("data.binarize=auto must be resolved before the data module is built")
        if int(batch_size) <= 0:
            raise SettingError(f"data.batch_size must be a positive integer, got {batch_size}")
        if dequantize not in (True, False):
            raise SettingError(f"data.dequantize must be true or false once resolved (train.py resolves auto "
                             f"from the likelihood), got {dequantize!r}")
        if binarize != "none" and dequantize:
            raise SettingError(f"data.dequantize=true adds uniform noise to intensities, which data.binarize={binarize} "
                               "replaces by 0/1 (binarize=auto binarizes for a likelihood of binary data, such as the "
                               "default bernoulli): give data.dequantize=false, or a likelihood of intensities (e.g. "
                               "likelihood=gaussian, which binarize=auto leaves as they are)")
        self.root = Path(root).expanduser()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.val_size = val_size
        self.binarize = binarize
        self.dequantize = bool(dequantize)
        self.download = bool(download)
        self.split_seed = int(split_seed)
        self.binarize_seed = int(binarize_seed)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        if int(pad) < 0:
            raise SettingError(f"data.pad must be >= 0 pixels, got {pad}")
        self.pad = int(pad)
        if on_device not in ON_DEVICE_MODES:
            raise SettingError(f"data.on_device={on_device!r} is not an option: choose auto, true or false")
        if on_device is True and self.num_workers > 0:
            raise SettingError(
                "data.on_device=true holds the data on the GPU, which DataLoader worker processes "
                f"cannot index: set data.num_workers=0 (got {self.num_workers}), or data.on_device=false"
            )
        self.on_device = on_device
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self.test_set: InMemoryImages | None = None

    # --- what subclasses provide ----------------------------------------------------------
    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    #: (C, H, W) of the stored images
    image_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x as the model sees it: the stored images, zero-padded by ``pad``."""
        c, h, w = self.image_shape
        return (c, h + 2 * self.pad, w + 2 * self.pad)

    def padded(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad every side by ``pad`` pixels (e.g. MNIST to 32×32 for 32×32 architectures)."""
        return torch.nn.functional.pad(images, (self.pad,) * 4) if self.pad else images

    # --- facts about the data, for bits/dim and for checks ----------------------------------
    @property
    def binary(self) -> bool:
        """Whether x takes only the values 0 and 1 (two stored levels, dequantized, do not)."""
        return self.binarize in ("dynamic", "static") or (self.num_levels == 2 and not self.dequantize)

    @property
    def info(self) -> dict[str, Any]:
        """What the model and the evaluation need to know about x (stored in checkpoints)."""
        return {
            "name": self.name,
            "shape": list(self.data_shape),
            "num_levels": self.num_levels,
            "binarize": self.binarize,
            "dequantize": self.dequantize,
            "binary": self.binary,
            # the width of one bin in x-space: a density on x converts to a probability of the
            # discrete value by this factor per dimension. Binarized data have two values, 0 and
            # 1, one unit apart, whatever the intensity levels they were drawn from
            "bin_width": (1.0 / self.num_levels if self.dequantize
                          else 1.0 if self.binary else 1.0 / (self.num_levels - 1)),
        }

    # --- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        # download on one process; loading happens in setup on every process. Once: train.py
        # and eval.py call it before the loggers exist (missing files stop a run before it makes
        # a W&B run), and Lightning's own call then has nothing left to do
        if getattr(self, "_prepared", False):
            return
        for train in (True, False):
            self.load(train)
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            images, labels = self.load(train=True)
            n_val = self._num_val(len(images))
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            train_images, val_images = images[train_idx], images[val_idx]
            if self.binarize == "static":
                train_images = _binarize_once(train_images, self.num_levels, self.binarize_seed)
            if self.binarize in ("static", "dynamic"):
                val_images = _binarize_once(val_images, self.num_levels, self.binarize_seed + 1)
            self.train_set = InMemoryImages(self.padded(train_images), labels[train_idx])
            self.val_set = InMemoryImages(self.padded(val_images), labels[val_idx])
        if self.test_set is None and stage in (None, "test", "predict", "fit", "validate"):
            images, labels = self.load(train=False)
            if self.binarize in ("static", "dynamic"):
                images = _binarize_once(images, self.num_levels, self.binarize_seed + 2)
            self.test_set = InMemoryImages(self.padded(images), labels)
        self._place()

    # --- where the tensors live ----------------------------------------------------------------
    @property
    def data_device(self) -> torch.device:
        """Where the data sets are held: the training device (``on_device``), or the CPU."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if device.type == "cpu" or self.on_device is False:
            return torch.device("cpu")
        if self.on_device is True:
            return device
        # auto: the GPU when the data fit easily, and no worker processes would need them
        if self.num_workers > 0:
            return torch.device("cpu")
        size = sum(s.images.nbytes + s.labels.nbytes for s in self._sets() if s.device.type == "cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > ON_DEVICE_SHARE * free:
                return torch.device("cpu")
        return device

    def _sets(self) -> list[InMemoryImages]:
        return [s for s in (self.train_set, self.val_set, self.test_set) if s is not None]

    def _place(self) -> None:
        device = self.data_device
        self.train_set, self.val_set, self.test_set = (
            s.to(device) if s is not None else None for s in (self.train_set, self.val_set, self.test_set))

    def _num_val(self, n: int) -> int:
        v = self.val_size
        n_val = int(round(v * n)) if isinstance(v, float) and v < 1 else int(v)
        if not 0 < n_val < n:
            raise SettingError(f"data.val_size={v} leaves no training or no validation data out of {n} images: "
                               f"set a number of images from 1 to {n - 1} or a fraction, e.g. data.val_size=0.1")
        return n_val

    def _check_training_batches(self, images: int) -> None:
        """Settings that leave an epoch no training batch, or fewer than the steps between two
        validations, named with the fix before Lightning meets them (it trained nothing and
        tested the untrained model, or stopped with a traceback in its loop's set-up)."""
        trainer = self.trainer
        processes = getattr(trainer, "world_size", 1) if trainer is not None else 1
        per_process = math.ceil(images / processes)  # (DistributedSampler pads the shards even)
        over = f" over {processes} processes" if processes > 1 else ""
        if self.drop_last and per_process < self.batch_size:
            raise SettingError(f"data.batch_size={self.batch_size} with data.drop_last=true leaves no training "
                               f"batch ({images} training images{over}): lower data.batch_size, or "
                               "data.drop_last=false")
        if trainer is None:
            return
        batches = per_process // self.batch_size if self.drop_last else math.ceil(per_process / self.batch_size)
        limit = getattr(trainer, "limit_train_batches", 1.0)
        if isinstance(limit, float) and 0 < limit < 1 and int(batches * limit) == 0:
            raise SettingError(f"trainer.limit_train_batches={limit} of an epoch's {batches} training batches "
                               f"is none: at least trainer.limit_train_batches={1 / batches:.3g}, or a number of "
                               "batches (e.g. trainer.limit_train_batches=1)")
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif isinstance(limit, float) and limit < 1:
            batches = int(batches * limit)
        every = getattr(trainer, "val_check_interval", 1.0)
        if (isinstance(every, int) and not isinstance(every, bool) and every > batches
                and getattr(trainer, "check_val_every_n_epoch", 1) is not None
                and getattr(trainer, "limit_val_batches", 1.0) > 0):
            raise SettingError(f"trainer.val_check_interval={every} steps is more than an epoch's {batches} training "
                               f"batches{over}: to validate every {every} steps across epochs, "
                               "trainer.check_val_every_n_epoch=null; to validate once an epoch, "
                               "trainer.val_check_interval=1.0")

    def _loader(self, dataset: InMemoryImages | None, train: bool, split: str = "train") -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        on_host = dataset.device.type == "cpu"
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0) if on_host else {}
        if train:
            self._check_training_batches(len(dataset))
            # an epoch's order as one index tensor; under DDP Lightning rebuilds the batch
            # sampler around its DistributedSampler
            batches = TensorBatchSampler(ShuffledOrder(dataset), self.batch_size, self.drop_last,
                                         device=dataset.device)
            return ResumableLoader(dataset, batch_sampler=batches, collate_fn=_batch_collate,
                                   pin_memory=self.pin_memory and on_host, **workers)
        return EvalLoader(
            dataset,
            batch_size=self.eval_batch_size,
            # under DDP, validation and test shards without padded duplicates, so that val/elbo
            # and test/nll are exact means over the split (Lightning leaves a DistributedSampler)
            sampler=eval_sampler(dataset, split),
            collate_fn=_batch_collate,
            pin_memory=self.pin_memory and on_host,
            **workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False, split="validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False, split="test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return self.to_float(images), labels

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 levels → x in [0, 1], binarized or dequantized as configured; in float64 under
        ``trainer.precision=64-true`` (Lightning converts a batch's floating tensors before its
        transfer, where this one is still uint8), else float32."""
        if self.dequantize:
            x = (images.float() + torch.rand(images.shape, device=images.device)) / self.num_levels
        else:
            x = images.float()
            if self.num_levels != 2:  # stored binary data are {0, 1} already
                x = x / (self.num_levels - 1)
            if self.binarize == "dynamic":
                # fresh for training batches; validation/test are stored as {0, 1} already, which
                # Bernoulli sampling leaves unchanged
                x = torch.bernoulli(x)
        return x if self.trainer is None else self.trainer.precision_plugin.convert_input(x)


class Digits(ImageDataModule):
    """The 8×8 handwritten digits that scikit-learn ships (1,797 images, 17 grey levels, from
    the UCI "Optical Recognition of Handwritten Digits" data set): real data that needs no
    download, so a fresh machine trains at once.

    scikit-learn has no train/test split for it: a fixed ``test_size`` of the images, drawn
    with ``split_seed``, is the test split.
    """

    name = "digits"
    num_levels = 17

    def __init__(self, test_size: int = 360, val_size: int | float = 180, **kwargs: Any):
        super().__init__(val_size=val_size, **kwargs)
        self.test_size = int(test_size)
        self._all: tuple[torch.Tensor, torch.Tensor] | None = None

    image_shape = (1, 8, 8)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self._all is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
            labels = torch.from_numpy(digits.target.astype(np.int64))
            if not 0 < self.test_size < len(images):
                raise SettingError(f"data.test_size must be between 1 and {len(images) - 1}")
            # a different stream from the validation split's, so the splits do not correlate
            gen = torch.Generator().manual_seed(self.split_seed + 10_000)
            perm = torch.randperm(len(images), generator=gen)
            self._all = (images[perm], labels[perm])
        images, labels = self._all
        cut = len(images) - self.test_size
        return (images[:cut], labels[:cut]) if train else (images[cut:], labels[cut:])


class TorchvisionImages(ImageDataModule):
    """A torchvision data set, read from ``root`` and downloaded there when missing. Archives
    that are there as downloaded (MNIST's ``.gz`` files, CIFAR's tarball) are unpacked there
    first, offline, if their MD5 is the published one, whatever ``download`` says: torchvision
    itself unpacks them only on its way through a download, so with ``download=false`` it
    refused the very files that a download leaves."""

    #: the torchvision class name
    torchvision_class: str = ""
    #: the folder under root that torchvision reads
    folder: str = ""

    def _unpack_archives(self, cls: Any) -> None:
        """Unpack each intact archive whose unpacked files are not all there. One whose MD5 is
        not the published one is left alone, for the damaged-file check to name."""
        from torchvision.datasets.utils import check_integrity

        for archive, md5, into, gives in archives(cls, self.root, self.folder):
            if all(p.is_file() for p in gives) or not archive.is_file():
                continue
            if not check_integrity(str(archive), md5):
                continue
            try:
                _unpack(archive, into)
            except OSError as err:
                raise DataNotFoundError(
                    f"{self.name}: {archive} is there but could not be unpacked into {into} "
                    f"({type(err).__name__}: {err}). Make {into} writable, or copy "
                    f"{archive.name} into a writable folder and point data.root at it (data.root="
                    f"{self.root}), or unpack it there yourself."
                ) from err

    def _where_files_go(self, cls: Any) -> str:
        """What the missing-data message asks for: which files, and into which folder."""
        names = ", ".join(name for name, _ in cls.resources)
        return (f"Put {names} into {self.root / self.folder} (as downloaded: each is checked against "
                "its published MD5 and unpacked there, offline)")

    def _dataset(self, train: bool) -> Any:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.torchvision_class)
        self._unpack_archives(cls)
        # the folders torchvision makes before it finds out it cannot download: root/folder and
        # those above it, down from root (deepest first)
        target = self.root / self.folder
        made = [p for p in (target, *target.parents) if not p.exists() and (p == self.root or self.root in p.parents)]
        try:
            return cls(str(self.root), train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
            for folder in made:  # deepest first: the empty ones it left behind go again
                with contextlib.suppress(OSError):
                    folder.rmdir()
            where = self.root / self.folder
            bad = damaged_files(cls, self.root, self.folder)
            if bad:
                listing = "; ".join(f"{p} ({why})" for p, why in bad)
                raise DataCorruptError(
                    f"{self.name}: damaged data file(s): {listing}. Delete {'it' if len(bad) == 1 else 'them'} "
                    f"(rm {' '.join(str(p) for p, _ in bad)}) and run again: an intact archive of it "
                    "there (the .gz or .tar.gz as downloaded) is unpacked again without network, "
                    "whatever data.download says; else with data.download=true and network access "
                    "it is fetched afresh, or copy a good file there."
                ) from err
            if isinstance(err, OSError) and not isinstance(err, URLError) and not where.is_dir():
                # (os.makedirs of the folder failed: nothing was tried on the network)
                raise DataNotFoundError(
                    f"{self.name}: the folder {where} cannot be made ({type(err).__name__}: {err.strerror or err}): "
                    f"point data.root at a folder that can be written, or that holds {self.folder} "
                    f"(data.root={self.root} now)."
                ) from err
            how = (
                "the download failed (no network access?)" if self.download
                else "data.download=false, so nothing was downloaded"
            )
            raise DataNotFoundError(
                f"{self.name}: the files are not under {where} and {how} ({type(err).__name__}: "
                f"{err}). {self._where_files_go(cls)} (data.root={self.root}), or point data.root "
                f"at the folder that holds {self.folder}, or run once with data.download=true on a "
                "machine with network access."
            ) from err

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # prepare_data and setup both ask (on one process): decode the files once
        cache = self.__dict__.setdefault("_decoded", {})
        if train not in cache:
            ds = self._dataset(train)
            images = torch.as_tensor(np.asarray(ds.data))
            if images.ndim == 3:  # [N, H, W] grey
                images = images.unsqueeze(1)
            else:  # [N, H, W, C]
                images = images.permute(0, 3, 1, 2)
            cache[train] = (images.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(ds.targets)))
        return cache[train]


class MNIST(TorchvisionImages):
    """MNIST (LeCun et al. 1998): 60,000 + 10,000 grey 28×28 digits."""

    name = "mnist"
    torchvision_class = "MNIST"
    folder = "MNIST/raw"

    image_shape = (1, 28, 28)


class FashionMNIST(MNIST):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 grey 28×28 clothing images."""

    name = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    folder = "FashionMNIST/raw"


class CIFAR10(TorchvisionImages):
    """CIFAR-10 (Krizhevsky 2009): 50,000 + 10,000 colour 32×32 images."""

    name = "cifar10"
    torchvision_class = "CIFAR10"
    folder = "cifar-10-batches-py"

    image_shape = (3, 32, 32)

    def _where_files_go(self, cls: Any) -> str:
        # torchvision downloads the tarball into root, and it unpacks into its folder there
        return (f"Put {cls.filename} into {self.root} (as downloaded: it is checked against its "
                f"published MD5 and unpacked there into {cls.base_folder}/, offline), or the "
                f"{cls.base_folder}/ folder unpacked from it into {self.root}")


#: a data file that this user may not read: not damaged
UNREADABLE = "unreadable"


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); 0o022 else."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class BinarizedMNIST(ImageDataModule):
    """Statically binarized MNIST (Larochelle & Murray 2011): the fixed 50,000 / 10,000 /
    10,000 train / validation / test split of binary 28×28 images that the VAE literature
    reports on (e.g. Tomczak & Welling 2018, the VampPrior). No labels.

    Reads ``binarized_mnist_{train,valid,test}.amat`` (or ``.amat.gz``, or the ``.npz`` with
    arrays ``train``/``valid``/``test``) from ``<root>/BinarizedMNIST/``, downloading the
    ``.amat`` files when missing and ``download=true``. The parsed text is cached next to
    them as ``binarized_mnist.npz``, so later runs load in a second.
    """

    name = "binarized_mnist"
    num_levels = 2
    folder = "BinarizedMNIST"
    url = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
    splits = ("train", "valid", "test")

    def __init__(self, binarize: str = "none", **kwargs: Any):
        if binarize not in ("none", "static"):
            raise SettingError(
                "binarized_mnist is binarized already (statically, Larochelle's split): leave "
                f"data.binarize=none (got {binarize!r}); for dynamic binarization use data=mnist"
            )
        kwargs.pop("val_size", None)
        super().__init__(binarize="none", val_size=10_000, **kwargs)
        self._arrays: dict[str, np.ndarray] | None = None

    image_shape = (1, 28, 28)

    #: rows of each split of Larochelle's files
    split_sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}

    def _split_problem(self, split: str, arr: np.ndarray) -> str | None:
        if arr.shape != (self.split_sizes[split], 784) or arr.size and arr.max() > 1:
            return f"{split} has shape {tuple(arr.shape)}, not ({self.split_sizes[split]}, 784) of 0/1 values"
        return None

    def _arrays_from_disk(self) -> dict[str, np.ndarray]:
        where = self.root / self.folder
        npz = where / "binarized_mnist.npz"
        cache_problem = None
        if npz.is_file():
            try:
                with open(npz, "rb") as fh, np.load(fh) as f:  # (closed also when it is no archive)
                    arrays = {k: f[k] for k in self.splits}
                cache_problem = next(filter(None, (self._split_problem(k, a) for k, a in arrays.items())), None)
            except PermissionError:  # (another user's file: not damaged, not ours to read; the text files may be)
                cache_problem = UNREADABLE
            except Exception as err:  # (a zip cut short, a member missing or damaged)
                cache_problem = f"{type(err).__name__}: {err}"
            if cache_problem is None:
                return arrays
        texts = {split: next((p for p in (where / f"binarized_mnist_{split}.amat",
                                          where / f"binarized_mnist_{split}.amat.gz") if p.is_file()), None)
                 for split in self.splits}
        if cache_problem is not None:
            missing = [split for split, path in texts.items() if path is None]
            if missing and not self.download:
                state = "cannot be read (no permission)" if cache_problem == UNREADABLE else f"is damaged ({cache_problem})"
                raise DataCorruptError(
                    f"binarized_mnist: {npz}, the parsed cache of the data, {state}, and "
                    f"binarized_mnist_{missing[0]}.amat (or .gz) is not in {where} to parse again. Delete it "
                    f"(rm {npz}) and run with data.download=true on a machine with network access, or copy the "
                    f"binarized_mnist_{{train,valid,test}}.amat files (or a good {npz.name}) there."
                )
            if cache_problem != UNREADABLE:  # rebuilt from the text files it was parsed from
                rank_zero_warn(f"vaelab: {npz}, the parsed cache of binarized MNIST, is damaged ({cache_problem}): "
                               "parsing its .amat files again")
        arrays = {}
        for split, path in texts.items():
            if path is None:
                path = self._download(split, where)
            try:
                arrays[split] = np.loadtxt(path, dtype=np.uint8, ndmin=2)
                problem = self._split_problem(split, arrays[split])
            except (OSError, EOFError, ValueError, zlib.error) as err:  # a .gz cut short or damaged, not 0/1 rows
                problem = f"{type(err).__name__}: {err}"
            if problem:
                raise DataCorruptError(
                    f"binarized_mnist: {path} is damaged or cut short ({problem}). Delete it (rm {path}) and run "
                    "again with data.download=true on a machine with network access, or copy a good file there."
                )
        tmp = None
        try:  # written whole or not at all: a run killed while writing leaves no cut-short cache
            with tempfile.NamedTemporaryFile(dir=where, prefix=".binarized_mnist.", suffix=".npz",
                                             delete=False) as f:
                tmp = f.name
                np.savez_compressed(f, **arrays)
            # readable as a file the process makes (its umask), not the temporary file's 0600: a
            # shared data folder's other users read it too
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, npz)
        except OSError:  # a read-only data folder: parse again next time
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return arrays

    def _download(self, split: str, where: Path) -> Path:
        path = where / f"binarized_mnist_{split}.amat"
        if self.download:
            try:
                from torchvision.datasets.utils import download_url

                download_url(self.url.format(split), str(where), filename=path.name)
                return path
            except Exception as err:
                reason = f"the download failed ({type(err).__name__}: {err})"
        else:
            reason = "data.download=false, so nothing was downloaded"
        raise DataNotFoundError(
            f"binarized_mnist: {path} is missing and {reason}. Put binarized_mnist_train.amat, "
            f"binarized_mnist_valid.amat and binarized_mnist_test.amat (or their .gz) into {where} "
            f"(data.root={self.root}), or run once with data.download=true on a machine with network access."
        )

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            self._arrays = self._arrays_from_disk()
        arr = self._arrays[split]
        images = self.padded(torch.from_numpy(arr.reshape(-1, 1, 28, 28).astype(np.uint8)))
        return images, torch.full((len(images),), -1, dtype=torch.long)  # no labels

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split("train" if train else "test")

    def prepare_data(self) -> None:
        self._split("train")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = InMemoryImages(*self._split("train"))
            self.val_set = InMemoryImages(*self._split("valid"))
        if self.test_set is None:
            self.test_set = InMemoryImages(*self._split("test"))
        self._place()


def num_dims(info: dict[str, Any]) -> int:
    return math.prod(info["shape"])
