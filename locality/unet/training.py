"""Training the baseline UNet: ε-prediction MSE, Adam, EMA, resumable checkpoints.

A plain function of tensors and numbers: no Hydra, no MLflow (pass ``log_fn`` to log metrics
anywhere). Checkpoints in ``checkpoint_dir``:

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
from dataclasses import dataclass, field
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


def train_unet(
    images: torch.Tensor,
    setting: str | Mapping[str, Any],
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-4,
    ema_decay: float = 0.9999,
    grad_clip: float | None = 1.0,
    warmup_steps: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    generator: torch.Generator | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    log_fn: LogFn | None = None,
    log_every: int = 100,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
    amp_bf16_on_cuda: bool = True,
    max_steps: int | None = None,
    weights_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train an ε-predicting UNet on ``images`` [N, C, H, W] (float, in [-1, 1]).

    Args:
        setting: a setting name (``"28px_1ch"``) or constructor kwargs for :class:`UNet`
            (e.g. a tiny ``dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=1, out_channels=1)``).
        epochs: total epochs (a resumed run trains up to the same total).
        lr, warmup_steps: Adam learning rate, linearly warmed up over ``warmup_steps`` steps (0: none).
        ema_decay: EMA of the weights, updated after every optimizer step.
        grad_clip: max global grad norm (None: no clipping).
        seed / generator: the initial weights come from ``seed``, the data order from ``seed`` and
            the epoch; t and ε from a device generator seeded from ``generator`` (if given) or
            ``seed``. Dropout uses torch's global RNG (not replayed on resume).
        checkpoint_dir, checkpoint_every: where and how often (in epochs) to write checkpoints.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (else start fresh).
        log_fn: called as ``log_fn(metrics, step)`` every ``log_every`` steps and at epoch ends.
        sample_fn: hook called with (EMA model, epoch, step) after each checkpoint is written.
        amp_bf16_on_cuda: bf16 autocast for the forward pass, on CUDA only (CPU stays float32).
        max_steps: stop after this many optimizer steps in total (checkpoints ``last.pt``).
        weights_dtype: dtype of ``model_state_dict`` in the files (None: float32).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"images must lie in [-1, 1], got range [{images.min():.3f}, {images.max():.3f}]")
    if epochs < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    device = torch.device(device)
    # Seeded initialisation without touching the caller's global RNG: same seed, same run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_unet(setting)
    # The network's own normalised config (lists, floats): what resume compares against.
    constructor = dict(net.config)
    N, C, H, W = images.shape
    if C != constructor["in_channels"] or H % net.downsample_factor or W % net.downsample_factor:
        raise ValueError(
            f"images of shape [C={C}, H={H}, W={W}] do not fit the UNet {constructor} "
            f"(H, W must be divisible by {net.downsample_factor})"
        )
    net = net.to(device)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    # The frozen time table has no gradient; Adam only sees trainable parameters.
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else seed)
    train_config = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, ema_decay=ema_decay, grad_clip=grad_clip,
        warmup_steps=warmup_steps, seed=seed, num_images=N,
    )

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    epoch, step, batch_in_epoch, resumed_from = 0, 0, 0, None
    if resume and ckpt_dir is not None and (ckpt_dir / LAST_CHECKPOINT).exists():
        resumed_from = ckpt_dir / LAST_CHECKPOINT
        state = read_checkpoint(resumed_from, map_location="cpu")
        name = setting_name_for(constructor)
        if dict(state.get("unet_config", {})) != constructor:
            raise CheckpointMismatchError(
                f"cannot resume from {resumed_from}: it was trained with {state.get('unet_config')}, "
                f"not {constructor}", setting=name,
            )
        for key, model in (("net_state_dict", net), ("model_state_dict", ema)):
            sd = {k: v.float() if v.is_floating_point() else v for k, v in state[key].items()}
            check_state_dict(model, sd, name, f"{resumed_from}[{key}]")
            model.load_state_dict(sd)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        epoch, step = int(state["epoch"]), int(state["step"])
        batch_in_epoch = int(state.get("batch_in_epoch", 0))
        saved_bs = state.get("train_config", {}).get("batch_size", batch_size)
        if batch_in_epoch and saved_bs != batch_size:
            # A mid-epoch position counts batches of the saved size; another size would skip
            # or repeat images of the interrupted epoch.
            raise ValueError(
                f"{resumed_from} stopped mid-epoch with batch_size={saved_bs}; resume with the same batch_size"
            )
        if "noise_rng_state" in state:
            noise_gen.set_state(state["noise_rng_state"].cpu())

    abar = alphas_cumprod(int(constructor["T"])).to(device)  # float64 [T]
    use_amp = amp_bf16_on_cuda and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    steps_per_epoch = math.ceil(N / batch_size)
    checkpoints: list[Path] = []
    window: list[float] = []
    last_loss = float("nan")

    def save(kind: str) -> None:
        """Write ckpt_epoch_{epoch}.pt (kind="epoch") and/or last.pt, then run the sample hook."""
        if ckpt_dir is None:
            if sample_fn is not None:
                sample_fn(ema, epoch, step)
            return
        extra = dict(
            net_state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
            optimizer_state_dict=optimizer.state_dict(), epoch=epoch, step=step,
            batch_in_epoch=batch_in_epoch, train_config=train_config,
            noise_rng_state=noise_gen.get_state(), loss=last_loss,
        )
        last = ckpt_dir / LAST_CHECKPOINT
        if kind == "epoch":
            path = save_unet_checkpoint(ckpt_dir / f"ckpt_epoch_{epoch}.pt", ema, weights_dtype=weights_dtype, **extra)
            checkpoints.append(path)
            # last.pt is the same content: hard-link it (atomically) instead of writing it twice.
            tmp = ckpt_dir / f".{LAST_CHECKPOINT}.link"
            try:
                if tmp.exists():
                    tmp.unlink()
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, last)
        else:
            save_unet_checkpoint(last, ema, weights_dtype=weights_dtype, **extra)
        if sample_fn is not None:
            sample_fn(ema, epoch, step)

    def lr_at(s: int) -> float:
        return lr * min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else lr

    step_at_start = step
    stopped = max_steps is not None and step >= max_steps
    epoch_bar = tqdm(total=epochs, initial=epoch, desc="epochs", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    while epoch < epochs and not stopped:
        # Data order depends only on (seed, epoch): a resumed run replays the same permutation.
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        net.train()
        epoch_losses: list[float] = []
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}",
                   leave=False, disable=not progress, dynamic_ncols=True)
        for b in range(batch_in_epoch, steps_per_epoch):
            if max_steps is not None and step >= max_steps:
                stopped = True
                break
            x0 = images[perm[b * batch_size:(b + 1) * batch_size]].to(device, torch.float32, non_blocking=True)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            with autocast():
                loss = diffusion_loss(net, x0, abar, noise_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            ema_update(ema, net, ema_decay)
            step += 1
            batch_in_epoch = b + 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step} (epoch {epoch + 1})")
            window.append(value)
            epoch_losses.append(value)
            bar.update(1)
            if step % log_every == 0:
                last_loss = sum(window) / len(window)
                window.clear()
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if log_fn is not None:
                    log_fn({"train/loss": last_loss, "train/lr": lr_at(step - 1), "train/epoch": epoch + b / steps_per_epoch}, step)
        bar.close()
        if window:
            last_loss = sum(window) / len(window)
            window.clear()
        if stopped:
            break
        epoch += 1
        batch_in_epoch = 0
        epoch_bar.update(1)
        if log_fn is not None and epoch_losses:
            log_fn({"epoch/loss": sum(epoch_losses) / len(epoch_losses), "epoch/epoch": float(epoch),
                    "epoch/seconds": time.perf_counter() - t_start}, step)
        if epoch % checkpoint_every == 0 or epoch == epochs:
            ema.eval()
            save("epoch")
    epoch_bar.close()
    if stopped and step > step_at_start:
        save("last")
    ema.eval()
    return TrainResult(model=ema, net=net, epoch=epoch, step=step, last_loss=last_loss,
                       checkpoints=checkpoints, resumed_from=resumed_from)
