"""Training the baseline UNet: ε-prediction MSE, Adam, EMA, resumable checkpoints.

:func:`train_unet` takes tensors, a :class:`TrainSettings` recipe and hooks: no Hydra, no MLflow
(pass ``log_fn`` to log metrics anywhere). Its steps are the methods of :class:`Training`:
build the networks, resume, train an epoch, write a checkpoint. Checkpoints in ``checkpoint_dir``:

- ``ckpt_epoch_{E}.pt`` every ``checkpoint_every`` epochs and after the last epoch,
- ``last.pt`` next to every checkpoint written, and when training stops early at ``max_steps``;
  ``resume=True`` continues from it (same step count, optimizer, EMA, data order, noise stream).

Each file is in the published format: ``model_state_dict`` holds the EMA weights (what samples),
``net_state_dict`` the raw weights, plus ``optimizer_state_dict``, ``epoch`` (completed epochs),
``batch_in_epoch`` (batches done in the next epoch, > 0 only after a ``max_steps`` stop),
``step``, ``unet_config``, ``train_config``, ``noise_rng_state`` and ``loss``.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from locality.schedule import alphas_cumprod
from locality.unet.checkpoint import (
    CheckpointMismatchError,
    check_state_dict,
    read_checkpoint,
    save_unet_checkpoint,
    setting_name_for,
)
from locality.unet.network import UNet, build_unet

LAST_CHECKPOINT = "last.pt"

LogFn = Callable[[dict[str, float], int], None]
#: Called with (EMA model in eval mode, completed epochs, step) whenever a checkpoint is written.
SampleFn = Callable[[UNet, int, int], None]


@dataclass
class TrainResult:
    """What :func:`train_unet` hands back."""

    model: UNet  # the EMA network, eval mode (what the published checkpoints hold)
    net: UNet  # the raw network
    epoch: int  # completed epochs
    step: int  # optimizer steps taken in total (resumed runs included)
    last_loss: float  # mean loss of the last logging window (nan if no step was taken)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 - decay)·net, over parameters; buffers are copied."""
    for pe, pn in zip(ema.parameters(), net.parameters()):
        pe.lerp_(pn.detach(), 1.0 - decay)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)


