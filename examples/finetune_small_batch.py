"""Fine-tuning at batch size 2 on a shifted domain: what converting BatchNorm buys, measured.

A BN CNN is trained on scikit-learn's digits, then fine-tuned with 2 images per step on a small labeled set of a
shifted domain (rotated + noisy digits, or contrast-inverted digits). Variants:

  bn-train       BN left in train mode (batch statistics of 2 images)
  bn-frozen      BN in eval mode (the original domain's statistics)
  bn-reestimated BN statistics re-estimated on the new domain's images, then frozen
  gn-fresh       GroupNorm(4) with gamma = 1, beta = 0 (what other tools hand back)
  gn-calibrated  normswap: GroupNorm(4) calibrated on 300 unlabeled original-domain images
  gn-distilled   gn-calibrated, then distilled 300 steps (every parameter)

Each variant is fine-tuned with Adam at every learning rate of LEARNING_RATES; the rate is chosen per variant on
a validation split of the new domain, and reported with accuracy on the new domain's test set and on the
original test set after fine-tuning (mean over seeds), plus the accuracy curve against fine-tuning steps.

    python examples/finetune_small_batch.py            # full run: writes docs/finetuning.md and .png
    python examples/finetune_small_batch.py --quick    # a small run (the test suite runs it)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
import make_fixtures  # noqa: E402

import normswap  # noqa: E402

VARIANTS = ("bn-train", "bn-frozen", "bn-reestimated", "gn-fresh", "gn-calibrated", "gn-distilled")
DOMAINS = ("rotated+noisy", "inverted")
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
GROUPS = 4
BATCH = 2


@dataclass
class Setting:
    seeds: tuple[int, ...] = (0, 1, 2)
    labeled: int = 100  # labeled new-domain images for fine-tuning
    validation: int = 100  # new-domain images that choose the learning rate
    steps: int = 300
    distill_steps: int = 300
    every: int = 25  # curve resolution (steps)


QUICK = Setting(seeds=(0,), labeled=40, validation=40, steps=20, distill_steps=20, every=10)


def shift(x: np.ndarray, domain: str, seed: int) -> np.ndarray:
    if domain == "inverted":
        return (1.0 - x).astype(np.float32)
    rng = np.random.default_rng(seed)
    rotated = np.rot90(x, k=1, axes=(2, 3))
    return (rotated + rng.normal(0, 0.1, rotated.shape)).astype(np.float32)


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def reestimate(net: nn.Module, x: np.ndarray) -> nn.Module:
    """BN running statistics recomputed on ``x`` (cumulative average), then the net in eval mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for k in range(0, len(x), 32):
            net(torch.from_numpy(x[k:k + 32]))
    return net.eval()


def prepare(variant: str, original: nn.Module, unlabeled: np.ndarray, new_images: np.ndarray,
            setting: Setting) -> nn.Module:
    if variant.startswith("bn"):
        net = copy.deepcopy(original)
        return reestimate(net, new_images) if variant == "bn-reestimated" else net
    calibration = torch.from_numpy(unlabeled) if variant != "gn-fresh" else None
    # gn-calibrated: calibration alone; gn-distilled: then refinement for a fixed number of steps
    extra = {"refine_steps": setting.distill_steps, "refine_seconds": 600} if variant == "gn-distilled" else {
        "refine": False}
    result = normswap.convert(original, to="group", groups=GROUPS, calibration=calibration, validate=False,
                              example_inputs=torch.from_numpy(unlabeled[:8]), progress=False, **extra)
    net = result.model
    if variant == "gn-fresh":
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return net


