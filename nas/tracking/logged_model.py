"""A retrained model as an MLflow 3 LoggedModel: a pyfunc that classifies images.

``log_retrained`` logs a saved subnet folder (``model.save``) as a LoggedModel of its retrain
run, with the subnet, its costs and its scores as the model's params and metrics, so that
MLflow's Models view compares them, and
``mlflow.pyfunc.load_model("models:/<model_id>")`` loads it from the tracking store (onto the
backbone the folder records, which must be where it says or on the hub). ``predict`` takes a
batch of images as an integer array (N, H, W, C) or (N, H, W) with values 0-255 (any size: each
image is resized as training decoded it), or image file paths (a list, a Series or a one-column
DataFrame), and returns a DataFrame: ``class`` (the predicted index), ``class_name`` (its name
where known) and ``probabilities`` (softmax over the classes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from nas.data.decode import model_array
from nas.data.loader import normalise
from nas.families import load

INPUTS_FILE = "inputs.json"
#: The registry alias of the winner the search ranked best.
ALIAS = "champion"
#: What the pyfunc needs besides this package (installed where the model is loaded).
REQUIREMENTS = ("torch", "timm", "mlflow", "safetensors", "pillow", "numpy", "pandas", "pyyaml")


class PromptedClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: images in, predicted class, its name and probabilities out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = load(context.artifacts["model"]).eval()
        self.inputs = json.loads(Path(context.artifacts["inputs"]).read_text())

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        # np.ndarray is one of the hints MLflow does not validate against (nor warn about a
        # missing one): the input may also be a DataFrame, or image paths (to_tensor).
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:

        images = to_tensor(model_input, self.inputs["image_size"], self.inputs["channels"])
        if len(images) == 0:  # an empty batch: an empty answer, as any classifier gives
            return pd.DataFrame({"class": [], "class_name": [], "probabilities": []})
        with torch.no_grad():
            logits = self.model(normalise(images, self.inputs["mean"], self.inputs["std"]))
            probs = logits.float().softmax(dim=1)
        names = self.inputs.get("class_names") or []
        classes = probs.argmax(dim=1).tolist()
        return pd.DataFrame(
            {
                "class": classes,
                "class_name": [names[c] if c < len(names) else str(c) for c in classes],
                "probabilities": [row for row in probs.tolist()],
            }
        )


def _paths(model_input: Any) -> list[str] | None:
    """Image file paths, if that is what the input holds."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1 or not model_input.iloc[:, 0].map(type).eq(str).all():
            return None
        return model_input.iloc[:, 0].tolist()
    if isinstance(model_input, pd.Series | list | tuple):
        values = list(model_input)
        return values if values and all(isinstance(v, str) for v in values) else None
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "UO":
        values = model_input.reshape(-1).tolist()
        return values if all(isinstance(v, str) for v in values) else None
    return None


def to_tensor(model_input: Any, size: Sequence[int], channels: int) -> torch.Tensor:
    """The model's uint8 input (N, C, H, W), decoded as training decoded its images; a
    ValueError saying what was expected otherwise."""
    paths = _paths(model_input)
    if paths is not None:
        if not paths:
            return torch.zeros((0, channels, *size), dtype=torch.uint8)
        out = []
        for p in paths:
            with Image.open(p) as img:
                out.append(model_array(img, size, channels))
        return torch.from_numpy(np.stack(out))
    array = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input)
    if array.ndim not in (3, 4) or array.dtype.kind not in "iuf":
        raise ValueError(
            "expected images as an integer array (N, H, W, C) or (N, H, W) with values 0-255, "
            f"or image file paths; got an array of shape {array.shape} and dtype {array.dtype}"
        )
    if array.size and (array.min() < 0 or array.max() > 255 or np.any(array != np.round(array))):
        raise ValueError("expected pixel values that are whole numbers from 0 to 255")
    array = array.astype(np.uint8)
    if len(array) == 0:
        return torch.zeros((0, channels, *size), dtype=torch.uint8)
    if array.ndim == 4 and array.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels last (N, H, W, C); got shape {array.shape}")
    out = []
    for image in array:
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]  # (H, W): PIL's greyscale
        out.append(model_array(Image.fromarray(image), size, channels))
    return torch.from_numpy(np.stack(out))


def images_for(model: Any, data: Any) -> np.ndarray:
    """What a loaded pyfunc (``mlflow.pyfunc.load_model``) takes, made from image file paths or
    from integer arrays of any size, (N, H, W) or (N, H, W, C) with values 0-255: its
    signature's uint8 (N, H, W, C), each image decoded and resized as training decoded it."""
    shape = model.metadata.get_input_schema().inputs[0].shape
    height, width, channels = (int(v) for v in shape[1:])
    batch = to_tensor(data, (height, width), channels)  # (N, C, H, W)
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


