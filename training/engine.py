"""The training loop both trainers share, on HF accelerate.

A trainer is a :class:`TrainTask`: it builds one ``nn.Module`` whose ``forward(batch, generator)`` returns the
loss (and extra numbers to log), names its trainable tensors and writes its outputs. The engine owns the rest:
``Accelerator`` (mixed precision, gradient accumulation, ``accelerate launch --multi_gpu``), AdamW + LR
schedule, the data order, a tqdm progress bar, ``loss_log.jsonl``, previews, atomic checkpoints and exact
resumption.

Exact resumption: every random draw of a training step comes from :func:`~.state.step_generator` (a function of
seed, step, micro-batch and process), and the data order from :class:`StepSampler` (a function of seed and
position) — or, when the dataset has aspect-ratio buckets (``dataset.bucket_ids``), from
:class:`BucketBatchSampler` (single-bucket batches, a function of seed and batch position). A checkpoint
stores the trainable tensors, optimizer, LR scheduler, grad scaler, the data position, the byte length of the
loss log and each process's global RNG states; ``--resume latest`` restores all of them, truncates the loss log
to the checkpoint and continues — on CPU, bit-identical to a run never interrupted.

Several processes means DDP (``accelerate launch --multi_gpu``, torchrun): the optimizer is built before
``prepare`` and the trained tensors are read from the unwrapped module on the main process, which holds only a
shard under FSDP, DeepSpeed or Megatron-LM. :func:`check_distributed` refuses those before anything is built.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import save_file, load_file

from . import checkpoint as ckpt
from .state import load_tree, rng_state, save_tree, set_rng_state, step_generator

#: accelerate's sharded / model-parallel modes (``DistributedType`` values): the name to print and the variable
#: ``accelerate launch`` sets for each. Only data parallelism (DDP) is supported.
UNSUPPORTED_DISTRIBUTED = {"FSDP": ("FSDP", "ACCELERATE_USE_FSDP"),
                           "DEEPSPEED": ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
                           "MEGATRON_LM": ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM")}
LOG_FILE = "loss_log.jsonl"
CONFIG_FILE = "train_config.json"
FAULT_ENV = "PRODUCTBG_TRAIN_FAULT"  # "hold-in-checkpoint:<step>": crash tests stop mid-write and wait to be killed


class TrainTask(Protocol):
    """What a trainer provides to :func:`fit`."""

    def build(self, device: torch.device) -> torch.nn.Module:
        """The module to train; ``forward(batch, generator) -> {"loss": tensor, ...floats to log}``."""

    def dataset(self) -> torch.utils.data.Dataset:
        """Training samples; indexed by ``(index, sample_seed)``."""

    def param_groups(self, module: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups."""

    def trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (everything trained)."""

    def load_trainable_state(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state`."""

    def save_outputs(self, module: torch.nn.Module, out_dir: Path, step: int) -> list[Path]:
        """Write the final files (bank, LoRA, style encoder ...)."""

    def preview(self, module: torch.nn.Module, out_dir: Path, step: int) -> Path | None:
        """Optionally write a sample image for ``step``."""

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must not change between a run and its resumption."""


@dataclass
class EngineConfig:
    """Loop settings.

    Attributes:
        output_dir: where logs, checkpoints, samples and outputs go.
        max_steps: optimizer steps to train to (a resumed run continues up to this).
        batch_size: samples per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        lr_schedule: a diffusers scheduler name (``constant``, ``constant_with_warmup``, ``cosine``, ``linear``).
        warmup_steps: LR warm-up steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (0 = off).
        mixed_precision: ``no``, ``fp16`` or ``bf16``.
        seed: the seed of everything (data order, noise, init).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        keep_checkpoints: how many complete checkpoints to keep.
        resume: ``None``, ``"latest"`` or a checkpoint folder.
        sample_every: steps between previews (0 = none).
        num_workers: DataLoader workers.
        progress: show a progress bar.
        cpu: force CPU even when a GPU is present.
    """

    output_dir: Path
    max_steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: str | None = None
    sample_every: int = 0
    num_workers: int = 0
    progress: bool = True
    cpu: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able settings."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class FitResult:
    """What :func:`fit` did."""

    step: int
    resumed_from: int
    outputs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    main_process: bool = True


# ---------------------------------------------------------------------------------------------- data order
class StepSampler(torch.utils.data.Sampler):
    """An endless, resumable data order: item ``p`` of the stream is ``(perm_e[p mod N], seed_p)``.

    ``perm_e`` is a permutation drawn from (seed, epoch e = p div N); ``seed_p`` seeds that sample's
    augmentation. A process of ``world`` takes every ``world``-th batch of the stream.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if size <= 0:
            raise ValueError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict[int, np.ndarray] = {}
        batch = self.start_batch
        while True:
            first = (batch * self.world + self.rank) * self.batch_size
            for p in range(first, first + self.batch_size):
                epoch = p // self.size
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                yield int(cache[epoch][p % self.size]), _item_seed(self.seed, p)
            batch += 1