def diffusion_loss(
    net: UNet, x0: torch.Tensor, abar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ε-prediction MSE for x0 [B, C, H, W]; t ~ U{0..T-1}, ε ~ N(0, I), x_t = √ᾱ x0 + √(1-ᾱ) ε.

    ``abar`` is ᾱ [T] (float64 on x0's device); it is cast to float32 per sample.
    """
    B = x0.shape[0]
    t = torch.randint(0, abar.shape[0], (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    a = abar[t].to(x0.dtype).view(B, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
    return F.mse_loss(net(x_t, t).float(), eps.float())


@dataclass(frozen=True)
class TrainSettings:
    """The recipe of :func:`train_unet`.

    epochs: total epochs (a resumed run trains up to the same total). lr, warmup_steps: Adam's
    learning rate, linearly warmed up over ``warmup_steps`` steps (0: none). ema_decay: EMA of the
    weights, updated after every optimizer step. grad_clip: max global grad norm (None: no
    clipping). seed: the initial weights, the data order (with the epoch) and, without a
    generator, t and ε. checkpoint_every: epochs between checkpoints. log_every: steps between
    ``log_fn`` calls. max_steps: stop after this many optimizer steps in total (writing
    ``last.pt``). amp_bf16_on_cuda: bf16 autocast for the forward pass, on CUDA only.
    weights_dtype: dtype of ``model_state_dict`` in the files (None: float32).
    """

    epochs: int
    batch_size: int = 128
    lr: float = 2e-4
    ema_decay: float = 0.9999
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 10
    log_every: int = 100
    max_steps: int | None = None
    amp_bf16_on_cuda: bool = True
    weights_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), after the warm-up."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else self.lr

    def recipe(self, num_images: int) -> dict[str, Any]:
        """What a checkpoint's ``train_config`` records."""
        keys = ("epochs", "batch_size", "lr", "ema_decay", "grad_clip", "warmup_steps", "seed")
        return {**{k: v for k, v in asdict(self).items() if k in keys}, "num_images": num_images}


def check_images(images: torch.Tensor) -> None:
    """Training images must be [N, C, H, W], floating point, in [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"images must lie in [-1, 1], got range [{images.min():.3f}, {images.max():.3f}]")


class Training:
    """The state of one training run (networks, optimizer, noise stream, counters) and its steps."""

    def __init__(self, images: torch.Tensor, setting: str | Mapping[str, Any], settings: TrainSettings,
                 device: torch.device, generator: torch.Generator | None, checkpoint_dir: Path | None) -> None:
        self.images, self.settings, self.device, self.ckpt_dir = images, settings, device, checkpoint_dir
        # Seeded initialisation without touching the caller's global RNG: same seed, same run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net = build_unet(setting)
        # The network's own normalised config (lists, floats): what resume compares against.
        self.constructor = dict(net.config)
        N, C, H, W = images.shape
        if C != self.constructor["in_channels"] or H % net.downsample_factor or W % net.downsample_factor:
            raise ValueError(
                f"images of shape [C={C}, H={H}, W={W}] do not fit the UNet {self.constructor} "
                f"(H, W must be divisible by {net.downsample_factor})"
            )
        self.net = net.to(device)
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # The frozen time table has no gradient; Adam only sees trainable parameters.
        self.optimizer = torch.optim.Adam([p for p in self.net.parameters() if p.requires_grad], lr=settings.lr)
        self.noise_gen = torch.Generator(device=device)
        self.noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator))
                                   if generator is not None else settings.seed)
        self.abar = alphas_cumprod(int(self.constructor["T"])).to(device)  # float64 [T]
        self.steps_per_epoch = math.ceil(N / settings.batch_size)
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.last_loss = float("nan")
        self.window: list[float] = []
        self.checkpoints: list[Path] = []

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint ``path``: weights, optimizer, counters, noise stream."""
        state = read_checkpoint(path, map_location="cpu")
        name = setting_name_for(self.constructor)
        if dict(state.get("unet_config", {})) != self.constructor:
            raise CheckpointMismatchError(
                f"cannot resume from {path}: it was trained with {state.get('unet_config')}, "
                f"not {self.constructor}", setting=name,
            )
        for key, model in (("net_state_dict", self.net), ("model_state_dict", self.ema)):
            sd = {k: v.float() if v.is_floating_point() else v for k, v in state[key].items()}
            check_state_dict(model, sd, name, f"{path}[{key}]")
            model.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        saved_bs = state.get("train_config", {}).get("batch_size", self.settings.batch_size)
        if self.batch_in_epoch and saved_bs != self.settings.batch_size:
            # A mid-epoch position counts batches of the saved size; another size would skip
            # or repeat images of the interrupted epoch.
            raise ValueError(f"{path} stopped mid-epoch with batch_size={saved_bs}; resume with the same batch_size")
        if "noise_rng_state" in state:
            self.noise_gen.set_state(state["noise_rng_state"].cpu())

    def stopped(self) -> bool:
        """Whether ``max_steps`` optimizer steps were taken."""
        return self.settings.max_steps is not None and self.step >= self.settings.max_steps

    def train_epoch(self, log_fn: LogFn | None, progress: bool) -> list[float]:
        """The batches of the current epoch from ``batch_in_epoch`` on (or until ``max_steps``);
        returns their losses."""
        s = self.settings
        # Data order depends only on (seed, epoch): a resumed run replays the same permutation.
        perm = torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(s.seed * 100_003 + self.epoch))
        use_amp = s.amp_bf16_on_cuda and self.device.type == "cuda"
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
        self.net.train()
        losses: list[float] = []
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}",
                   leave=False, disable=not progress, dynamic_ncols=True)
        for b in range(self.batch_in_epoch, self.steps_per_epoch):
            if self.stopped():
                break
            x0 = self.images[perm[b * s.batch_size:(b + 1) * s.batch_size]].to(self.device, torch.float32,
                                                                                 non_blocking=True)
            for g in self.optimizer.param_groups:
                g["lr"] = s.lr_at(self.step)
            with autocast():
                loss = diffusion_loss(self.net, x0, self.abar, self.noise_gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
            self.optimizer.step()
            ema_update(self.ema, self.net, s.ema_decay)
            self.step += 1
            self.batch_in_epoch = b + 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {self.step} (epoch {self.epoch + 1})")
            self.window.append(value)
            losses.append(value)
            bar.update(1)
            if self.step % s.log_every == 0:
                self.last_loss = sum(self.window) / len(self.window)
                self.window.clear()
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
                if log_fn is not None:
                    log_fn({"train/loss": self.last_loss, "train/lr": s.lr_at(self.step - 1),
                            "train/epoch": self.epoch + b / self.steps_per_epoch}, self.step)
        bar.close()
        if self.window:
            self.last_loss = sum(self.window) / len(self.window)
            self.window.clear()
        return losses

    def save(self, kind: str, sample_fn: SampleFn | None) -> None:
        """Write ckpt_epoch_{epoch}.pt (kind="epoch") and/or last.pt, then run the sample hook."""
        if self.ckpt_dir is not None:
            extra = dict(
                net_state_dict={k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                optimizer_state_dict=self.optimizer.state_dict(), epoch=self.epoch, step=self.step,
                batch_in_epoch=self.batch_in_epoch, train_config=self.settings.recipe(self.images.shape[0]),
                noise_rng_state=self.noise_gen.get_state(), loss=self.last_loss,
            )
            last = self.ckpt_dir / LAST_CHECKPOINT
            weights_dtype = self.settings.weights_dtype
            if kind == "epoch":
                path = save_unet_checkpoint(self.ckpt_dir / f"ckpt_epoch_{self.epoch}.pt", self.ema,
                                            weights_dtype=weights_dtype, **extra)
                self.checkpoints.append(path)
                link_or_copy(path, last)  # last.pt is the same content
            else:
                save_unet_checkpoint(last, self.ema, weights_dtype=weights_dtype, **extra)
        if sample_fn is not None:
            sample_fn(self.ema, self.epoch, self.step)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` replaced atomically by a hard link to ``source`` (a copy where links fail)."""
    tmp = target.with_name(f".{target.name}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def train_unet(
    images: torch.Tensor,
    setting: str | Mapping[str, Any],
    settings: TrainSettings,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_fn: LogFn | None = None,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train an ε-predicting UNet on ``images`` [N, C, H, W] (float, in [-1, 1]) with ``settings``.

    Args:
        setting: a setting name (``"28px_1ch"``) or constructor kwargs for :class:`UNet`
            (e.g. a tiny ``dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=1, out_channels=1)``).
        generator: seeds t and ε instead of ``settings.seed`` (dropout uses torch's global RNG,
            not replayed on resume).
        checkpoint_dir: where to write checkpoints (every ``settings.checkpoint_every`` epochs).
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (else start fresh).
        log_fn: called as ``log_fn(metrics, step)`` every ``log_every`` steps and at epoch ends.
        sample_fn: hook called with (EMA model, epoch, step) after each checkpoint is written.
    """
    check_images(images)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run = Training(images, setting, settings, torch.device(device), generator, ckpt_dir)
    resumed_from = None
    if resume and (ckpt_dir / LAST_CHECKPOINT).exists():
        resumed_from = ckpt_dir / LAST_CHECKPOINT
        run.resume(resumed_from)
    step_at_start = run.step
    stopped = run.stopped()
    epoch_bar = tqdm(total=settings.epochs, initial=run.epoch, desc="epochs", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    while run.epoch < settings.epochs and not stopped:
        losses = run.train_epoch(log_fn, progress)
        stopped = run.batch_in_epoch < run.steps_per_epoch  # max_steps reached inside the epoch
        if stopped:
            break
        run.epoch += 1
        run.batch_in_epoch = 0
        epoch_bar.update(1)
        if log_fn is not None and losses:
            log_fn({"epoch/loss": sum(losses) / len(losses), "epoch/epoch": float(run.epoch),
                    "epoch/seconds": time.perf_counter() - t_start}, run.step)
        if run.epoch % settings.checkpoint_every == 0 or run.epoch == settings.epochs:
            run.ema.eval()
            run.save("epoch", sample_fn)
    epoch_bar.close()
    if stopped and run.step > step_at_start:
        run.save("last", sample_fn)
    run.ema.eval()
    return TrainResult(model=run.ema, net=run.net, epoch=run.epoch, step=run.step, last_loss=run.last_loss,
                       checkpoints=run.checkpoints, resumed_from=resumed_from)
