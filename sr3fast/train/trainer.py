"""Training SR3 (Algorithm 1 of Saharia et al. 2021) or its regression baseline.

One optimizer step:
  1. draw the noise levels g and noises e for the whole global batch from the run's noise
     generator (identical in every process), and keep this process's rows;
  2. for each micro-batch: loss = diffusion_loss(f, x, y0, g, e) (bf16 autocast if asked),
     backward (DDP syncs gradients on the last micro-batch only);
  3. clip the global gradient norm, Adam step, linear warm-up LR schedule, EMA update.

Everything random is keyed to the run seed and the step (data order and augmentation: see
sr3fast.train.order; noise: its own generator; dropout: the torch RNG), and all of it is in the
checkpoint, so a resumed run continues exactly as an uninterrupted one (bit for bit on a CPU).
Outputs in OUT: metrics.jsonl (one line per logged step), validation.jsonl, samples/step_N.png,
checkpoints/step_N/ (see sr3fast.train.checkpoints) and, at the end, model.safetensors (EMA).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_path
from ..checkpoint import read_checkpoint, save_checkpoint
from ..diffusion import NoiseSchedule, diffusion_loss, sample_gamma
from ..model import SR3Config, build, get_preset
from . import checkpoints, distributed
from .config import TrainConfig
from .data import Augment, describe, hold_out, open_folder
from .ema import EMA
from .order import TrainingOrder, derive_seed
from .regression import regression_loss
from .validation import ValidationSet, evaluate, save_grid

STATE_FORMAT, STATE_VERSION = "sr3fast-train-state", 1
NOISE_TAG, DROPOUT_TAG, INIT_TAG, LOADER_TAG = 11, 12, 13, 14  # seed streams (order.py: 1, 2)
METRICS_FILE, VALIDATION_FILE = "metrics.jsonl", "validation.jsonl"


class _Denoiser:
    """Gives diffusion_loss its `predict_noise` through the module's __call__, so DDP's forward
    (which prepares the gradient all-reduce) and torch.compile see every call."""

    def __init__(self, network):
        self.network = network

    def predict_noise(self, x, y_t, gamma):
        return self.network(x, y_t, gamma)


def _warmup_factor(warmup: int):
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
    return factor


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop the lines after `last_step` (logged after the checkpoint a run resumes from) and
    any line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


class Trainer:
    """Builds everything a run needs from a TrainConfig, resumes if asked, and trains (`fit`)."""

    def __init__(self, config: TrainConfig, processes: distributed.Processes | None = None):
        self.config = config
        self.processes = processes or distributed.start(config.device)
        self.device = self.processes.device
        self.out = Path(config.out)
        self.checkpoint_root = self.out / "checkpoints"
        self._check_batch()
        model_config = self._model_config()
        self.train_data, self.val_data = self._open_data(model_config)  # fail early on bad data
        if self.processes.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.processes)

        torch.manual_seed(derive_seed(config.seed, INIT_TAG))  # the same weights in every process
        self.model = build(model_config).to(self.device).train()
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_factor(config.warmup))
        self.schedule = NoiseSchedule.from_config(self.model.config.schedule)
        self.noise_rng = torch.Generator(self.device).manual_seed(derive_seed(config.seed, NOISE_TAG))
        torch.manual_seed(derive_seed(config.seed, DROPOUT_TAG, self.processes.rank))
        self.step = 0
        self.data_position = 0   # samples drawn so far over all processes (sr3fast.train.order)
        self.loss_sum = torch.zeros((), device=self.device)   # over the steps since the last log line
        self.loss_steps = 0
        self._resume()

        self.network = self.model
        if self.processes.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.model.unet.compile(backend=config.compile_backend)
        self.denoiser = _Denoiser(self.network)

    # --- setup -----------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.processes.is_main:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def _check_batch(self) -> None:
        cfg, world = self.config, self.processes.world_size
        if cfg.batch % (world * cfg.accum):
            raise ValueError(f"--batch {cfg.batch} must be divisible by processes x --accum = "
                             f"{world} x {cfg.accum}: each process takes batch / processes images per "
                             "step, in --accum equal micro-batches")
        self.micro_batch = cfg.batch // (world * cfg.accum)

    def _model_config(self) -> SR3Config:
        model_config = get_preset(self.config.preset)
        if self.config.dropout is not None:
            model_config = dataclasses.replace(
                model_config, unet=dataclasses.replace(model_config.unet, dropout=self.config.dropout))
        return model_config

    def _open_data(self, model_config: SR3Config):
        cfg = self.config
        augment = Augment(flip=cfg.flip, blur=cfg.blur, blur_sigma=cfg.blur_sigma)
        data = open_folder(cfg.data, model_config.low_res, model_config.high_res, augment)
        if cfg.val is not None:
            held = open_folder(cfg.val, model_config.low_res, model_config.high_res, augment)
        else:
            count = cfg.holdout
            if count is None:
                count = min(cfg.val_images, len(data) // 10) or (1 if len(data) > 1 else 0)
            data, held = hold_out(data, count) if count else (data, None)
        self._say(f"training data {cfg.data}: {describe(data)}")
        if held is None or cfg.val_every == 0:
            self._say("validation: off" + (" (no held-out images: pass --val DIR or --holdout N)"
                                           if held is None and cfg.val_every else ""))
            return data, None
        self._say(f"validation: {min(cfg.val_images, len(held))} held-out image(s), every "
                  f"{cfg.val_every} steps, {cfg.val_steps}-step samples")
        return data, ValidationSet.from_dataset(held, cfg.val_images)

    # --- checkpoints -------------------------------------------------------------------------

    def _read_checkpoint(self, folder: Path) -> dict:
        online = read_checkpoint(folder / checkpoints.ONLINE_FILE)
        averaged = read_checkpoint(folder / checkpoints.MODEL_FILE)
        state = checkpoints.load_state(folder, map_location="cpu")
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"{folder / checkpoints.STATE_FILE} is not a version-{STATE_VERSION} "
                             "sr3fast training state")
        for name, (config, _, _) in (("online", online), ("EMA", averaged)):
            if SR3Config.from_dict(config) != self.model.config:
                raise ValueError(f"the {name} weights in {folder} are of another model configuration")
        return {"online": online[1], "ema": averaged[1], "state": state}

    def _resume(self) -> None:
        cfg = self.config
        found, loaded = None, None
        if self.processes.is_main:
            if checkpoints.remove_leftovers(self.checkpoint_root):
                self._say("removed the unfinished checkpoint(s) of an interrupted save")
            if cfg.resume:
                newest = checkpoints.newest_loadable(self.checkpoint_root, self._read_checkpoint)
                if newest is not None:
                    found, loaded = str(newest[0]), newest[1]
            elif checkpoints.list_checkpoints(self.checkpoint_root):
                found = str(checkpoints.list_checkpoints(self.checkpoint_root)[-1][1])
        found = distributed.from_main(found, self.processes)
        if found is None:
            if cfg.resume:
                self._say(f"--resume: no checkpoint in {self.checkpoint_root}; starting at step 0")
            self._start_logs(0)
            return
        if not cfg.resume:
            raise ValueError(f"{cfg.out!r} already holds checkpoints (newest: {found}); pass --resume "
                             "to continue that run, or choose another --out")
        if loaded is None:  # the other processes read the checkpoint rank 0 chose
            loaded = self._read_checkpoint(Path(found))
        state = loaded["state"]
        mismatches = cfg.resume_mismatches(TrainConfig.from_dict(state["config"]))
        if mismatches:
            raise ValueError(f"cannot resume {found} with different options ({'; '.join(mismatches)}); "
                             f"pass the values it was started with (see {self.out / 'train_config.json'}) "
                             "or train into another --out")
        self.model.load_state_dict(loaded["online"])
        self.ema.model.load_state_dict(loaded["ema"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.noise_rng.set_state(state["noise_rng"])
        self.step = int(state["step"])
        self.data_position = int(state["data"]["position"])
        ranks = state["ranks"]
        if len(ranks) == self.processes.world_size:
            mine = ranks[self.processes.rank]
            torch.set_rng_state(mine["torch_rng"])
            if self.device.type == "cuda" and mine["cuda_rng"] is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
            self.loss_sum = mine["loss_sum"].to(self.device)
            self.loss_steps = int(mine["loss_steps"])
        else:
            self._say(f"warning: {found} was saved by {len(ranks)} process(es), this run has "
                      f"{self.processes.world_size}: dropout randomness is reseeded, so the run "
                      "continues correctly but not bit-identically")
        if state["data"]["images"] != len(self.train_data):
            self._say(f"warning: the training data had {state['data']['images']} usable images at {found}, "
                      f"now {len(self.train_data)}: the data order differs from the original run")
        self._say(f"resumed from {found} (step {self.step})")
        self._start_logs(self.step)

    def _start_logs(self, step: int) -> None:
        if not self.processes.is_main:
            return
        for name in (METRICS_FILE, VALIDATION_FILE):
            _truncate_log(self.out / name, step)
        with atomic_path(self.out / "train_config.json") as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    def save(self) -> Path | None:
        """Write checkpoint step_N (rank 0; every process must call this)."""
        cuda = self.device.type == "cuda"
        ranks = distributed.gather({
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "loss_sum": self.loss_sum.detach().cpu(),
            "loss_steps": self.loss_steps,
        }, self.processes)
        if not self.processes.is_main:
            return None
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
            "config": self.config.to_dict(),
            "data": {"position": self.data_position, "images": len(self.train_data),
                     "epoch": self.data_position // len(self.train_data)},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict(), "noise_rng": self.noise_rng.get_state(), "ranks": ranks,
        }
        model_config = self.model.config.to_dict()
        meta = {"step": str(self.step), "mode": self.config.mode}

        def write(folder: Path) -> None:
            save_checkpoint(folder / checkpoints.MODEL_FILE, self.ema.model.state_dict(), model_config,
                            {**meta, "weights": "ema"})
            save_checkpoint(folder / checkpoints.ONLINE_FILE, self.model.state_dict(), model_config,
                            {**meta, "weights": "online"})
            with atomic_path(folder / checkpoints.STATE_FILE) as tmp:
                torch.save(state, tmp)

        return checkpoints.save(self.checkpoint_root, self.step, write, self.config.keep)

    # --- training ----------------------------------------------------------------------------

    def _data_batches(self):
        order = TrainingOrder(len(self.train_data), self.config.seed, self.micro_batch,
                              start=self.data_position, rank=self.processes.rank,
                              world_size=self.processes.world_size)
        workers = self.config.workers
        # Its own generator: by default a DataLoader draws its workers' base seed from the
        # global RNG, which would shift the dropout masks of a resumed run.
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_sampler=order, num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(derive_seed(self.config.seed, LOADER_TAG)))
        return iter(loader)

    def _draw_noise(self):
        """This process's (g, e) per micro-batch, drawn for the whole global batch so that the
        i-th sample of the global batch gets the same noise however the batch is split."""
        cfg, processes = self.config, self.processes
        size = self.model.config.high_res
        gamma = sample_gamma(self.schedule, cfg.batch, self.noise_rng, self.device)
        noise = torch.randn((cfg.batch, 3, size, size), generator=self.noise_rng, device=self.device)
        rows = slice(processes.rank, None, processes.world_size)  # see sr3fast.train.order
        return (gamma[rows].reshape(cfg.accum, self.micro_batch),
                noise[rows].reshape(cfg.accum, self.micro_batch, 3, size, size))

    def _loss(self, x, y0, gamma, noise) -> torch.Tensor:
        if self.config.mode == "regression":
            return regression_loss(self.denoiser, x, y0)
        return diffusion_loss(self.denoiser, x, y0, self.schedule, loss=self.config.loss,
                              gamma=gamma, noise=noise)

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches; the mean loss (a device tensor)."""
        cfg = self.config
        gammas, noises = self._draw_noise() if cfg.mode == "diffusion" else ([None] * cfg.accum,) * 2
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.accum):
            x, y0 = (t.to(self.device, non_blocking=True) for t in next(batches))
            syncs = not self.processes.distributed or micro == cfg.accum - 1
            with nullcontext() if syncs else self.network.no_sync():
                with autocast:
                    loss = self._loss(x, y0, gammas[micro], noises[micro])
                (loss / cfg.accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        return total / cfg.accum

    def _log(self, lr: float, images: int, seconds: float, bar) -> dict:
        mean_loss = distributed.mean(self.loss_sum / self.loss_steps, self.processes).item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the training loss became {mean_loss} by step {self.step}; lower --lr, raise "
                f"--warmup or train without --bf16, and --resume from the last checkpoint in "
                f"{self.checkpoint_root}")
        record = {"step": self.step, "loss": mean_loss, "lr": lr,
                  "images_per_s": images / max(seconds, 1e-9)}
        self.loss_sum.zero_()
        self.loss_steps = 0
        if self.processes.is_main:
            _append_line(self.out / METRICS_FILE, record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
        return record

    def validate(self) -> dict | None:
        """Metrics of the EMA model on the held-out images, a grid picture (rank 0 only)."""
        if self.val_data is None or not self.processes.is_main:
            return None
        cfg = self.config
        metrics, output = evaluate(self.ema.model, self.val_data, cfg.mode, cfg.val_steps, cfg.seed)
        record = {"step": self.step, **metrics, "images": len(self.val_data.low),
                  "sample_steps": cfg.val_steps if cfg.mode == "diffusion" else 0}
        _append_line(self.out / VALIDATION_FILE, record)
        (self.out / "samples").mkdir(exist_ok=True)
        save_grid(self.val_data, output, self.out / "samples" / f"step_{self.step:08d}.png")
        self._say(f"step {self.step}: validation PSNR {metrics['psnr']:.2f} dB (bicubic "
                  f"{metrics['bicubic_psnr']:.2f}), SSIM {metrics['ssim']:.3f} (bicubic "
                  f"{metrics['bicubic_ssim']:.3f}), consistency {metrics['consistency']:.2e}")
        return record

    def fit(self) -> list[dict]:
        """Train until config.steps; the logged records (as in metrics.jsonl) of this call."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.step >= cfg.steps:
            self._say(f"already at step {self.step} of {cfg.steps}; raise --steps to train further")
            return []
        batches = self._data_batches()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.processes.is_main))
        records = []
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                lr = self.scheduler.get_last_lr()[0]
                self.loss_sum += self.train_step(batches)
                self.loss_steps += 1
                self.step += 1
                self.data_position += cfg.batch
                window_images += cfg.batch
                bar.update()
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    records.append(self._log(lr, window_images, time.perf_counter() - window_start, bar))
                    window_start, window_images = time.perf_counter(), 0
                paused = False
                if cfg.val_every and (self.step % cfg.val_every == 0 or last):
                    self.validate()
                    paused = True
                if self.step % cfg.save_every == 0 or last:
                    self.save()
                    paused = True
                if paused:  # validation and saving do not count against images/s
                    window_start, window_images = time.perf_counter(), 0
        finally:
            bar.close()
            del batches
        if self.processes.is_main:
            path = save_checkpoint(self.out / "model.safetensors", self.ema.model.state_dict(),
                                   self.model.config.to_dict(),
                                   {"step": str(self.step), "mode": cfg.mode, "weights": "ema"})
            self._say(f"done: step {self.step}; EMA weights in {path} (sr3fast.load / sr3fast upscale --model)")
        return records


def train(config: TrainConfig) -> list[dict]:
    """Run (or resume) the training `config` describes, in this process or as one of torchrun's;
    returns the records logged to OUT/metrics.jsonl by this call."""
    processes = distributed.start(config.device)
    try:
        return Trainer(config, processes).fit()
    finally:
        distributed.stop(processes)