def finetune(net: nn.Module, variant: str, x: np.ndarray, y: np.ndarray, lr: float, steps: int, every: int,
             seed: int, probe) -> list[float]:
    """Adam at batch 2 for ``steps`` steps; returns ``probe(net)`` every ``every`` steps (step 0 first)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    curve = [probe(net)]
    order = torch.randperm(len(xt))
    for step in range(1, steps + 1):
        k = ((step - 1) * BATCH) % len(xt)
        if k == 0:
            order = torch.randperm(len(xt))
        idx = order[k:k + BATCH]
        net.train(variant == "bn-train")
        loss = F.cross_entropy(net(xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append(probe(net))
    return curve


@dataclass
class Outcome:
    lr: float
    new_domain: float
    original_domain: float
    before: float  # new-domain accuracy before fine-tuning
    curve: list[float] = field(default_factory=list)


def run(setting: Setting, log=print) -> dict[tuple[str, str], list[Outcome]]:
    (x_train, y_train), (x_test, y_test) = make_fixtures.digits()
    results: dict[tuple[str, str], list[Outcome]] = {}
    for seed in setting.seeds:
        torch.manual_seed(seed)
        original = make_fixtures.train(make_fixtures.build_model(seed), x_train[:900], y_train[:900], seed=seed)
        unlabeled = x_train[900:1200]  # the original domain, unlabeled: what calibration sees
        for domain in DOMAINS:
            pool = shift(x_train[:900], domain, seed)
            labeled_x, labeled_y = pool[:setting.labeled], y_train[:setting.labeled]
            val_x = pool[setting.labeled:setting.labeled + setting.validation]
            val_y = y_train[setting.labeled:setting.labeled + setting.validation]
            test_x = shift(x_test, domain, seed + 100)
            for variant in VARIANTS:
                best: Outcome | None = None
                best_val = -1.0
                prepared = prepare(variant, original, unlabeled, labeled_x, setting)
                before = accuracy(prepared, test_x, y_test)
                for lr in LEARNING_RATES:
                    net = copy.deepcopy(prepared)
                    curve = finetune(net, variant, labeled_x, labeled_y, lr, setting.steps, setting.every, seed,
                                     lambda n: accuracy(n, test_x, y_test))
                    chosen_by = accuracy(net, val_x, val_y)
                    outcome = Outcome(lr, accuracy(net, test_x, y_test), accuracy(net, x_test, y_test), before,
                                      curve)
                    if chosen_by > best_val:
                        best, best_val = outcome, chosen_by
                results.setdefault((domain, variant), []).append(best)
                log(f"seed {seed} {domain:14s} {variant:15s} lr {best.lr:g}: new {best.new_domain:.3f} "
                    f"original {best.original_domain:.3f} (before {best.before:.3f})")
    return results


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results, setting: Setting) -> list[str]:
    lines = ["| new domain | variant | new-domain accuracy before | after fine-tuning | original-domain accuracy "
             "after | learning rate (chosen per seed) |", "|---|---|---|---|---|---|"]
    for (domain, variant), runs in results.items():
        rates = ", ".join(f"{r.lr:g}" for r in runs)
        lines.append(f"| {domain} | {variant} | {_mean(r.before for r in runs):.1%} | "
                     f"{_mean(r.new_domain for r in runs):.1%} | {_mean(r.original_domain for r in runs):.1%} | "
                     f"{rates} |")
    return lines


def plot(results, setting: Setting, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(6 * len(DOMAINS), 4), sharey=True)
    for ax, domain in zip(np.atleast_1d(axes), DOMAINS):
        for variant in VARIANTS:
            runs = results[(domain, variant)]
            curve = np.mean([r.curve for r in runs], axis=0)
            steps = [0] + [min(k * setting.every, setting.steps) for k in range(1, len(curve))]
            ax.plot(steps, curve, label=variant)
        ax.set_title(f"fine-tuning at batch {BATCH}: {domain}")
        ax.set_xlabel("steps")
        ax.set_ylabel("new-domain test accuracy")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (one seed, few steps)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "finetuning_results.md")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else Setting()
    start = time.perf_counter()
    results = run(setting)
    lines = [f"Measured by `python examples/finetune_small_batch.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s on this CPU): seeds "
             f"{', '.join(map(str, setting.seeds))}, {setting.labeled} labeled new-domain images, "
             f"{setting.steps} steps at batch {BATCH}, learning rate chosen among "
             f"{', '.join(f'{lr:g}' for lr in LEARNING_RATES)} on {setting.validation} new-domain validation "
             "images.", ""] + table(results, setting)
    args.out.write_text("\n".join(lines) + "\n")
    plot(results, setting, args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
