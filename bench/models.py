"""Benchmark models, saved as TorchScript with fixed seeds so every run scores the same weights.

* ``tiny``: 4 raw CTR features (age, purchase_count, price, category_id) -> 32 -> 1,
  with the demo model's input normalisation and a sigmoid; overhead-bound.
* ``medium``: 64 features (one ``array<float>`` column) -> 512 -> 512 -> 1; compute-bound.
* ``zeros``: any width -> a column of zeros; isolates everything but the model.

:func:`build_ensemble` saves three ``medium`` models with different seeds: the
members of the ensemble benchmarks (batch and real-time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CTR_FEATURES = ("age", "purchase_count", "price", "category_id")


@dataclass(frozen=True)
class ModelCase:
    """One benchmark model and the input layout it reads."""

    name: str
    input_columns: tuple[str, ...]
    num_features: int | None  # set for one array<float> column
    seed: int

    @property
    def width(self) -> int:
        return self.num_features or len(self.input_columns)


# The ensemble benchmarks' members: ``medium`` with these seeds (m1 is the ``medium`` model itself).
ENSEMBLE_SEEDS = {"m1": 1, "m2": 2, "m3": 3}

CASES = {
    "tiny": ModelCase("tiny", CTR_FEATURES, None, seed=0),
    "medium": ModelCase("medium", ("features",), 64, seed=1),
}


def _mlp(sizes: list[int], seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def tiny_module(seed: int = 0) -> Any:
    """4 -> 32 -> 1 MLP on raw CTR features (normalised inside, sigmoid out)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([49.0, 5.0, 80.0, 9.5]))
            self.register_buffer("std", torch.tensor([18.0, 2.2, 57.0, 5.8]))
            self.net = _mlp([4, 32, 1], seed)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net((x - self.mean) / self.std))  # type: ignore[operator]

    return Tiny().eval()


def medium_module(seed: int = 1) -> Any:
    """64 -> 512 -> 512 -> 1 MLP."""
    return _mlp([64, 512, 512, 1], seed).eval()


def zeros_module() -> Any:
    """Returns one zero per input row, whatever the width."""
    import torch

    class Zeros(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros((x.shape[0], 1))

    return Zeros().eval()


def save(module: Any, path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def build(out: Path) -> dict[str, Path]:
    """Write tiny.pt, medium.pt and zeros.pt under ``out`` (rebuilt every call: it takes < 1 s)."""
    return {
        "tiny": save(tiny_module(CASES["tiny"].seed), out / "tiny.pt"),
        "medium": save(medium_module(CASES["medium"].seed), out / "medium.pt"),
        "zeros": save(zeros_module(), out / "zeros.pt"),
    }


def build_ensemble(out: Path) -> dict[str, Path]:
    """Write the three ``medium`` ensemble members (m1, m2, m3: seeds 1, 2, 3) under ``out``."""
    return {
        name: save(medium_module(seed), out / f"medium_{name}.pt") for name, seed in ENSEMBLE_SEEDS.items()
    }
