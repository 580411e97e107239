"""Training-step speed: float32, bfloat16 autocast and torch.compile side by side (issue 3).

Run from the repository root with the venv active, e.g.::

    python bench/train_step.py                                     # lalic-s, 64² and 128² crops
    python bench/train_step.py --variants fp32 bf16 --crops 128 --pause ~/.cache/lalic/train.pid

Every variant gets its own copy of the same randomly initialised network and its own optimisers,
and runs :func:`model.train.optimisation_step`, the step ``lalic train`` runs (variable-rate
loss, Adam, gradient clipping, auxiliary step) on random crops of the training images. The
variants take turns (``--rounds`` rounds of ``--steps`` steps each), so a change in machine load
affects all of them alike; the report gives the median seconds per step and the ratio to float32.
Warm-up steps are not timed; for ``compile`` the first warm-up step's time is the compile time
(torch.compile recompiles for each crop size). ``--pause`` SIGSTOPs a background job (pid file)
while timing, and always resumes it. The script runs itself again with glibc's allocator
thresholds and ``OMP_WAIT_POLICY=PASSIVE`` set, as training runs (BENCHMARKS.md, issue 3).

Results go to ``--out`` (default ``bench/results``): ``train-step.json`` and ``train-step.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec import Pauser, machine  # noqa: E402

from model.configs import get_config  # noqa: E402
from model.lalic import LALIC  # noqa: E402
from model.malloc import MALLOC_ENVIRONMENT  # noqa: E402
from model.paths import TRAIN_DATA_DIR  # noqa: E402
from model.train import CropSampler, find_images, make_optimisers, optimisation_step  # noqa: E402

VARIANTS = ("fp32", "bf16", "compile")


class Trainer:
    """One variant: a network copy, its optimisers and how its forward runs."""

    def __init__(self, variant: str, model: LALIC, lr: float) -> None:
        self.variant = variant
        self.model = copy.deepcopy(model).train()
        self.opt, self.aux_opt = make_optimisers(self.model, lr)
        self.net = torch.compile(self.model) if variant == "compile" else self.model
        self.bf16 = variant == "bf16"

    def step(self, x: torch.Tensor, quality: torch.Tensor, lam: torch.Tensor) -> float:
        """Seconds for one optimisation step."""
        start = time.perf_counter()
        optimisation_step(self.net, self.model, self.opt, self.aux_opt, x, quality, lam, bf16=self.bf16)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = LALIC(get_config(args.config))
    lambdas = torch.tensor(model.config.lambdas)
    sampler = CropSampler(find_images(args.data), max(args.crops), seed=0)
    trainers = [Trainer(v, model, args.lr) for v in args.variants]
    results: dict = {}
    pauser = Pauser(args.pause)
    with pauser.paused():
        for crop in args.crops:
            times = {t.variant: [] for t in trainers}
            warmup = {}
            failed = {}
            # the same warm-up batches for every variant (compile: the first step compiles)
            warm = [sampler.batch(args.batch_size, crop) for _ in range(args.warmup)]
            qi = torch.randint(0, len(lambdas), (args.batch_size,))
            for t in trainers:
                try:
                    warmup[t.variant] = [t.step(x, (qi + 1).float(), lambdas[qi]) for x in warm]
                except Exception as exc:
                    failed[t.variant] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            for _ in range(args.rounds):
                for t in trainers:
                    if t.variant in failed:
                        continue
                    for _ in range(args.steps):
                        x = sampler.batch(args.batch_size, crop)
                        qi = torch.randint(0, len(lambdas), (args.batch_size,))
                        times[t.variant].append(t.step(x, (qi + 1).float(), lambdas[qi]))
            results[str(crop)] = {
                v: {"error": failed[v]}
                if v in failed
                else {"median_s": statistics.median(ts), "times": ts, "warmup_s": warmup[v]}
                for v, ts in times.items()
            }
    return results


def report(results: dict, args: argparse.Namespace, info: dict) -> str:
    lines = [
        "# Training-step speed (`bench/train_step.py`)",
        "",
        f"- Date {info['date']}; {info['machine']['cpu']}, {info['machine']['cores']} cores, "
        f"{args.threads} torch threads; torch {info['machine']['versions']['torch']}.",
        f"- `{info['command']}`",
        f"- Config {args.config}, batch {args.batch_size}, {args.rounds} rounds × {args.steps} steps per "
        f"variant (variants take turns), {args.warmup} warm-up steps not timed.",
        "",
        "| crop | variant | median s/step | ratio to fp32 (lower is faster) | first warm-up step s |",
        "|---|---|---|---|---|",
    ]
    for crop, per_variant in results.items():
        base = per_variant.get("fp32", {}).get("median_s")
        for variant, r in per_variant.items():
            if "error" in r:
                lines.append(f"| {crop}² | {variant} | failed: {r['error']} | | |")
                continue
            ratio = f"{r['median_s'] / base:.2f}" if base else "n/a"
            lines.append(f"| {crop}² | {variant} | {r['median_s']:.3f} | {ratio} | {r['warmup_s'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="lalic-s", help="named configuration")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--crops", nargs="+", type=int, default=[64, 128], help="crop sizes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and crop")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--data", type=Path, nargs="+", default=[TRAIN_DATA_DIR], help="image folder(s)")
    p.add_argument("--pause", help="pid file of a background job to SIGSTOP while timing")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if argv is None and any(
        os.environ.get(k) != v for k, v in {**MALLOC_ENVIRONMENT, "OMP_WAIT_POLICY": "PASSIVE"}.items()
    ):
        # glibc and libgomp read these at start-up: run again with them, as `lalic train` is run
        env = {**os.environ, **MALLOC_ENVIRONMENT, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-step.json").write_text(json.dumps({**info, "results": results}, indent=1) + "\n")
    text = report(results, args, info)
    (args.out / "train-step.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
