"""``lalic train``: rate-distortion training of LALIC on folders of images.

Loss (paper Sec. 4.1): ``lambda * 255^2 * MSE + bpp`` per sample (MS-SSIM variant:
``lambda * (1 - MS-SSIM) + bpp``). For the variable-rate model each sample draws one of the six
quality levels and its lambda. Adam for the network, a separate Adam for the factorised prior's
quantiles (auxiliary loss), gradient clipping, checkpoints with optimiser and RNG state, and
optionally an exponential moving average of the weights (``--ema``), which is then what the run
delivers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.configs import LalicConfig, get_config
from model.lalic import LALIC
from model.paths import KODAK_DIR, TRAIN_DATA_DIR
from model.zoo import read_weights, save_weights

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm"}
DEFAULT_RUNS = Path.home() / ".cache" / "lalic" / "runs"
AUX_LR = 1e-3  # Adam learning rate for the factorised prior's quantiles (aux loss)


def find_images(folders: list[Path]) -> list[Path]:
    paths = sorted(p for f in folders for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images found under {[str(f) for f in folders]}")
    return paths


Crop = int | tuple[int, int]
"""A crop size: ``n`` (n x n) or (height, width)."""


def crop_shape(crop: Crop) -> tuple[int, int]:
    """(height, width) of a crop size."""
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def parse_crop(text: str) -> tuple[int, int]:
    """argparse type of ``--crop``: ``N`` (square) or ``WxH`` (e.g. ``768x512``, Kodak's shape)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16 or any(v % 16 for v in parts):
        raise argparse.ArgumentTypeError(
            f"expected N or WxH, multiples of 16 (e.g. 256, 768x512), got {text!r}"
        )
    width, height = parts
    return height, width


def _fit_scale(h: int, w: int, ch: int, cw: int) -> float:
    """Smallest upscale after which an h x w image holds a ch x cw crop upright or turned 90 degrees."""
    return max(1.0, min(max(ch / h, cw / w), max(cw / h, ch / w)))


class CropSampler:
    """Random crops with random flips from images held in memory (uint8 HWC).

    A crop is ``crop`` (square) or (height, width). An image too small for a crop either way up is
    upscaled (bicubic) just enough at load time; a portrait image that only holds a landscape crop
    turned 90 degrees gives that crop rotated back, so every crop of a batch has one shape.
    """

    def __init__(self, paths: list[Path], crop: Crop, seed: int) -> None:
        ch, cw = crop_shape(crop)
        self.images = []
        for p in tqdm(paths, desc="loading images", leave=False):
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
            s = _fit_scale(*arr.shape[:2], ch, cw)
            if s > 1:
                size = (math.ceil(arr.shape[1] * s), math.ceil(arr.shape[0] * s))
                arr = np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))
            self.images.append(arr)
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, crop: Crop | None = None) -> torch.Tensor:
        ch, cw = crop_shape(crop or self.crop)
        out = np.empty((size, ch, cw, 3), dtype=np.uint8)
        for i in range(size):
            img = self.images[self.rng.integers(len(self.images))]
            h, w = img.shape[:2]
            turned = (h < ch or w < cw) and h >= cw and w >= ch
            ph, pw = (cw, ch) if turned else (ch, cw)
            if h < ph or w < pw:
                img = np.asarray(Image.fromarray(img).resize((max(w, pw), max(h, ph)), Image.BICUBIC))
                h, w = img.shape[:2]
            y, x = self.rng.integers(h - ph + 1), self.rng.integers(w - pw + 1)
            patch = img[y : y + ph, x : x + pw]
            if turned:
                patch = np.rot90(patch)
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch[::-1]
            out[i] = patch
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def rate_distortion(out: dict, x: torch.Tensor, lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch loss terms: mean over samples of lambda_i * 255^2 * MSE_i + bpp_i."""
    b, _, h, w = x.shape
    pixels = h * w
    bpp = sum(-torch.log2(lik).flatten(1).sum(1) for lik in out["likelihoods"].values()) / pixels
    mse = (out["x_hat"].float().clamp(0, 1) - x).square().flatten(1).mean(1)
    mse_train = (out["x_hat"].float() - x).square().flatten(1).mean(1)
    loss = (lambdas * 255.0**2 * mse_train + bpp).mean()
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()
    return {"loss": loss, "bpp": bpp.mean(), "mse": mse.mean(), "psnr": psnr}


def make_optimisers(
    model: LALIC, lr: float, aux_lr: float = AUX_LR
) -> tuple[torch.optim.Adam, torch.optim.Adam | None]:
    """Adam for the network and a separate Adam for the factorised prior's ``quantiles`` (aux loss).

    Frozen parameters (``requires_grad`` off, see :func:`freeze`) are left out; with the quantiles
    frozen too (``--freeze entropy_bottleneck``) there is no auxiliary optimiser (``None``)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [p for n, p in trainable if not n.endswith("quantiles")]
    aux = [p for n, p in trainable if n.endswith("quantiles")]
    return torch.optim.Adam(main, lr=lr), (torch.optim.Adam(aux, lr=aux_lr) if aux else None)


def freeze(model: LALIC, prefixes: list[str]) -> list[str]:
    """Turn off the gradients of every parameter whose name starts with one of ``prefixes``
    (e.g. ``g_a log_gain``: the encoder side, as in the hard phase of "Soft then Hard").

    Returns the names frozen; a prefix that matches nothing is an error.
    """
    params = dict(model.named_parameters())
    names = []
    for prefix in prefixes:
        matched = [n for n in params if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise SystemExit(f"--freeze {prefix}: no parameter of the model is named so")
        names += matched
    for n in names:
        params[n].requires_grad_(False)
    return names


def optimisation_step(
    net: torch.nn.Module,
    model: LALIC,
    opt: torch.optim.Optimizer,
    aux_opt: torch.optim.Optimizer | None,
    x: torch.Tensor,
    quality: torch.Tensor,
    lam: torch.Tensor,
    clip: float = 1.0,
    bf16: bool = False,
    metric: str = "mse",
    noise: bool = True,
) -> dict[str, torch.Tensor]:
    """One Adam step on the rate-distortion loss and one on the prior's auxiliary loss (only
    measured when ``aux_opt`` is ``None``: the quantiles are frozen).

    ``net`` is ``model`` or its ``torch.compile`` wrapper; ``noise=False`` takes the rate of the
    rounded latents (:meth:`LALIC.forward`). Returns the detached loss terms plus ``aux``
    (auxiliary loss) and ``grad`` (gradient norm before clipping).
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net(x, quality, noise=noise)
    terms = rate_distortion(out, x, lam)
    if metric == "ms-ssim":
        from model.metrics import ms_ssim_torch

        ssim = ms_ssim_torch(out["x_hat"].float().clamp(0, 1), x)
        terms["loss"] = (lam * (1 - ssim) + terms["bpp"]).mean()
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    main_params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(main_params, clip)
    opt.step()
    if aux_opt is None:
        with torch.no_grad():
            aux = model.aux_loss()
    else:
        aux_opt.zero_grad(set_to_none=True)
        aux = model.aux_loss()
        aux.backward()
        aux_opt.step()
    return {k: v.detach() for k, v in terms.items()} | {"aux": aux.detach(), "grad": grad_norm.detach()}


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up, constant, then a drop to lr/10 for the last ``drop_fraction`` of the run.

    The run is ``steps`` steps, or ``max_minutes`` minutes when that comes first (0: no clock),
    so a run stopped by the clock still ends on the drop.
    """

    lr: float
    warmup: int
    steps: int
    drop_fraction: float
    max_minutes: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LrSchedule:
        return cls(args.lr, args.warmup, args.steps, args.drop_fraction, args.max_minutes)

    def at(self, step: int, minutes: float = 0.0) -> float:
        """The learning rate of ``step``, ``minutes`` into the run."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = step / self.steps
        if self.max_minutes:
            progress = max(progress, minutes / self.max_minutes)
        if progress >= 1 - self.drop_fraction:
            return self.lr * 0.1
        return self.lr


def make_ema(model: LALIC, decay: float) -> AveragedModel:
    """Exponential moving average of the network's parameters, ``p_ema <- decay * p_ema + (1 - decay) * p``
    after every optimiser step (Polyak averaging; the first update copies the parameters). Buffers
    are not averaged: they are read from the trained network when the average is delivered."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def ema_state_dict(ema: AveragedModel, model: LALIC) -> dict[str, torch.Tensor]:
    """The average in the network's own state-dict layout: averaged parameters, current buffers."""
    averaged = dict(ema.module.named_parameters())
    return {k: (averaged[k].detach() if k in averaged else v) for k, v in model.state_dict().items()}


def _state(model, opt, aux_opt, step, sampler, ema=None) -> dict:
    return {
        "step": step,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "ema": None if ema is None else ema_state_dict(ema, model),
        "ema_updates": None if ema is None else int(ema.n_averaged),
        "optimizer": opt.state_dict(),
        "aux_optimizer": None if aux_opt is None else aux_opt.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": sampler.rng.bit_generator.state,
            "python": random.getstate(),
        },
    }


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@torch.no_grad()
def quick_eval(model: LALIC, images: list[np.ndarray], qualities: list[float]) -> dict:
    """Likelihood-estimated bpp and PSNR on a few images (the real-bitstream eval is ``lalic eval``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    for q in qualities:
        bpps, psnrs = [], []
        for img in images:
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(device)
            out = model(x, torch.tensor([q], device=device))
            m = rate_distortion(out, x, torch.tensor([0.0], device=device))
            bpps.append(float(m["bpp"]))
            psnrs.append(float(m["psnr"]))
        results[f"q{q:g}"] = {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))}
    model.train(was_training)
    return results


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+", default=[TRAIN_DATA_DIR], help="image folder(s)")
    p.add_argument("--config", default="lalic-s", help="named configuration (lalic-s, lalic)")
    p.add_argument("--run", default="lalic-s", help="run name; checkpoints in --runs-dir/RUN")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--resume", action="store_true", help="continue from RUN's last checkpoint")
    p.add_argument("--init", type=Path, help="start from these weights (checkpoint or weight file)")
    p.add_argument("--steps", type=int, default=100_000, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--crop",
        type=parse_crop,
        default=(128, 128),
        metavar="N|WxH",
        help="random crop: N (square, e.g. 128, 256, 512) or WxH (e.g. 768x512; portrait photos "
        "give it turned) (default 128)",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aux-lr", type=float, default=AUX_LR)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--drop-fraction",
        type=float,
        default=0.1,
        help="final fraction of the steps (or of --max-minutes) at lr/10",
    )
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--quality", type=float, help="train one quality only (fixed-rate models)")
    p.add_argument("--lmbda", type=float, help="lambda for a fixed-rate model")
    p.add_argument("--metric", choices=["mse", "ms-ssim"], default="mse")
    p.add_argument(
        "--rate",
        choices=["noise", "rounded"],
        default="noise",
        help="rate term: likelihoods of the latents plus uniform noise (default), or of the rounded "
        "latents the range coder codes, with straight-through gradients (for fine-tuning)",
    )
    p.add_argument(
        "--freeze",
        nargs="+",
        default=[],
        metavar="NAME",
        help="keep these parameters (names or module prefixes, e.g. g_a log_gain) fixed; "
        "entropy_bottleneck includes the prior's quantiles, whose auxiliary loss is then only logged",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999; 0 = off): "
        "quick evals report both, and checkpoints and --export deliver the average",
    )
    p.add_argument(
        "--export",
        type=Path,
        metavar="PATH",
        help="at the end, also write a float16 weight file of the delivered weights (for --init or "
        "python -m model.publish; about 14 MB for lalic-s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (BiWKV stays float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument(
        "--eval-every", type=int, default=1000, help="steps between quick Kodak evals (0 = only at the end)"
    )
    p.add_argument("--eval-images", type=int, default=2)
    p.add_argument("--kodak", type=Path, default=KODAK_DIR)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0,
        help="stop (with a checkpoint) after this long; the lr drop then starts at whichever of its "
        "step or its minute comes first",
    )
    p.add_argument("--log-every", type=int, default=20, help="steps between JSONL log records")


@dataclass
class TrainingRun:
    """Everything one ``lalic train`` run carries from step to step (and into its checkpoints)."""

    model: LALIC
    net: torch.nn.Module  # the model, or its torch.compile wrapper
    opt: torch.optim.Optimizer
    aux_opt: torch.optim.Optimizer | None
    sampler: CropSampler
    ema: AveragedModel | None
    step: int
    checkpoint_path: Path

    def state(self) -> dict:
        return _state(self.model, self.opt, self.aux_opt, self.step, self.sampler, self.ema)


def start_run(args: argparse.Namespace, device: torch.device) -> TrainingRun:
    """The network, optimisers, crop sampler and moving average of a run: new (from ``--config``,
    or ``--init`` weights), or as its last checkpoint left them (``--resume``)."""
    checkpoint_path = args.runs_dir / args.run / "checkpoint.pt"
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False) if args.resume else None
    config = get_config(args.config) if state is None else LalicConfig.from_dict(state["config"])
    model = LALIC(config).to(device).train()
    if args.init is not None and state is None:
        _, init_state = read_weights(args.init)  # a training checkpoint or a (float16) weight file
        model.load_state_dict(init_state)
    if args.freeze:
        frozen = freeze(model, args.freeze)
        tqdm.write(f"frozen: {len(frozen)} parameter tensors ({', '.join(args.freeze)})")
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit(f"--freeze {' '.join(args.freeze)}: no parameter is left to train")
    opt, aux_opt = make_optimisers(model, args.lr, args.aux_lr)
    sampler = CropSampler(find_images(args.data), args.crop, args.seed)
    ema = None
    if args.ema:
        if not 0 < args.ema < 1:
            raise SystemExit(f"--ema {args.ema}: the decay must lie between 0 and 1")
        ema = make_ema(model, args.ema)
    run = TrainingRun(model, model, opt, aux_opt, sampler, ema, 0, checkpoint_path)
    if state is not None:
        _restore(run, state)
    if args.compile:
        run.net = torch.compile(model)
    return run


def _restore(run: TrainingRun, state: dict) -> None:
    """Weights, optimiser states, step, random generators and moving average from a checkpoint."""
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.aux_opt is not None:
        run.aux_opt.load_state_dict(state["aux_optimizer"])
    run.step = state["step"]
    torch.set_rng_state(state["rng"]["torch"])
    run.sampler.rng.bit_generator.state = state["rng"]["numpy"]
    random.setstate(state["rng"]["python"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.module.load_state_dict(state["ema"])
        run.ema.n_averaged.fill_(state["ema_updates"])


def sample_qualities(
    config: LalicConfig, batch: int, quality: float | None, lmbda: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(quality, lambda) per sample: a random level of the variable-rate model each, or one fixed
    quality (``--quality``, default the highest) with its lambda (``--lmbda`` overrides it)."""
    lambdas = torch.tensor(config.lambdas)
    if config.variable_rate and quality is None:
        levels = torch.randint(0, len(lambdas), (batch,))
        return (levels + 1).float(), lambdas[levels]
    q = quality or float(len(lambdas))
    return torch.full((batch,), q), torch.full((batch,), lmbda or lambdas[int(q) - 1].item())


def load_eval_images(kodak: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` Kodak images, cropped to 512x512, for the quick evaluation."""
    if not count or not kodak.is_dir():
        return []
    images = []
    for path in sorted(kodak.glob("*.png"))[:count]:
        with Image.open(path) as im:
            images.append(np.array(im.convert("RGB"))[:512, :512])
    return images


def evaluate_run(run: TrainingRun, images: list[np.ndarray]) -> dict:
    """The quick evaluation of the network (and of its moving average) at qualities 1, 3 and 6."""
    qualities = [1.0, 3.0, 6.0] if run.model.config.variable_rate else [6.0]
    record = {"step": run.step, "eval": quick_eval(run.model, images, qualities)}
    if run.ema is not None:
        record["eval_ema"] = quick_eval(run.ema.module, images, qualities)
    return record


def deliver_weights(run: TrainingRun, path: Path) -> None:
    """Write a float16 weight file of what the run delivers: the moving average, else the last step."""
    if run.ema is not None:
        run.model.load_state_dict(ema_state_dict(run.ema, run.model))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(run.model, path)
    print(f"weights: {path} ({'moving average' if run.ema is not None else 'last step'})")


def run_train(args: argparse.Namespace) -> int:
    """``lalic train``: optimise until ``--steps`` or ``--max-minutes``, with logs, quick evals and
    checkpoints along the way (see :func:`add_train_arguments`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: pick the fastest convolutions once
    run = start_run(args, device)
    schedule = LrSchedule.from_args(args)
    eval_images = load_eval_images(args.kodak, args.eval_images)
    run.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    last_checkpoint = started = time.monotonic()
    bar = tqdm(total=args.steps, initial=run.step, desc="train", dynamic_ncols=True)
    with (run.checkpoint_path.parent / "log.jsonl").open("a") as log:
        while run.step < args.steps:
            lr = schedule.at(run.step, (time.monotonic() - started) / 60)
            for group in run.opt.param_groups:
                group["lr"] = lr
            x = run.sampler.batch(args.batch_size).to(device)
            quality, lam = sample_qualities(run.model.config, x.shape[0], args.quality, args.lmbda)
            terms = optimisation_step(
                run.net, run.model, run.opt, run.aux_opt, x, quality.to(device), lam.to(device),
                clip=args.clip, bf16=args.bf16, metric=args.metric, noise=args.rate == "noise",
            )  # fmt: skip
            run.step += 1
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            record = {k: round(float(v), 5) for k, v in terms.items() if k not in ("aux", "grad")}
            record.update(
                step=run.step, aux=round(float(terms["aux"]), 3), grad=round(float(terms["grad"]), 3)
            )
            bar.update(1)
            bar.set_postfix(loss=record["loss"], bpp=record["bpp"], psnr=record["psnr"])
            if run.step % args.log_every == 0:
                _log(log, {**record, "lr": lr})
            eval_due = run.step == args.steps or (args.eval_every > 0 and run.step % args.eval_every == 0)
            if eval_images and eval_due:
                evaluation = evaluate_run(run, eval_images)
                _log(log, evaluation)
                tqdm.write(f"step {run.step} kodak (estimated): {evaluation}")
            out_of_time = args.max_minutes and time.monotonic() - started > args.max_minutes * 60
            if time.monotonic() - last_checkpoint > args.checkpoint_minutes * 60 or out_of_time:
                save_checkpoint(run.checkpoint_path, run.state())
                last_checkpoint = time.monotonic()
            if out_of_time:
                break
    bar.close()
    save_checkpoint(run.checkpoint_path, run.state())
    print(f"checkpoint: {run.checkpoint_path} (step {run.step})")
    if args.export is not None:
        deliver_weights(run, args.export)
    return 0


def _step_record(terms: dict[str, torch.Tensor], step: int) -> dict:
    """The logged numbers of one optimiser step (loss terms to 5 decimals, aux and grad to 3)."""
    record = {k: round(float(v), 5) for k, v in terms.items() if k not in ("aux", "grad")}
    aux, grad = round(float(terms["aux"]), 3), round(float(terms["grad"]), 3)
    return record | {"step": step, "aux": aux, "grad": grad}


def _log(log: TextIO, record: dict) -> None:
    """One JSON line with the wall-clock time, flushed (so a killed run keeps its log)."""
    log.write(json.dumps({**record, "time": time.time()}) + "\n")
    log.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lalic train", description=__doc__)
    add_train_arguments(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
