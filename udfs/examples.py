"""Example models with typed signatures, built by code from generated data (nothing downloaded).

* ``dlrm``: a DLRM-style CTR model: 13 dense floats (columns ``i1``..``i13``) and 8 categorical
  int64 ids (columns ``c1``..``c8``), each id looked up in its own ``EmbeddingBag``; a score.
* ``text``: a small transformer text classifier: variable-length int64 token ids (an
  ``array<bigint>`` column) with a generated attention mask; 3 class probabilities and a label.
* ``two_tower``: a two-tower user encoder: a user id, the ids of recently seen items (variable
  length, masked mean) and 2 dense floats; a 32-d L2-normalised embedding (``array<float>``).
* ``two_head``: a multi-task CTR + CVR model: a 16-float ``array<float>`` column and an int32
  device id; a dict output ``{"ctr": ..., "cvr": ...}``, read as two scores.

``python -m udfs.examples --out build/examples`` writes each as TorchScript (``.pt``),
``torch.export`` (``.pt2``) and ONNX (``.onnx``), its config (``<name>.toml``, the ``[model]``
table) and a Parquet table of generated rows. :data:`CONFIGS` holds the signatures as TOML.
"""

from __future__ import annotations

import argparse
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DENSE = tuple(f"i{k}" for k in range(1, 14))
CATS = tuple(f"c{k}" for k in range(1, 9))
TABLE_SIZES = (1000, 500, 200, 100, 50, 1000, 20, 10)
VOCAB = 1000
MAX_TOKENS = 64
USERS, ITEMS, MAX_HISTORY = 5000, 2000, 50
DEVICES = 16

CONFIGS: dict[str, str] = {
    "dlrm": f"""
[[model.inputs]]
name = "dense"
columns = {list(DENSE)}
dtype = "float32"

[[model.inputs]]
name = "sparse"
columns = {list(CATS)}
dtype = "int64"
embedding = {[f"emb.{j}" for j in range(len(CATS))]}

[[model.outputs]]
name = "ctr"
kind = "score"
""",
    "text": f"""
[[model.inputs]]
name = "input_ids"
column = "tokens"
dtype = "int64"
shape = [-1]
pad = 0
max_length = {MAX_TOKENS}
embedding = "tok"

[[model.inputs]]
name = "attention_mask"
mask_of = "input_ids"
dtype = "int64"

[[model.outputs]]
name = "probabilities"
kind = "probabilities"
activation = "softmax"

[[model.outputs]]
name = "label"
kind = "label"
source = 0
""",
    "two_tower": f"""
[[model.inputs]]
name = "user_id"
column = "user_id"
dtype = "int64"
shape = []
embedding = "user"

[[model.inputs]]
name = "items"
column = "recent_items"
dtype = "int64"
shape = [-1]
pad = 0
max_length = {MAX_HISTORY}
embedding = "item"

[[model.inputs]]
name = "items_mask"
mask_of = "items"
dtype = "float32"

[[model.inputs]]
name = "dense"
columns = ["age", "tenure"]
dtype = "float32"

[[model.outputs]]
name = "embedding"
kind = "vector"
""",
    "two_head": """
[[model.inputs]]
name = "features"
column = "features"
dtype = "float32"
shape = [16]

[[model.inputs]]
name = "device_id"
column = "device"
dtype = "int32"
shape = []
range = [0, 16]

[[model.outputs]]
name = "ctr"
kind = "score"
source = "ctr"
activation = "sigmoid"

[[model.outputs]]
name = "cvr"
kind = "score"
source = "cvr"
activation = "sigmoid"
""",
}
# How each model's inputs are named in its forward(), for call = "keyword" and ONNX input names.
NAMES = {
    "dlrm": ("dense", "sparse"),
    "text": ("input_ids", "attention_mask"),
    "two_tower": ("user_id", "items", "items_mask", "dense"),
    "two_head": ("features", "device_id"),
}
OUTPUT_NAMES = {
    "dlrm": ("ctr",),
    "text": ("logits",),
    "two_tower": ("embedding",),
    "two_head": ("ctr", "cvr"),
}


