"""Sample identity and the output cache of frozen networks (feature-map reuse).

A frozen, deterministic network (a distillation teacher, a frozen backbone during transfer
learning) gives the same output for the same training sample in every epoch. When samples have a
stable identity, the output is computed once and read back afterwards:

* :class:`IndexedDataset` wraps a map-style dataset so that every sample carries its index (or the
  datamodule yields dict batches with an ``"index"`` entry);
* :class:`OutputCache` keeps per-sample outputs in memory or memory-mapped on disk, and fills the
  entries other DDP ranks computed at the end of each epoch, so every rank holds the same values;
* :func:`probe_training_data` refuses the cache before training when serving the same samples twice
  gives different batches (a random augmentation would make the cached outputs wrong);
* :class:`FeatureCache` is the callback that reuses a frozen backbone's features.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_debug
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate
from typing_extensions import override

from lightning_compress.core.callback import is_distributed
from lightning_compress.core.validation import check_bool, check_choice

#: Keys of the samples :class:`IndexedDataset` serves (and of the batches they collate into).
INDEX_KEY = "lc_index"
SAMPLE_KEY = "lc_sample"
#: Storage choices of :class:`OutputCache`.
STORAGES = ("memory", "disk")


class IndexedDataset(Dataset):
    """A map-style dataset whose samples carry their index: the sample identity caches need.

    ``IndexedDataset(ds)[i]`` is ``{"lc_index": i, "lc_sample": ds[i]}``; the default collate turns a
    list of them into ``{"lc_index": LongTensor, "lc_sample": <the batch ds would give>}``. The
    :class:`~lightning_compress.DistillationModule` and the :class:`FeatureCache` callback read the
    indices and hand the plain batch to the user's ``training_step``, so an existing module works
    unchanged. A custom ``collate_fn`` sees the wrapped samples: wrap it with
    :func:`indexed_collate`.

    Args:
        dataset: A map-style dataset (``__getitem__`` and ``__len__``).

    Raises:
        TypeError: ``dataset`` is an ``IterableDataset`` or has no ``__len__`` / ``__getitem__``.
    """

    def __init__(self, dataset: Dataset) -> None:
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise TypeError(
                f"IndexedDataset: `dataset` must be a map-style dataset (__getitem__ and __len__), got "
                f"{type(dataset).__name__}; an iterable dataset has no stable sample identity."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {INDEX_KEY: int(index), SAMPLE_KEY: self.dataset[index]}


class indexed_collate:
    """Wrap a ``collate_fn`` so it works on :class:`IndexedDataset` samples.

    The wrapped function collates the plain samples; the indices are collated alongside. Samples
    without an index are passed through unchanged.

    Args:
        collate_fn: The user's collate function (default: PyTorch's ``default_collate``).
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        """Collate ``samples`` (indexed or plain)."""
        if samples and _is_indexed(samples[0]):
            index = torch.tensor([int(s[INDEX_KEY]) for s in samples], dtype=torch.long)
            return {INDEX_KEY: index, SAMPLE_KEY: self.collate_fn([s[SAMPLE_KEY] for s in samples])}
        return self.collate_fn(samples)


def _is_indexed(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) == 2 and INDEX_KEY in obj and SAMPLE_KEY in obj


def split_batch(batch: Any, index_key: str | None = "index") -> tuple[Tensor | None, Any]:
    """The sample indices of a batch and the batch the user's step should see.

    * A batch collated from :class:`IndexedDataset` samples: its indices and the inner batch.
    * A mapping with an ``index_key`` entry (a datamodule that yields indices): that entry and the
      batch unchanged.
    * Anything else: ``(None, batch)``.
    """
    if _is_indexed(batch):
        return batch[INDEX_KEY], batch[SAMPLE_KEY]
    if index_key and isinstance(batch, Mapping) and index_key in batch:
        index = batch[index_key]
        if isinstance(index, Tensor) and index.dim() == 1 and not index.is_floating_point():
            return index, batch
    return None, batch


def _trees_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (
                bool(torch.equal(a, b))
                or (a.is_floating_point() and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))
            )
        )
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_trees_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_trees_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    try:
        return bool(a == b)
    except Exception:
        return False