def _item_seed(seed: int, position: int) -> int:
    """The augmentation seed of stream position ``position`` (shared by both samplers)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless, resumable order of single-bucket batches (a DataLoader ``batch_sampler``).

    Epoch ``e`` is formed from (seed, e) alone: each bucket's indices are shuffled with an RNG of
    (seed, e, bucket) and cut into batches of ``batch_size`` — a bucket's last batch is short when its image
    count is not a multiple of ``batch_size`` (nothing is dropped: every image is seen once per epoch, and a
    bucket smaller than a batch is one short batch, never skipped) — then the list of batches is shuffled with an
    RNG of (seed, e). Every epoch has the same number of batches ``per_epoch``; global batch ``g`` is batch
    ``g mod per_epoch`` of epoch ``g div per_epoch``, and a process of ``world`` takes global batches
    ``b * world + rank`` (as :class:`StepSampler` does). Item seeds are :func:`_item_seed` of the global position
    ``e * N + (items in earlier batches of epoch e) + k``, so any batch can be produced from (seed, g) without
    replaying the stream: ``start_batch`` resumes exactly.

    Args:
        bucket_ids: each dataset item's bucket (any hashable ints; equal ids = same image size).
        batch_size, seed, start_batch, rank, world: as for :class:`StepSampler`.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if not bucket_ids:
            raise ValueError("the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.size, self.batch_size, self.seed = len(bucket_ids), batch_size, seed
        self.start_batch, self.rank, self.world = start_batch, rank, world
        members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            members.setdefault(int(b), []).append(i)
        self.members = {b: np.asarray(members[b]) for b in sorted(members)}
        #: batches per epoch, and how many of them are short (a bucket's remainder)
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())
        self.short_per_epoch = sum(1 for m in self.members.values() if len(m) % batch_size)

    def epoch(self, e: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Epoch ``e``'s batches (index arrays, in order) and each batch's first global position."""
        batches = []
        for b, idx in self.members.items():
            perm = idx[np.random.default_rng([self.seed, 0xB0C7, e, b]).permutation(len(idx))]
            batches.extend(perm[k:k + self.batch_size] for k in range(0, len(perm), self.batch_size))
        order = np.random.default_rng([self.seed, 0xB0C7, e]).permutation(len(batches))
        batches = [batches[k] for k in order]
        starts = e * self.size + np.concatenate([[0], np.cumsum([len(x) for x in batches])[:-1]])
        return batches, starts

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, tuple[list[np.ndarray], np.ndarray]] | None = None
        batch = self.start_batch
        while True:
            g = batch * self.world + self.rank
            e, j = divmod(g, self.per_epoch)
            if cached is None or cached[0] != e:
                cached = (e, self.epoch(e))
            idx, first = cached[1][0][j], int(cached[1][1][j])
            yield [(int(i), _item_seed(self.seed, first + k)) for k, i in enumerate(idx)]
            batch += 1

    def summary(self, sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
        """What training will see per epoch (recorded in ``train_config.json``): images per bucket (keyed
        ``HxW`` when ``sizes`` — the dataset's ``buckets`` — are given), batches, short batches, dropped (0)."""
        name = (lambda b: f"{sizes[b][0]}x{sizes[b][1]}") if sizes is not None else str
        return {"images": {name(b): len(m) for b, m in self.members.items()}, "batches_per_epoch": self.per_epoch,
                "short_batches_per_epoch": self.short_per_epoch, "dropped": 0}


def dataset_buckets(dataset: Any) -> tuple[list[int] | None, list[tuple[int, int]] | None]:
    """``(bucket_ids, buckets)`` of a dataset, or of the dataset it wraps (``base``, as PG's pair dataset does);
    ``(None, None)`` when it has no buckets."""
    while dataset is not None:
        ids = getattr(dataset, "bucket_ids", None)
        if ids is not None:
            return list(ids), getattr(dataset, "buckets", None)
        dataset = getattr(dataset, "base", None)
    return None, None


# ---------------------------------------------------------------------------------------------- the loop
def check_distributed(distributed_type: str | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Refuse accelerate setups other than one process or DDP, before training starts.

    Args:
        distributed_type: an ``Accelerator``'s ``distributed_type`` (a ``DistributedType``, a ``str``), if one is made.
        environ: where ``accelerate launch`` says FSDP / DeepSpeed / Megatron-LM (``ACCELERATE_USE_*``); default
            ``os.environ``.

    Raises:
        ValueError: FSDP, DeepSpeed (any ZeRO stage) or Megatron-LM asked for (one line: what to use instead).
    """
    env = os.environ if environ is None else environ
    kind = str(getattr(distributed_type, "value", distributed_type))
    for key, (name, variable) in UNSUPPORTED_DISTRIBUTED.items():
        if kind == key or env.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            raise ValueError(f"training supports one process or DDP only, and this accelerate config asks for {name}: "
                             "choose multi-GPU (DDP) without FSDP or DeepSpeed in `accelerate config`, or run "
                             "`accelerate launch --multi_gpu` (see docs/training.md)")


def _fault_step() -> int | None:
    value = os.environ.get(FAULT_ENV, "")
    return int(value.split(":")[1]) if value.startswith("hold-in-checkpoint:") else None


class _Run:
    """One training run's live objects (keeps :func:`fit` short)."""

    def __init__(self, task: TrainTask, cfg: EngineConfig) -> None:
        # optional dependency: accelerate, diffusers
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        self.task, self.cfg = task, cfg
        self.out = Path(cfg.output_dir)
        check_distributed()  # before accelerate reads the same variables (and wants DeepSpeed installed)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                               cpu=cfg.cpu)
        check_distributed(self.acc.distributed_type)
        set_seed(cfg.seed)
        module = task.build(self.acc.device)
        # foreach: torch picks the per-tensor loop for CPU tensors, ~100x slower for hundreds of small tensors
        self.optimizer = torch.optim.AdamW(task.param_groups(module, cfg.lr), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, foreach=True)
        self.scheduler = get_scheduler(cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.max_steps)
        self.model, self.optimizer = self.acc.prepare(module, self.optimizer)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.bucket_summary: dict[str, Any] | None = None  # set by batches() when the dataset has buckets
        self.ckpt_root = self.out / "checkpoints"
        self.log_path = self.out / LOG_FILE

    @property
    def module(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        acc = self.acc
        tmp = ckpt.checkpoint_dir(self.ckpt_root, self.step).with_name(
            f"{ckpt.PREFIX}{self.step:06d}{ckpt.TMP_SUFFIX}")
        if acc.is_main_process:
            ckpt.begin(self.ckpt_root, self.step)
        acc.wait_for_everyone()
        save_tree(rng_state(), tmp / f"rng-{acc.process_index}.json", tmp / f"rng-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_main(tmp)
            ckpt.commit(tmp, {"step": self.step, "world": acc.num_processes})
            ckpt.prune(self.ckpt_root, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def _write_main(self, tmp: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.task.trainable_state(self.module).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if _fault_step() == self.step:  # crash test: leave a half-written checkpoint and wait for SIGKILL
            (self.out / ".fault-held").write_text(str(self.step))
            while True:
                time.sleep(1)
        state = {"step": self.step, "log_bytes": self.log_path.stat().st_size if self.log_path.exists() else 0,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                 "fingerprint": self.task.fingerprint()}
        save_tree(state, tmp / "state.json", tmp / "state.safetensors")

    def resume(self) -> int:
        found = ckpt.resolve(self.ckpt_root, self.cfg.resume)
        if found.path is None:
            return 0
        state = load_tree(found.path / "state.json", found.path / "state.safetensors")
        _check_fingerprint(state["fingerprint"], self.task.fingerprint(), found.path)
        self.task.load_trainable_state(self.module, load_file(str(found.path / "trainable.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        rng = found.path / f"rng-{self.acc.process_index}.json"
        if rng.is_file():
            set_rng_state(load_tree(rng, rng.with_suffix(".safetensors")))
        if self.acc.is_main_process and self.log_path.exists():
            with self.log_path.open("r+b") as f:
                f.truncate(state["log_bytes"])
        self.step = int(state["step"])
        return self.step

    # ------------------------------------------------------------------ steps
    def batches(self) -> Iterator[Any]:
        """The data stream from the current step: :class:`StepSampler` batches, or with a bucketed dataset
        :class:`BucketBatchSampler` batches (one image size each); both a function of (seed, position)."""
        dataset, workers = self.task.dataset(), self.cfg.num_workers
        where = dict(start_batch=self.step * self.cfg.grad_accum, rank=self.acc.process_index,
                     world=self.acc.num_processes)
        ids, sizes = dataset_buckets(dataset)
        if ids is None:
            sampler = StepSampler(len(dataset), self.cfg.batch_size, self.cfg.seed, **where)
            loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                                                 num_workers=workers, persistent_workers=workers > 0)
        else:
            batch_sampler = BucketBatchSampler(ids, self.cfg.batch_size, self.cfg.seed, **where)
            self.bucket_summary = batch_sampler.summary(sizes)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                                 persistent_workers=workers > 0)
        return iter(loader)

    def train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        sums: dict[str, float] = {}
        for micro in range(self.cfg.grad_accum):
            batch = _to_device(next(batches), self.acc.device)
            gen = step_generator(self.cfg.seed, self.step, micro, self.acc.process_index)
            with self.acc.accumulate(self.model):
                out = self.model(batch, gen)
                self.acc.backward(out["loss"])
                if self.acc.sync_gradients and self.cfg.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in out.items():
                value = self.acc.reduce(v.detach().float().reshape(1), "mean") if torch.is_tensor(v) else v
                sums[k] = sums.get(k, 0.0) + float(value) / self.cfg.grad_accum
        self.scheduler.step()
        self.step += 1
        return sums

    def log(self, values: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        line = {"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0], "time": round(time.time(), 3)}
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _check_fingerprint(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise ValueError(f"cannot resume from {where}: settings changed ({detail}); use a new output folder")


def fit(task: TrainTask, cfg: EngineConfig) -> FitResult:
    """Train ``task`` to ``cfg.max_steps`` (resuming when asked) and write its outputs.

    Returns:
        The :class:`FitResult`: final step, the step resumed from, output files, this run's losses.
    """
    # optional dependency: tqdm
    from tqdm.auto import tqdm

    if not cfg.resume and ckpt.find_latest(Path(cfg.output_dir) / "checkpoints").path is not None:
        raise ValueError(f"{cfg.output_dir} already holds checkpoints: pass --resume latest to continue that run, "
                         "or choose a new output folder")
    run = _Run(task, cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    start = run.resume() if cfg.resume else 0
    if start == 0 and run.acc.is_main_process:
        run.log_path.unlink(missing_ok=True)  # a fresh run (or one killed before its first checkpoint)
    batches = run.batches()
    if run.acc.is_main_process:
        config = {"engine": cfg.to_json(), "task": task.fingerprint()}
        if run.bucket_summary is not None:
            config["buckets"] = run.bucket_summary
        (run.out / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False, default=str))
    result = FitResult(step=start, resumed_from=start, main_process=run.acc.is_main_process)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and run.acc.is_main_process),
               desc="train", dynamic_ncols=True)
    run.model.train()
    while run.step < cfg.max_steps:
        values = run.train_step(batches)
        run.log(values)
        result.losses.append(values["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        _periodic(run, cfg)
    bar.close()
    result.step = run.step
    if cfg.checkpoint_every <= 0 or run.step % cfg.checkpoint_every:
        run.save_checkpoint()
    if run.acc.is_main_process:
        result.outputs = task.save_outputs(run.module, run.out, run.step)
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return result


def _periodic(run: _Run, cfg: EngineConfig) -> None:
    if cfg.checkpoint_every > 0 and run.step % cfg.checkpoint_every == 0:
        run.save_checkpoint()
    if cfg.sample_every > 0 and run.step % cfg.sample_every == 0 and run.acc.is_main_process:
        run.model.eval()
        run.task.preview(run.module, run.out / "samples", run.step)
        run.model.train()
