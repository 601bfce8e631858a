"""Sample quality on a 16-D Gaussian mixture, where the true distribution and the exact teacher are known.

    python bench/gmm.py                       # about 15 minutes on 2 CPU cores
    python bench/gmm.py --teacher-steps 500 --student-steps 300   # a smoke run

1. A teacher network is trained on samples with the TrigFlow diffusion loss (EMA kept).
2. From its EMA weights (App. G.2) three students are trained: sCD from the trained teacher,
   sCD from the exact analytic teacher, and sCT from samples.
3. Each is scored by the sliced Wasserstein distance (SWD) to fresh mixture samples: students at
   1 and 2 steps; the trained teacher with Heun at 2, 8 and 32 steps; the exact PF-ODE (Heun,
   128 steps, on the exact F); and a second draw of data, the floor set by the sample size.
Target (issue 2): 2-step sCD from the trained teacher within 1.1x of the teacher's 32-step SWD.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm import trange

from scm_mm import DiffusionLoss, GaussianMixture, SCMLoss, TrigFlowPrecond, sample
from scm_mm.metrics import sliced_wasserstein
from scm_mm.nn.mlp import MLP
from scm_mm.train import PowerEMA, optimizer_step


def make_mixture(dim: int, components: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = 0.2 + 0.2 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds)


def make_model(gm: GaussianMixture) -> TrigFlowPrecond:
    # c_noise = 10 t: see examples/toy_2d.py for why a small MLP prefers low time frequencies.
    return TrigFlowPrecond(MLP(gm.dim, hidden=256, depth=4), sigma_d=gm.sigma_d, time_scale=10.0)


def train(
    gm: GaussianMixture,
    model: TrigFlowPrecond,
    loss_fn: DiffusionLoss | SCMLoss,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
    teacher: torch.nn.Module | None = None,  # sCD only
) -> torch.nn.Module:
    """A plain loop: sample a batch, loss, guarded step, power EMA (sigma_rel 0.05). Returns the EMA."""
    torch.manual_seed(seed)
    opt = torch.optim.RAdam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    ema = PowerEMA(model, sigma_rels=(0.05,))
    data = torch.Generator().manual_seed(seed)
    skipped = 0
    for step in trange(steps, desc=desc, mininterval=2.0):
        x0 = gm.sample(batch, data).float()
        extra = {} if isinstance(loss_fn, DiffusionLoss) else {"teacher": teacher, "step": step}
        loss, _ = loss_fn(model, x0, generator=data, **extra)
        skipped += not optimizer_step(loss, opt, model.parameters(), max_grad_norm=10.0)
        ema.update(model, seen=(step + 1) * batch, batch=batch)
    if skipped:
        print(f"{desc}: skipped {skipped} non-finite steps")
    return ema.averages[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--student-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--student-lr", type=float, default=1e-4)  # the paper's CIFAR-10 value (T4)
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()

    gm = make_mixture(args.dim, args.components, args.seed)
    print(f"mixture: {args.components} components in {args.dim}-D, sigma_d = {gm.sigma_d:.3f}")
    teacher = train(
        gm, make_model(gm), DiffusionLoss(sigma_d=gm.sigma_d), steps=args.teacher_steps, batch=args.batch,
        lr=args.teacher_lr, seed=args.seed + 1, desc="teacher",
    )
    scm = SCMLoss(sigma_d=gm.sigma_d, P_mean=-1.0, P_std=1.4, warmup_iters=args.student_steps // 4)
    kw = dict(steps=args.student_steps, batch=args.batch, lr=args.student_lr)

    def init() -> TrigFlowPrecond:  # a trainable copy of the teacher's EMA weights
        return copy.deepcopy(teacher).train().requires_grad_(True)

    students = {
        "sCD (trained teacher)": train(gm, init(), scm, teacher=teacher, seed=2, desc="sCD", **kw),
        "sCD (exact teacher)": train(gm, init(), scm, teacher=gm, seed=3, desc="sCD exact", **kw),
        "sCT": train(gm, init(), scm, seed=4, desc="sCT", **kw),
    }

    n = args.eval_samples
    reference = gm.sample(n, torch.Generator().manual_seed(1000)).float()

    def swd(x: torch.Tensor) -> float:
        return sliced_wasserstein(x.float(), reference, projections=1024, generator=torch.Generator().manual_seed(0))

    shape = (n, gm.dim)
    exact = sample(gm, shape, method="heun", steps=128, seed=5, dtype=torch.float64)
    rows = [
        ("data (second draw): the floor", "-", swd(gm.sample(n, torch.Generator().manual_seed(1001)))),
        ("exact PF-ODE, Heun 128 steps", 255, swd(exact)),
    ]
    for steps in (2, 8, 32):
        x = sample(teacher, shape, method="heun", steps=steps, seed=5)
        rows.append((f"trained teacher, Heun {steps} steps", 2 * steps - 1, swd(x)))
    for name, student in students.items():
        for steps in (1, 2):
            x = sample(student, shape, steps=steps, seed=5)
            rows.append((f"{name}, {steps} step{'s' if steps > 1 else ''}", steps, swd(x)))

    print("\n| sampler | NFE | SWD |\n|---|---|---|")
    for name, nfe, value in rows:
        print(f"| {name} | {nfe} | {value:.4f} |")
    table = {name: value for name, _, value in rows}
    ratio = table["sCD (trained teacher), 2 steps"] / table["trained teacher, Heun 32 steps"]
    print(f"\n2-step sCD / 32-step teacher SWD: {ratio:.3f} (target <= 1.1); total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