def probe_training_data(
    loader: Any, owner: str, index_key: str | None, invariant_transforms: bool, flag: str
) -> int:
    """Check, before training, that the training data has sample identity and no randomness.

    Builds the same small batch twice from the loader's dataset and ``collate_fn`` (the RNG states of
    torch, numpy and ``random`` are restored afterwards, so training draws the same numbers).

    Args:
        loader: ``trainer.train_dataloader``.
        owner: The caller's name, for messages.
        index_key: Mapping key that holds indices in the user's own dict batches.
        invariant_transforms: The user declared the randomness irrelevant to the cached network.
        flag: The argument that turned the cache on (for messages).

    Returns:
        The number of samples (the cache's size).

    Raises:
        ValueError: No sample identity, a random transform, or data that cannot be probed.
    """
    how = (
        "wrap the training dataset in lightning_compress.IndexedDataset(dataset) (with a custom "
        "collate_fn, wrap it in lightning_compress.indexed_collate(fn)), or yield dict batches with an "
        f"{index_key!r} entry of sample indices"
    )
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"{owner}({flag}) needs one training DataLoader to cache per-sample outputs; got "
            f"{type(loader).__name__}. Turn the cache off or train on a single DataLoader."
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"{owner}({flag}): the training dataset {type(dataset).__name__} is iterable, so samples have "
            f"no stable identity to cache outputs by; {how} (a map-style dataset)."
        )
    size = len(dataset)
    if size == 0:
        raise ValueError(f"{owner}({flag}): the training dataset is empty.")
    indices = sorted({0, size // 2, size - 1})
    collate = loader.collate_fn if loader.collate_fn is not None else default_collate
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        first = collate([dataset[i] for i in indices])
        second = collate([dataset[i] for i in indices])
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
    found, _ = split_batch(first, index_key)
    if found is None:
        raise ValueError(
            f"{owner}({flag}) needs sample identity (which sample each row of a batch is), and the "
            f"training batches carry none: {how}."
        )
    if found.tolist() != indices:
        raise ValueError(
            f"{owner}({flag}): the training dataset's sample indices are not its positions "
            f"(dataset[{indices}] reported indices {found.tolist()}); indices must be 0..len(dataset)-1."
        )
    if not invariant_transforms and not _trees_equal(first, second):
        raise ValueError(
            f"{owner}({flag}): the training data is random (the same samples {indices} gave different "
            "batches twice, e.g. a random augmentation in the dataset or collate_fn), so cached outputs "
            "would not match the batches trained on. Turn the cache off, or pass "
            "invariant_transforms=True if the randomness does not change the cached network's output."
        )
    return size


def tensors_version(tensors: Sequence[Tensor]) -> int:
    """Sum of the in-place version counters: changes whenever a tensor is modified in place."""
    return sum(t._version for t in tensors)


def positional_limit(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments the bound method ``fn`` takes (``None``: any number)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class OutputCache:
    """Per-sample outputs of a frozen network, indexed by the sample's dataset index.

    Entries are allocated at the first :meth:`store` (the per-sample shapes and dtypes of the
    outputs), on the CPU, in memory or memory-mapped files (``storage="disk"``), and marked filled
    one by one. :meth:`lookup` returns the rows of a batch only if all of them are filled.
    :meth:`sync` (every DDP rank, e.g. at the end of each training epoch) all-gathers the entries each
    rank computed since the last sync, so every rank ends up with the same, complete cache. The cache
    is not checkpointed: after a resume it is rebuilt (a frozen network gives the same values).

    Args:
        size: Number of samples (the dataset's length).
        storage: ``"memory"`` or ``"disk"``.
        directory: Folder of the memory-mapped files (``storage="disk"``; default: a temporary
            folder removed by :meth:`close`).
        name: File name prefix.
    """

    def __init__(
        self, size: int, storage: str = "memory", directory: str | None = None, name: str = "outputs"
    ) -> None:
        self.size = int(size)
        self.storage = check_choice("cache", storage, STORAGES)
        self.directory = directory
        self.name = name
        self.values: list[Tensor] | None = None
        self.filled = torch.zeros(self.size, dtype=torch.bool)
        self._new: list[Tensor] = []
        self._files: list[str] = []
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.hits = 0
        self.misses = 0
        #: Bytes each rank all-gathers at once in :meth:`sync` (larger caches go in chunks).
        self.sync_bytes = 64 * 2**20

    def _allocate(self, outputs: Sequence[Tensor]) -> None:
        self.values = []
        if self.storage == "disk":
            folder = self.directory
            if folder is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="lightning_compress_cache_")
                folder = self._tmpdir.name
            os.makedirs(folder, exist_ok=True)
            rank = dist.get_rank() if is_distributed() else 0
        for k, out in enumerate(outputs):
            shape = (self.size, *out.shape[1:])
            if self.storage == "memory":
                self.values.append(torch.zeros(shape, dtype=out.dtype))
                continue
            path = os.path.join(folder, f"{self.name}_rank{rank}_{k}.bin")
            if os.path.exists(path):
                os.remove(path)  # never read stale values from an earlier run
            numel = int(np.prod(shape))
            self.values.append(torch.from_file(path, shared=True, size=numel, dtype=out.dtype).view(shape))
            self._files.append(path)

    @property
    def n_filled(self) -> int:
        """Number of samples whose outputs are cached."""
        return int(self.filled.sum())

    def lookup(self, indices: Tensor) -> tuple[Tensor, ...] | None:
        """The cached outputs of the samples ``indices`` (CPU tensors), or ``None`` if one is missing."""
        if self.values is None:
            self.misses += 1
            return None
        idx = indices.detach().to("cpu", torch.long)
        if not bool(self.filled[idx].all()):
            self.misses += 1
            return None
        self.hits += 1
        return tuple(v.index_select(0, idx) for v in self.values)

    def store(self, indices: Tensor, outputs: Sequence[Tensor]) -> None:
        """Keep the outputs of samples ``indices`` (rows of each tensor in ``outputs``)."""
        idx = indices.detach().to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.size):
            raise IndexError(
                f"OutputCache: sample index {int(idx.max())} outside the dataset's 0..{self.size - 1}."
            )
        if self.values is None:
            self._allocate(outputs)
        assert self.values is not None
        if len(outputs) != len(self.values) or any(
            out.shape[1:] != v.shape[1:] or out.shape[0] != idx.numel()
            for out, v in zip(outputs, self.values, strict=False)
        ):
            raise ValueError(
                "OutputCache: the cached network's per-sample output shapes changed "
                f"({[tuple(o.shape) for o in outputs]} vs {[tuple(v.shape) for v in self.values]}); "
                "the cache needs outputs of a fixed shape per sample (e.g. padded sequences)."
            )
        for out, v in zip(outputs, self.values, strict=True):
            v[idx] = out.detach().to("cpu", v.dtype)
        self.filled[idx] = True
        self._new.append(idx)

    def clear(self) -> None:
        """Forget every entry (the cached network changed)."""
        self.filled.zero_()
        self._new.clear()

    def sync(self, device: torch.device | None = None) -> None:
        """All-gather the entries every rank computed since the last call (collective under DDP).

        Each rank serves a different shard, so after the first epoch's sync every rank holds the
        outputs of every sample, computed once by whichever rank served it.
        """
        new = torch.cat(self._new) if self._new else torch.zeros(0, dtype=torch.long)
        self._new.clear()
        if not is_distributed():
            return
        device = torch.device("cpu") if device is None else device
        world = dist.get_world_size()
        count = torch.tensor([new.numel(), int(self.values is not None)], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        longest = max(int(c[0]) for c in counts)
        if longest == 0:
            return
        if not all(bool(c[1]) for c in counts):  # every rank sees the same counts: all raise together
            raise RuntimeError(
                "OutputCache.sync: a rank cached nothing while others did (ranks served different numbers "
                "of batches); use a DistributedSampler (Lightning's default under DDP)."
            )
        assert self.values is not None
        padded = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded[: new.numel()] = new.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        rows_of = [g.cpu() for g in gathered]
        for v in self.values:
            # Not every backend gathers (b)float16: those travel as float32, stored back in v's dtype.
            wire = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
            per_row = max(int(np.prod(v.shape[1:])), 1) * torch.empty((), dtype=wire).element_size()
            chunk = max(1, self.sync_bytes // (per_row * world))  # bounded memory per all-gather
            for lo in range(0, longest, chunk):
                hi = min(lo + chunk, longest)
                rows = torch.zeros((hi - lo, *v.shape[1:]), dtype=wire, device=device)
                mine = new[lo:hi]
                if mine.numel():
                    rows[: mine.numel()] = v.index_select(0, mine).to(device, wire)
                parts = [torch.empty_like(rows) for _ in range(world)]
                dist.all_gather(parts, rows)
                for part, idx in zip(parts, rows_of, strict=True):
                    idx = idx[lo:hi]
                    keep = idx >= 0
                    if bool(keep.any()):
                        v[idx[keep]] = part[keep.to(part.device)].cpu().to(v.dtype)
        for idx in rows_of:
            self.filled[idx[idx >= 0]] = True

    def close(self) -> None:
        """Drop the values and remove the memory-mapped files this cache created."""
        self.values = None
        self.filled.zero_()
        for path in self._files:
            with contextlib.suppress(OSError):
                os.remove(path)
        self._files.clear()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def check_cache_arg(owner: str, cache: Any) -> str | None:
    """``cache`` as ``None`` (off), ``"memory"`` or ``"disk"`` (``True`` means ``"memory"``)."""
    if cache is False or cache is None:
        return None
    if cache is True:
        return "memory"
    if isinstance(cache, str) and cache in STORAGES:
        return cache
    raise ValueError(
        f"{owner}: `cache`={cache!r} is not supported; expected False, True (= 'memory'), 'memory' or 'disk'."
    )


def _stochastic_in_training(module: nn.Module) -> list[str]:
    """Submodules whose training-mode output depends on the batch or the RNG (dropout, batch norm)."""
    bad = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            bad.append(name or type(m).__name__)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            bad.append(name or type(m).__name__)
    return bad


class FeatureCache(pl.Callback):
    """Reuse a frozen backbone's features across epochs (feature-map reuse for transfer learning).

    While the backbone named by ``module`` is frozen (no parameter requires a gradient) and
    deterministic (no dropout or batch norm in training mode: freeze it with
    ``BackboneFinetuning(train_bn=False)`` or keep it in eval mode), its output for each training
    sample is computed once and read back from the cache in later epochs, so a training step costs
    only the head. The cache is cleared whenever a backbone weight or buffer changes in place (a
    pruning mask update, a weight load) and bypassed while the backbone trains (after
    ``BackboneFinetuning`` unfreezes it), so results equal an uncached run. Validation, test and
    prediction always run the backbone.

    Training samples need a stable identity: wrap the training dataset in :class:`IndexedDataset`
    (the callback hands the plain batch to the module's ``training_step``) or yield dict batches with
    an ``index_key`` entry. A random training transform is refused unless ``invariant_transforms``.

    Args:
        module: Name of the backbone submodule in the LightningModule (e.g. ``"backbone"``).
        cache: ``"memory"`` or ``"disk"`` (memory-mapped files in ``cache_dir``).
        cache_dir: Folder of the memory-mapped files (default: a temporary folder).
        invariant_transforms: Declare that the training data's randomness does not change the
            backbone's output (skips the randomness guard).
        index_key: Key of the indices in the user's own dict batches.

    Attributes:
        cache: The :class:`OutputCache` (after training started).
    """

    def __init__(
        self,
        module: str = "backbone",
        cache: Literal["memory", "disk"] = "memory",
        cache_dir: str | None = None,
        invariant_transforms: bool = False,
        index_key: str = "index",
    ) -> None:
        super().__init__()
        if not isinstance(module, str) or not module:
            raise ValueError(
                f"FeatureCache: `module`={module!r} must be a submodule name such as 'backbone'."
            )
        self.module_name = module
        self.storage = check_choice("cache", cache, STORAGES)
        self.cache_dir = cache_dir
        self.invariant_transforms = check_bool("invariant_transforms", invariant_transforms)
        if not isinstance(index_key, str):
            raise ValueError(f"FeatureCache: `index_key`={index_key!r} must be a string.")
        self.index_key = index_key
        self.cache: OutputCache | None = None
        self._module: nn.Module | None = None
        self._pl_module: pl.LightningModule | None = None
        self._indices: Tensor | None = None
        self._tensors: list[Tensor] = []
        self._version = -1
        self._used_this_step = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module_name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            module = pl_module.get_submodule(self.module_name)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"FeatureCache: `module`={self.module_name!r} is not a submodule of "
                f"{type(pl_module).__name__}; its children are {names}."
            ) from None
        self._module, self._pl_module = module, pl_module
        original_step = type(pl_module).training_step
        limit = positional_limit(original_step.__get__(pl_module))  # bound: without self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            # Strip the sample indices, remember them for the backbone's forward, run the user's step.
            if args:
                self._indices, batch = split_batch(args[0], self.index_key)
                args = (batch, *args[1:])
            elif "batch" in kwargs:
                self._indices, kwargs["batch"] = split_batch(kwargs["batch"], self.index_key)
            self._used_this_step = False
            try:
                return original_step(pl_module, *args[:limit] if limit is not None else args, **kwargs)
            finally:
                self._indices = None

        pl_module.__dict__["training_step"] = training_step
        original_forward = type(module).forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(original_forward, module, args, kwargs)

        module.__dict__["forward"] = forward

    def _usable(self, module: nn.Module) -> bool:
        if self._indices is None or self.cache is None:
            return False
        return not (any(p.requires_grad for p in module.parameters()) or _stochastic_in_training(module))

    def _forward(self, original: Callable[..., Any], module: nn.Module, args: Any, kwargs: Any) -> Any:
        if not self._usable(module):
            return original(module, *args, **kwargs)
        if self._used_this_step:  # a second call in the same step (another view of the batch)
            return original(module, *args, **kwargs)
        self._used_this_step = True
        assert self.cache is not None
        assert self._indices is not None
        version = tensors_version(self._tensors)
        if version != self._version:
            if self.cache.n_filled:
                rank_zero_debug(f"FeatureCache: {self.module_name} changed, cache cleared")
            self.cache.clear()
            self._version = version
        hit = self.cache.lookup(self._indices)
        if hit is not None:
            device = next(iter(self._tensors), torch.empty(0)).device
            return hit[0].to(device, non_blocking=True)
        with torch.no_grad():
            out = original(module, *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"FeatureCache: {self.module_name} returned {type(out).__name__}; only a tensor output can "
                "be cached."
            )
        self.cache.store(self._indices, (out,))
        return out

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        size = probe_training_data(
            trainer.train_dataloader,
            "FeatureCache",
            self.index_key,
            self.invariant_transforms,
            f"module={self.module_name!r}",
        )
        assert self._module is not None
        self._tensors = [*self._module.parameters(), *self._module.buffers()]
        self._version = -1
        if self.cache is not None:
            self.cache.close()
        self.cache = OutputCache(size, self.storage, self.cache_dir, name=f"features_{self.module_name}")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache is not None:
            # The version check compares per-rank counters; DDP keeps the backbone identical on every
            # rank, so each rank clears at the same steps and the gathered entries are consistent.
            self.cache.sync(pl_module.device if pl_module.device.type != "cpu" else None)

    def _restore(self) -> None:
        if self._pl_module is not None:
            self._pl_module.__dict__.pop("training_step", None)
        if self._module is not None:
            self._module.__dict__.pop("forward", None)
        self._pl_module = self._module = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restore()
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()


__all__ = [
    "INDEX_KEY",
    "SAMPLE_KEY",
    "STORAGES",
    "FeatureCache",
    "IndexedDataset",
    "OutputCache",
    "check_cache_arg",
    "indexed_collate",
    "positional_limit",
    "probe_training_data",
    "split_batch",
    "tensors_version",
]