def model_table(name: str) -> dict[str, Any]:
    """The ``[model]`` table of an example (without path)."""
    return tomllib.loads(CONFIGS[name])["model"]


# --- the models ----------------------------------------------------------------------------------


def dlrm_module(seed: int = 0, dim: int = 16) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DLRM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, dim), nn.ReLU())
            self.emb = nn.ModuleList([nn.EmbeddingBag(n, dim, mode="sum") for n in TABLE_SIZES])
            self.top = nn.Sequential(nn.Linear(dim * (len(TABLE_SIZES) + 1), 64), nn.ReLU(), nn.Linear(64, 1))

        def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
            x = self.bottom(torch.log1p(dense.clamp(min=0)))
            parts = [x]
            for j, table in enumerate(self.emb):
                parts.append(table(sparse[:, j : j + 1]))
            return torch.sigmoid(self.top(torch.cat(parts, dim=1))).squeeze(1)

    return DLRM().eval()


def text_module(seed: int = 1, dim: int = 32, classes: int = 3) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TextClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, dim)
            self.pos = nn.Embedding(MAX_TOKENS, dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)
            self.ff = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
            self.head = nn.Linear(dim, classes)
            self.heads = 4

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            b, n = input_ids.shape
            positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
            x = self.tok(input_ids) + self.pos(positions)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            h = self.heads
            q = q.reshape(b, n, h, -1).transpose(1, 2)
            k = k.reshape(b, n, h, -1).transpose(1, 2)
            v = v.reshape(b, n, h, -1).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
            keep = attention_mask[:, None, None, :] > 0
            scores = scores.masked_fill(~keep, -1e9)
            att = torch.softmax(scores, dim=-1) @ v
            x = self.norm(x + self.out(att.transpose(1, 2).reshape(b, n, -1)))
            x = self.norm(x + self.ff(x))
            m = attention_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(pooled)

    return TextClassifier().eval()


def two_tower_module(seed: int = 2, dim: int = 32) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class UserTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user = nn.Embedding(USERS, dim)
            self.item = nn.Embedding(ITEMS, dim)
            self.dense = nn.Linear(2, dim)
            self.mlp = nn.Sequential(nn.Linear(3 * dim, 64), nn.ReLU(), nn.Linear(64, dim))

        def forward(
            self, user_id: torch.Tensor, items: torch.Tensor, items_mask: torch.Tensor, dense: torch.Tensor
        ) -> torch.Tensor:
            seen = (self.item(items) * items_mask.unsqueeze(-1)).sum(1) / items_mask.sum(
                1, keepdim=True
            ).clamp(min=1.0)
            x = torch.cat([self.user(user_id), seen, self.dense(dense)], dim=1)
            y = self.mlp(x)
            return y / (y * y).sum(1, keepdim=True).sqrt().clamp(min=1e-6)

    return UserTower().eval()


