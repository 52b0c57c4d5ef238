"""The embedded demo: a small CTR model and a synthetic table of feature rows.

``python -m udfs.demo --out build/demo`` writes ``ctr.pt`` (TorchScript),
``ctr.pt2`` (torch.export), ``ctr.onnx`` (ONNX, scored with ONNX Runtime) and
``events.parquet``. The model is a 4->32->1 MLP
with its own input normalisation, fitted for a few hundred steps on a known
click rule so that its scores mean something in the demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CTR_FEATURES = ("age", "purchase_count", "price", "category_id")


def synthetic_ctr(rows: int, *, seed: int = 7, bad_fraction: float = 0.0) -> pa.Table:
    """Rows of (user_id, item_id, age, purchase_count, price, category_id); some rows bad on request."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows).astype(np.float64)
    purchases = rng.poisson(5, rows).astype(np.float64)
    price = np.round(rng.gamma(2.0, 40.0, rows), 2)
    category = rng.integers(0, 20, rows).astype(np.float64)
    null_mask = np.zeros(rows, dtype=bool)
    if bad_fraction > 0:
        bad = rng.random(rows) < bad_fraction
        kinds = rng.integers(0, 3, rows)
        null_mask = bad & (kinds == 0)
        price = np.where(bad & (kinds == 1), np.nan, price)
        age = np.where(bad & (kinds == 2), np.inf, age)
    return pa.table(
        {
            "user_id": pa.array(np.arange(rows, dtype=np.int64)),
            "item_id": pa.array(rng.integers(0, 1000, rows).astype(np.int64)),
            "age": pa.array(age),
            "purchase_count": pa.array(purchases),
            "price": pa.array(price, mask=null_mask),
            "category_id": pa.array(category),
        }
    )


def ctr_module(seed: int = 0):  # type: ignore[no-untyped-def]
    """A fitted 4->32->1 CTR MLP (torch.nn.Module) that takes raw feature values."""
    import torch

    torch.manual_seed(seed)

    class CTR(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([49.0, 5.0, 80.0, 9.5]))
            self.register_buffer("std", torch.tensor([18.0, 2.2, 57.0, 5.8]))
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1), torch.nn.Sigmoid()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Buffers are typed Tensor | Module to mypy; TorchScript knows better.
            return self.net((x - self.mean) / self.std)  # type: ignore[operator]

    model = CTR()
    table = synthetic_ctr(4096, seed=seed + 1)
    x = torch.tensor(np.column_stack([table[c].to_numpy() for c in CTR_FEATURES]), dtype=torch.float32)
    # The "true" click rule the demo model learns: young frequent buyers of cheap items click.
    logits = -0.04 * (x[:, 0] - 40) + 0.3 * (x[:, 1] - 5) - 0.01 * (x[:, 2] - 80) + 0.05 * (x[:, 3] % 3)
    y = torch.sigmoid(logits).unsqueeze(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model.eval()


def save_torchscript(module, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    import torch

    torch.jit.save(torch.jit.script(module), str(path))
    return Path(path)


def save_export(module, path: str | Path, num_features: int) -> Path:  # type: ignore[no-untyped-def]
    """Save a torch.export program whose batch dimension is dynamic."""
    import torch

    example = torch.zeros(2, num_features)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    return Path(path)


def save_onnx(module, path: str | Path, num_features: int, *, input_name: str = "features") -> Path:  # type: ignore[no-untyped-def]
    """Save an ONNX model with a dynamic batch dimension: input ``[batch, num_features]``, output
    ``[batch, outputs]``.

    This uses torch's TorchScript-based exporter (``dynamo=False``): for a small MLP it writes
    the same graph (Gemm, Relu, ...) as the torch.export-based default in milliseconds instead of
    seconds, and needs no onnxscript.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": deliberate, see above
        torch.onnx.export(
            module,
            (torch.zeros(2, num_features),),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=["output"],
            dynamic_axes={input_name: {0: "batch"}, "output": {0: "batch"}},
        )
    return Path(path)


def build(
    out: str | Path, rows: int = 100_000, bad_fraction: float = 0.001, files: int = 4
) -> dict[str, Path]:
    """Write the demo model in its three formats and a synthetic Parquet table under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = ctr_module()
    paths = {
        "torchscript": save_torchscript(module, out / "ctr.pt"),
        "export": save_export(module, out / "ctr.pt2", len(CTR_FEATURES)),
        "onnx": save_onnx(module, out / "ctr.onnx", len(CTR_FEATURES)),
        "table": out / "events.parquet",
    }
    # A few files, so local Spark reads them in parallel.
    table = synthetic_ctr(rows, bad_fraction=bad_fraction)
    paths["table"].mkdir(exist_ok=True)
    step = -(-rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), paths["table"] / f"part-{i:05d}.parquet")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/demo")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bad-fraction", type=float, default=0.001)
    args = parser.parse_args()
    paths = build(args.out, args.rows, args.bad_fraction)
    for kind, path in paths.items():
        print(f"demo {kind}: {path}")


if __name__ == "__main__":
    main()