def inputs_record(
    image_size: int | Sequence[int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    return {
        "image_size": [image_size] * 2 if isinstance(image_size, int) else list(image_size),
        "channels": int(channels),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "class_names": list(class_names) if class_names else None,
    }


def log_retrained(
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    model_dir: Path,
    inputs: Mapping[str, Any],
    *,
    name: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log ``model_dir`` as a LoggedModel of run ``run_id`` in ``experiment_id`` (its params:
    the run's; its metrics: the run's final ones at step 0, so log those first); the model's
    ID. A model an earlier attempt logged completely for this run is reused, not duplicated."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    client = mlflow.MlflowClient(tracking_uri)
    for model in client.search_logged_models([experiment_id]):
        if model.source_run_id == run_id and model.status == LoggedModelStatus.READY:
            return model.model_id
    (model_dir.parent / INPUTS_FILE).write_text(json.dumps(dict(inputs), indent=1))
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        tags=dict(tags or {}),
        params=client.get_run(run_id).data.params,
        model_type="prompted-classifier",
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with global_tracking_uri(tracking_uri), warnings.catch_warnings():
        # An input example would be a batch of images in every model's artifacts, run once at
        # logging; the signature already says what the model takes.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        Model.log(
            None,  # artifact_path, which MLflow 3 replaced by name
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            # Model.log links the run's metrics of this step to the model: of step 0 they
            # would include the system metrics; none are at -1, so the model's are linked below.
            step=-1,
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"model": str(model_dir), "inputs": str(model_dir.parent / INPUTS_FILE)},
            pip_requirements=list(REQUIREMENTS),
            signature=signature(inputs),
        )
    link_final_metrics(client, run_id, model.model_id)
    return model.model_id


def signature(inputs: Mapping[str, Any]) -> Any:
    """The pyfunc's signature: a batch of uint8 images of the model's size, channels last
    ((N, H, W, C), as ``images_for`` makes them from files or other sizes); out, per image,
    the class index, its name and the probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    height, width = inputs["image_size"]
    shape = (-1, int(height), int(width), int(inputs["channels"]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema(
            [
                ColSpec("long", "class"),
                ColSpec("string", "class_name"),
                ColSpec(Array("double"), "probabilities"),
            ]
        ),
    )


def link_final_metrics(client: mlflow.MlflowClient, run_id: str, model_id: str) -> None:
    """The run's final scores (its metrics at step 0: accuracies, costs; not the system
    metrics MLflow samples while it trains) as the LoggedModel's metrics."""
    from mlflow.entities import Metric

    linked = []
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("system/"):
            continue
        for m in client.get_metric_history(run_id, key):
            if m.step == 0 and m.model_id is None:
                linked.append(
                    Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
                )
    for i in range(0, len(linked), 1000):
        client.log_batch(run_id, metrics=linked[i : i + 1000])


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for a while: parts of MLflow that
    take no client (``Model.log``'s metric links, the registry resolving ``models:/<id>``)
    read it, and would otherwise open ./mlflow.db in the working directory."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def registered_name(experiment: str, dataset: str) -> str:
    """The Model Registry name of a dataset's winners: ``<experiment>-<dataset>``, with any
    character the registry's names avoid replaced by ``-``; where that changed the name, a
    short hash of the original follows, so that two experiments whose names differ only in
    such characters never share a registered model."""
    import hashlib

    name = f"{experiment}-{dataset}"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def link_version(client: mlflow.MlflowClient, model_id: str, name: str, version: str) -> None:
    """The LoggedModel's link to its registered version, as ``mlflow.register_model`` makes
    it (the model page's "Registered versions"): MLflow 3.17's SQL registry keeps no
    ``model_id`` on the version itself (it reads back None), only its ``models:/<id>`` source."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": str(version)}
    if entry not in listed:
        client.set_logged_model_tags(
            model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])}
        )


def register_winners(
    tracking_uri: str,
    experiment: str,
    rows: Sequence[Mapping[str, Any]],
    alias: str = ALIAS,
) -> dict[str, str]:
    """Each dataset's searched winners (one per seed) as versions of the registered model
    ``registered_name(experiment, dataset)``, and ``alias`` on the one the search ranked best
    (highest validation accuracy, then fewer parameters, then the lower seed; never the test
    accuracy). A LoggedModel registered before is not registered again. Returns dataset ->
    the champion's URI (``models:/<name>@<alias>``)."""
    with global_tracking_uri(tracking_uri):
        return _register(mlflow.MlflowClient(tracking_uri), experiment, rows, alias)


def _register(
    client: mlflow.MlflowClient,
    experiment: str,
    rows: Sequence[Mapping[str, Any]],
    alias: str,
) -> dict[str, str]:
    winners: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("role") == "searched" and row.get("mlflow_model_id"):
            winners.setdefault(row["dataset"], []).append(row)
    out: dict[str, str] = {}
    for dataset, found in sorted(winners.items()):
        name = registered_name(experiment, dataset)
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(
                name,
                tags={"nas.experiment": experiment, "nas.dataset": dataset},
                description=f"The searched prompt module for {dataset} (experiment "
                f"{experiment}), one version per seed; @{alias} is the one the search ranked best.",
            )
        versions = {
            v.tags.get("nas.model_id"): v.version
            for v in client.search_model_versions(f"name = '{name}'")
        }
        for row in sorted(found, key=lambda r: r["seed"]):
            if row["mlflow_model_id"] in versions:
                continue
            version = client.create_model_version(
                name,
                source=f"models:/{row['mlflow_model_id']}",
                run_id=row["mlflow_run_id"],
                model_id=row["mlflow_model_id"],
                tags={
                    "nas.model_id": row["mlflow_model_id"],
                    "nas.seed": str(row["seed"]),
                    "nas.space.subnet": str(row.get("subnet_str", "")),
                    "val_acc": str(row.get("val_acc")),
                    "test_acc": str(row.get("test_acc")),
                },
            )
            versions[row["mlflow_model_id"]] = version.version
            link_version(client, row["mlflow_model_id"], name, version.version)
        best = min(found, key=lambda r: (-(r.get("val_acc") or 0.0), r["params"], r["seed"]))
        client.set_registered_model_alias(name, alias, versions[best["mlflow_model_id"]])
        out[dataset] = f"models:/{name}@{alias}"
    return out
