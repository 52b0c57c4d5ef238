"""The demo model in a local MLflow registry: what ``make demo`` builds under ``build/mlflow``.

``python -m udfs.mlflow_demo --root build/mlflow`` logs the demo CTR model with MLflow's pytorch
flavor (a ``torch.export`` program, ``serialization_format='pt2'``) and a column-based signature
(age, purchase_count, price, category_id -> one score), registers it as ``demo_ctr`` in MLflow's
default sqlite store (``build/mlflow/mlflow.db``, artifacts in ``build/mlflow/artifacts``; no
tracking server) and points the alias ``champion`` at the new version. Configs then name it
``models:/demo_ctr@champion`` with ``registry_uri = "sqlite:///build/mlflow/mlflow.db"``.

The same functions register the test models (tests/test_model_store.py) and the promotion
workflow's next version (README, "Models from MLflow and object storage").
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from udfs.demo import CTR_FEATURES

NAME = "demo_ctr"
ALIAS = "champion"


def registry_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def quiet() -> None:
    """MLflow logs database migrations and warnings about pickles at INFO / WARNING."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def experiment(root: str | Path, name: str = "sparkscore") -> str:
    """The experiment (artifacts under ``root/artifacts``) in the sqlite store under ``root``."""
    import mlflow

    quiet()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(registry_uri(root))
    mlflow.set_registry_uri(registry_uri(root))
    found = mlflow.get_experiment_by_name(name)
    exp_id = (
        found.experiment_id
        if found
        else mlflow.create_experiment(name, artifact_location=(root / "artifacts").as_uri())
    )
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ctr_signature() -> Any:
    """One [batch, 4] float32 tensor in (the four demo features, in CTR_FEATURES order), one score out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(CTR_FEATURES)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
    )


def log_pytorch(
    module: Any,
    root: str | Path,
    *,
    name: str = NAME,
    alias: str | None = ALIAS,
    serialization_format: str = "pt2",
    signature: Any = "ctr",
    code_paths: list[str] | None = None,
) -> str:
    """Log ``module`` with the pytorch flavor, register it as ``name``, point ``alias`` at it; the version.

    ``pt2``: MLflow exports it with torch.export from a [2, 4] example, the batch dimension dynamic
    (the signature's -1); ``pickle``: torch.save of the module (a TorchScript module or a pickled
    nn.Module).
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np

    experiment(root)
    sig = ctr_signature() if signature == "ctr" else signature
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            module,
            name="model",
            signature=sig,
            input_example=np.zeros((2, len(CTR_FEATURES)), np.float32)
            if serialization_format == "pt2"
            else None,
            serialization_format=serialization_format,
            pip_requirements=["torch"],
            code_paths=code_paths,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def log_model(
    flavor: str, model: Any, root: str | Path, *, name: str, alias: str | None = None, **kw: Any
) -> str:
    """Log ``model`` with ``mlflow.<flavor>.log_model`` and register it; the version."""
    import importlib

    import mlflow

    experiment(root)
    module = importlib.import_module(f"mlflow.{flavor}")
    with mlflow.start_run():
        info = module.log_model(model, name="model", registered_model_name=name, **kw)
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def set_alias(root: str | Path, name: str, alias: str, version: str) -> None:
    import mlflow

    experiment(root)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def delete_alias(root: str | Path, name: str, alias: str) -> None:
    import mlflow

    experiment(root)
    mlflow.MlflowClient().delete_registered_model_alias(name, alias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="build/mlflow")
    parser.add_argument("--seed", type=int, default=0, help="another seed trains another version")
    parser.add_argument("--alias", default=ALIAS)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from udfs.demo import ctr_module

    version = log_pytorch(ctr_module(args.seed), args.root, alias=args.alias)
    print(f"registered {NAME} version {version} in {registry_uri(args.root)}; @{args.alias} -> {version}")


if __name__ == "__main__":
    main()
