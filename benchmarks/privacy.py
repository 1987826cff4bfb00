"""What a client's update reveals, measured: gradient inversion by a curious server,
membership inference on the final model, and what DP costs in accuracy.

1. Reconstruction (Geiping et al. 2020, "Inverting Gradients"): one FMNIST client holding
   4 images trains mlp (no BatchNorm) or cnn4 (BatchNorm) from the global model (1 local
   step, then 4 steps on the same batch); the server decodes its real packet and optimises
   dummy images so that the same local training on them (unrolled, differentiable) gives an
   update of the closest direction (cosine distance) to the decoded one, with a
   total-variation prior. The attacker knows the model, the labels, lr and the number of
   steps (Geiping et al.'s setting). PSNR and SSIM (torchmetrics) of each reconstruction
   against its best-matching real image, for the uplinks none, fedbat, signsgd, topk and
   none under client-side DP noise; a picture grid.
2. Membership inference: a loss-threshold attack on each short run's final global model
   (members: training samples of clients that were sampled; non-members: test samples),
   AUC by torchmetrics (0.5: no better than chance).
3. The price: final accuracy and epsilon of none and fedbat under central DP at a few noise
   multipliers, beside their non-private runs (parts 2-3: mlp, 100 clients, 10 a round; with
   cnn4, DP's noise on BatchNorm's running statistics breaks evaluation: docs/results.md).

    python benchmarks/privacy.py --out benchmarks/out/privacy
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import _isolate  # noqa: F401
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torchmetrics.classification import BinaryAUROC
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

import fedbat.compressors as C
from fedbat import checkpoint
from fedbat.assembly import build_components, build_fabric
from fedbat.client import ClientJob, train_client
from fedbat.compose import compose
from fedbat.compressors.update import SharedSeed
from fedbat.lifecycle import run
from fedbat.seeding import sample_clients

FMNIST = ["data=fmnist", "progress=false", "trainer.threads=2"]
ATTACKED = {  # name: overrides of the client's run
    "none": ["compressor=none"],
    "fedbat": ["compressor=fedbat"],
    "signsgd": ["compressor=signsgd"],
    "topk": ["compressor=topk"],
    "none + DP (client, z=1)": [
        "compressor=none",
        "privacy=dp",
        "privacy.mode=client",
        "privacy.clip=1.0",
        "privacy.noise_multiplier=1.0",
    ],
}


def client_update(
    model: str, overrides: list[str], steps: int
) -> tuple[dict, dict, torch.Tensor, object]:
    """(held weights, the decoded update, the client's images and labels, components) of
    client 0 of a population with 4 images each, after ``steps`` local steps."""
    cfg = compose(
        [f"model={model}",
            *FMNIST,
            "data.num_clients=15000",
            "fed.batch_size=4",
            "fed.lr=0.1",
            f"fed.local_epochs={steps}",
            "fed.clients_per_round=10",
            "compressor.downlink=none",
            *overrides,
        ]
    )  # fmt: skip
    parts = build_components(cfg, build_fabric(cfg))
    held = {k: v.clone() for k, v in parts.task.state_dict().items()}
    res = train_client(parts.setup, ClientJob(client=0, round=0, held=held))
    shared = SharedSeed(cfg.seed, 0, 0)
    update, _ = C.decode_update(res.data, parts.plan, parts.uplink, shared=shared)
    idx = parts.data.client_indices[0]
    real = (parts.data.data.x_train[idx], parts.data.data.y_train[idx])
    return held, update, real, parts


def simulate(task, held: dict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> dict:
    """The update local SGD on (x, y) gives, differentiable in x (BatchNorm in train mode)."""
    params = {n: held[n].clone().requires_grad_(True) for n, _ in task.named_parameters()}
    buffers = {n: held[n].clone() for n, _ in task.named_buffers()}
    start = params
    for _ in range(steps):
        out = torch.func.functional_call(task, (params, buffers), (x,))
        grads = torch.autograd.grad(
            F.cross_entropy(out, y), list(params.values()), create_graph=True
        )
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return {n: params[n] - start[n].detach() for n in params}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()


def invert(
    parts, held: dict, update: dict, y: torch.Tensor, steps: int, iters: int
) -> torch.Tensor:
    task = parts.task.cpu().train()
    names = [n for n, _ in task.named_parameters()]
    target = torch.cat([update[n].reshape(-1) for n in names])
    pixels = parts.data.data.x_train
    lo, hi = float(pixels.min()), float(pixels.max())  # the format's range: public
    torch.manual_seed(0)
    x = torch.randn(len(y), 1, 28, 28).clamp(lo, hi).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [iters * 3 // 8, iters * 5 // 8, iters * 7 // 8], 0.1
    )
    for _ in range(iters):
        opt.zero_grad()
        sim = simulate(task, held, x, y, steps, 0.1)
        guess = torch.cat([sim[n].reshape(-1) for n in names])
        loss = 1 - F.cosine_similarity(guess, target, dim=0) + 1e-2 * total_variation(x)
        loss.backward()
        x.grad.sign_()  # signed gradients, as Geiping et al.
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)  # projected onto valid images, as Geiping et al.
    return x.detach()


def scores(real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float, list[int]]:
    """Mean PSNR and SSIM over the images, at the pairing of fakes to reals that maximises
    PSNR (the attack recovers a set, not an order)."""
    rng = float(real.max() - real.min())
    psnr = PeakSignalNoiseRatio(data_range=rng)
    ssim = StructuralSimilarityIndexMeasure(data_range=rng)
    best = max(
        itertools.permutations(range(len(real))),
        key=lambda p: sum(float(psnr(fake[j : j + 1], real[i : i + 1])) for i, j in enumerate(p)),
    )
    f = fake[list(best)]
    return (
        sum(float(psnr(f[i : i + 1], real[i : i + 1])) for i in range(len(real))) / len(real),
        float(ssim(f, real)),
        list(best),
    )


def reconstruction(out: Path, iters: int) -> list[str]:
    lines = ["| model | uplink | local steps | PSNR (dB) | SSIM |", "|---|---|---|---|---|"]
    grid = []
    for model, steps in itertools.product(("mlp", "cnn4"), (1, 4)):
        for name, overrides in ATTACKED.items():
            held, update, (x, y), parts = client_update(model, overrides, steps)
            fake = invert(parts, held, update, y, steps, iters)
            psnr, ssim, order = scores(x, fake)
            lines.append(f"| {model} | {name} | {steps} | {psnr:.2f} | {ssim:.3f} |")
            print(lines[-1], flush=True)
            grid.append((f"{model}, {name}, {steps} step{'s' * (steps > 1)}", fake[order]))
    grid.insert(0, ("real", x))
    fig, axes = plt.subplots(len(grid), 4, figsize=(4 * 1.2, len(grid) * 1.25))
    for row, (label, images) in zip(axes, grid, strict=True):
        for ax, img in zip(row, images, strict=True):
            ax.imshow(img[0].numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(label, rotation=0, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reconstruction.png", dpi=100)
    return lines


def trained(out: Path, name: str, overrides: list[str], rounds: int) -> tuple[dict, Path]:
    run_dir = out / "runs_mlp" / name.replace(" ", "_").replace(",", "").replace("=", "")
    cfg = compose(
        [
            *FMNIST,
            "model=mlp",
            "data.num_clients=100",
            "fed.clients_per_round=10",
            "fed.batch_size=64",
            "fed.lr=0.1",
            "fed.local_epochs=2",
            f"fed.rounds={rounds}",
            "compressor.downlink=none",
            *overrides,
        ]
    )  # fmt: skip
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return run(cfg), run_dir


def membership_auc(run_dir: Path, overrides: list[str], n: int = 3000) -> float:
    cfg = compose(
        [*FMNIST, "model=mlp", "data.num_clients=100", "fed.clients_per_round=10", *overrides]
    )
    parts = build_components(cfg, build_fabric(cfg))
    state = checkpoint.load(run_dir / "checkpoint.pt")
    parts.task.load_state_dict(state["server"]["global"])
    task = parts.task.cpu().eval()
    rounds = range(state["round"])
    sampled = sorted({c for r in rounds for c in sample_clients(cfg.seed, r, 100, 10)})
    data = parts.data.data
    members = torch.cat([parts.data.client_indices[c] for c in sampled])[:n]
    with torch.no_grad():
        loss_in = F.cross_entropy(
            task(data.x_train[members]), data.y_train[members], reduction="none"
        )
        loss_out = F.cross_entropy(task(data.x_test[:n]), data.y_test[:n], reduction="none")
    auroc = BinaryAUROC()
    labels = torch.cat([torch.ones(len(loss_in)), torch.zeros(len(loss_out))]).long()
    return float(auroc(-torch.cat([loss_in, loss_out]), labels))


def membership(out: Path, rounds: int) -> list[str]:
    lines = [
        "| run | final acc | epsilon | uplink bits | membership AUC |",
        "|---|---|---|---|---|",
    ]
    runs = {n: o for n, o in ATTACKED.items() if "DP" not in n}
    for z in (0.5, 1.0, 2.0):
        for c in ("none", "fedbat"):
            runs[f"{c} + DP (central, z={z})"] = [
                f"compressor={c}", "privacy=dp", "privacy.clip=1.0", f"privacy.noise_multiplier={z}"
            ]  # fmt: skip
    price: dict[str, list[tuple[float, float]]] = {}
    for name, overrides in runs.items():
        summary, run_dir = trained(out, name, overrides, rounds)
        auc = membership_auc(run_dir, overrides)
        eps, acc = summary.get("privacy_epsilon"), summary["final_acc"]
        lines.append(
            f"| {name} | {acc:.4f} | {'-' if eps is None else f'{eps:.2f}'} | "
            f"{summary['bits_uplink_total']:.3e} | {auc:.3f} |"
        )
        print(lines[-1], flush=True)
        price.setdefault(name.split(" + ")[0], []).append((math.inf if eps is None else eps, acc))
    price_plot(out / "price.png", {c: price[c] for c in ("none", "fedbat")})
    return lines


def price_plot(path: Path, price: dict[str, list[tuple[float, float]]]) -> None:
    """Final accuracy against epsilon under central DP; the non-private run as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for (name, points), color in zip(price.items(), ("tab:blue", "tab:orange"), strict=True):
        private = sorted(p for p in points if math.isfinite(p[0]))
        ax.plot(*zip(*private, strict=True), marker="o", color=color, label=f"{name} + DP")
        for eps, acc in points:
            if not math.isfinite(eps):
                ax.axhline(acc, color=color, linestyle="--", label=f"{name}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("FMNIST mlp, 100 clients, 10 a round: the price of central DP")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/privacy"))
    p.add_argument("--iters", type=int, default=600, help="attack iterations")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the runs of parts 2-3")
    p.add_argument("--parts", default="1,2", help="1: reconstruction, 2: membership and price")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if "1" in parts:
        (args.out / "reconstruction.md").write_text("\n".join(reconstruction(args.out, args.iters)))
    if "2" in parts:
        (args.out / "membership.md").write_text("\n".join(membership(args.out, args.rounds)))
    print(f"{time.perf_counter() - t0:.0f} s; tables and reconstruction.png in {args.out}")


if __name__ == "__main__":
    main()