def two_head_module(seed: int = 3) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TwoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.device_emb = nn.Embedding(DEVICES, 8)
            self.shared = nn.Sequential(nn.Linear(16 + 8, 64), nn.ReLU())
            self.ctr = nn.Linear(64, 1)
            self.cvr = nn.Linear(64, 1)

        def forward(self, features: torch.Tensor, device_id: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.shared(torch.cat([features, self.device_emb(device_id.long())], dim=1))
            return {"ctr": self.ctr(h).squeeze(1), "cvr": self.cvr(h).squeeze(1)}

    return TwoHead().eval()


MODULES = {
    "dlrm": dlrm_module,
    "text": text_module,
    "two_tower": two_tower_module,
    "two_head": two_head_module,
}


# --- generated data ------------------------------------------------------------------------------


def table(name: str, rows: int, *, seed: int = 0) -> pa.Table:
    """``rows`` generated rows for an example model (an ``id`` column, then its input columns)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {"id": pa.array(np.arange(rows, dtype=np.int64))}
    if name == "dlrm":
        for c in DENSE:
            cols[c] = pa.array(np.round(rng.exponential(3.0, rows), 3).astype(np.float32))
        for c, n in zip(CATS, TABLE_SIZES, strict=True):
            cols[c] = pa.array(rng.integers(0, n, rows).astype(np.int64))
    elif name == "text":
        lengths = np.minimum(rng.geometric(1 / 16, rows), MAX_TOKENS)
        cols["tokens"] = pa.array([rng.integers(1, VOCAB, n).tolist() for n in lengths], pa.list_(pa.int64()))
    elif name == "two_tower":
        cols["user_id"] = pa.array(rng.integers(0, USERS, rows).astype(np.int64))
        lengths = rng.integers(1, MAX_HISTORY + 1, rows)
        cols["recent_items"] = pa.array(
            [rng.integers(1, ITEMS, n).tolist() for n in lengths], pa.list_(pa.int64())
        )
        cols["age"] = pa.array(rng.integers(18, 80, rows).astype(np.float64))
        cols["tenure"] = pa.array(np.round(rng.exponential(2.0, rows), 2))
    elif name == "two_head":
        cols["features"] = pa.array(
            list(rng.normal(size=(rows, 16)).astype(np.float32)), pa.list_(pa.float32())
        )
        cols["device"] = pa.array(rng.integers(0, DEVICES, rows).astype(np.int32))
    else:
        raise KeyError(name)
    return pa.table(cols)


def example_inputs(name: str, rows: int = 3) -> tuple[Any, ...]:
    """Torch tensors to trace or export ``name`` with (variable lengths of 5)."""
    import torch

    if name == "dlrm":
        return (torch.rand(rows, 13), torch.zeros(rows, 8, dtype=torch.int64))
    if name == "text":
        return (torch.ones(rows, 5, dtype=torch.int64), torch.ones(rows, 5, dtype=torch.int64))
    if name == "two_tower":
        return (
            torch.zeros(rows, dtype=torch.int64),
            torch.ones(rows, 5, dtype=torch.int64),
            torch.ones(rows, 5),
            torch.rand(rows, 2),
        )
    return (torch.rand(rows, 16), torch.zeros(rows, dtype=torch.int32))


def _dynamic(name: str) -> tuple[dict[int, Any], ...]:
    import torch

    batch = torch.export.Dim("batch", min=1)
    if name in ("text", "two_tower"):
        seq = torch.export.Dim("seq", min=1, max=512)
        if name == "text":
            return ({0: batch, 1: seq}, {0: batch, 1: seq})
        return ({0: batch}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch})
    return tuple({0: batch} for _ in NAMES[name])


FORMATS = ("torchscript", "export", "onnx")


def save(name: str, module: Any, out: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """``name`` as TorchScript, torch.export and ONNX files under ``out`` (those in ``formats``)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    every = {"torchscript": out / f"{name}.pt", "export": out / f"{name}.pt2", "onnx": out / f"{name}.onnx"}
    paths = {f: every[f] for f in formats}
    if "torchscript" in paths:
        torch.jit.save(torch.jit.script(module), str(paths["torchscript"]))
    args = example_inputs(name)
    if "export" in paths:
        program = torch.export.export(module, args, dynamic_shapes=_dynamic(name))
        torch.export.save(program, str(paths["export"]))
    if "onnx" not in paths:
        return paths
    axes: dict[str, dict[int, str]] = {}
    for arg, dims in zip(NAMES[name], _dynamic(name), strict=True):
        axes[arg] = {d: ("batch" if d == 0 else "seq") for d in dims}
    for o in OUTPUT_NAMES[name]:
        axes[o] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(paths["onnx"]),
            dynamo=False,
            input_names=list(NAMES[name]),
            output_names=list(OUTPUT_NAMES[name]),
            dynamic_axes=axes,
        )
    return paths


def build(out: str | Path, rows: int = 10_000) -> dict[str, dict[str, Path]]:
    """Every example model in every format, its ``[model]`` config and a table of generated rows."""
    out = Path(out)
    built = {}
    for name, make in MODULES.items():
        paths = save(name, make(), out)
        (out / f"{name}.toml").write_text(
            f'[model]\nname = "{name}"\npath = "{paths["torchscript"]}"\n{CONFIGS[name]}'
        )
        paths["table"] = out / f"{name}.parquet"
        pq.write_table(table(name, rows), paths["table"])
        built[name] = paths
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/examples")
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    for name, paths in build(args.out, args.rows).items():
        print(f"example {name}: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
