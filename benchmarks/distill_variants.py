"""Distillation variants measured against the kept recipe (docs/fidelity.md, 'Distillation after calibration').

Each variant replaces normswap.torch.distill for one run: trains the benchmark nets (3 seeds), converts to layer
with calibration, and prints held-out agreement before and after 300 (or N) steps.

Usage: python benchmarks/distill_variants.py base|ema|cosine|refit|shuffle|centred|shufcent|proto|proto_shift|
       b32|b128|b256 res,sep [STEPS]       ('base' is the shipped recipe)
"""
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import numpy as np, torch, torch.nn.functional as F
import make_fixtures, normswap
from fidelity import depthwise_separable_net, _torch_agreement
import normswap.torch.api as api
import normswap.torch.distill as D

VARIANT = sys.argv[1]
NETS = sys.argv[2].split(",")

def distill_variant(original, converted, norm_params, data, steps, scope="all", holdout=0.15, progress=None):
    params = list(converted.parameters())
    train, held, n_held = D.split(data, holdout)
    for p in converted.parameters(): p.requires_grad_(True)
    groups = D._param_groups(params)
    if VARIANT.startswith("proto"):
        groups = [{"params": [p], "lr": 1e-4} for p in params]
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]
    original.eval(); converted.eval()
    before = best = D._error(original, converted, held)
    best_step, best_state = 0, [p.detach().clone() for p in params]
    ema = [p.detach().clone() for p in params]
    decay = 0.95
    step = 0
    def consider(state_params):
        nonlocal best, best_step, best_state
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, v in zip(params, state_params): p.copy_(v)
        e = D._error(original, converted, held)
        if e < best: best, best_step, best_state = e, step, [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, v in zip(params, saved): p.copy_(v)
    if VARIANT in ("shuffle", "centred", "shufcent"):
        X = torch.cat([b[0] for b in train])
        g = torch.Generator().manual_seed(0)
        def batches():
            while True:
                perm = torch.randperm(len(X), generator=g)
                for k in range(0, len(X), 64):
                    yield (X[perm[k:k + 64]],)
        train = batches() if VARIANT != "centred" else train
    if VARIANT in ("b32", "b128", "b256"):
        X = torch.cat([b[0] for b in train]); bs = int(VARIANT[1:])
        train = [(X[k:k + bs],) for k in range(0, len(X), bs)]
    while step < steps:
        for batch in train:
            if VARIANT == "cosine":
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            if VARIANT == "proto_shift":
                dx, dy = [int(v) for v in torch.randint(-2, 3, (2,))]
                batch = (torch.roll(batch[0], shifts=(dy, dx), dims=(2, 3)),)
            with torch.no_grad(): target = D._output(original(*batch))
            out = D._output(converted(*batch))
            if VARIANT in ("centred", "shufcent"):
                out = out - out.mean(1, keepdim=True); target = target - target.mean(1, keepdim=True)
            loss = F.mse_loss(out, target)
            opt.zero_grad(); loss.backward(); opt.step(); step += 1
            with torch.no_grad():
                for e_, p in zip(ema, params): e_.mul_(decay).add_(p.detach(), alpha=1 - decay)
            if step % 25 == 0 or step == steps:
                consider([p.detach() for p in params])
                if VARIANT == "ema": consider(ema)
            if step >= steps: break
    if VARIANT == "refit" and best_step > 0:
        # retrain from the calibrated state on all data for best_step steps
        with torch.no_grad():
            for p, v in zip(params, init): p.copy_(v)
        opt = torch.optim.Adam(D._param_groups(params)); s = 0
        while s < best_step:
            for batch in data:
                with torch.no_grad(): target = D._output(original(*batch))
                loss = F.mse_loss(D._output(converted(*batch)), target)
                opt.zero_grad(); loss.backward(); opt.step(); s += 1
                if s >= best_step: break
        return D.DistillationReport(scope, step, best_step, n_held, before, best, 0, kept=True, learning_rate="x")
    with torch.no_grad():
        for p, v in zip(params, best_state): p.copy_(v)
    return D.DistillationReport(scope, step, best_step, n_held, before, best, 0, kept=best_step > 0, learning_rate="x")

if VARIANT != "base":
    orig_distill = distill_variant
    def wrapped(original, converted, *a, **k):
        global init
        init = [p.detach().clone() for p in converted.parameters()]
        return distill_variant(original, converted, *a, **k)
    api.distill = wrapped

(x_train, y_train), (x_test, y_test) = make_fixtures.digits()
data = torch.from_numpy(x_train[:300].copy())
builds = {"res": make_fixtures.build_model, "sep": depthwise_separable_net}
for name in NETS:
    gains = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = make_fixtures.train(builds[name](), x_train, y_train, seed=seed)
        cal = normswap.convert(net, to="layer", calibration=data, validate=False)
        a0 = _torch_agreement(net, cal.model, x_test)
        steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
        r = normswap.convert(net, to="layer", calibration=data, validate=False, distill_steps=steps)
        a1 = _torch_agreement(net, r.model, x_test)
        d = r.report.calibration.distillation
        gains.append(a1 - a0)
        print(name, seed, f"{a0:.4f} -> {a1:.4f} best_step {d.best_step}", flush=True)
    print(VARIANT, name, "mean gain", f"{np.mean(gains):+.4f}", flush=True)
