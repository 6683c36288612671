"""Every auto-mode candidate on the real test split of each category, to judge the choice.

    python benchmarks/candidates.py [--categories a,b] [--json out.json]

For each category: one backbone pass over the training and test images, then each candidate's
bank (the fit's coreset code on all training patches), scores and maps (the fit's scorer), image
and pixel AUROC on the real labels; next to it, what auto mode chose from good images alone.
Quality only (no calibration, no timings): it tells whether the choice was the best one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import SHARED, category_roots


def run(root: Path) -> dict:
    from defectscope.data.datasets import load_mask, open_dataset
    from defectscope.data.io import load_image
    from defectscope.detector.detector import Detector
    from defectscope.detector.scoring import AnomalyScorer
    from defectscope.detector.selection import (
        CANDIDATES,
        _bank,
        _layer_maps,
        _pixel_auroc,
    )
    from defectscope.features.patches import PatchFeatures

    dataset = open_dataset(root)
    detector = Detector({})
    choice = detector.prepare([s.path for s in dataset.train])
    parts = detector.feature_parts()
    features, preprocessor = parts.features, parts.preprocessor
    config = detector.config
    size = config.batch_size
    # Both passes where the features have two (half_scale), as the trial features below.
    train = _layer_maps(parts, size, [load_image(s.path) for s in dataset.train], None)
    images = [load_image(s.path) for s in dataset.test]
    test = _layer_maps(parts, size, images, None)
    labels = np.array([s.label for s in dataset.test])
    has_masks = all(s.mask_path is not None for s in dataset.test if s.label == 1)
    truths = (
        [
            load_mask(s, im.shape[:2]) > 0 if s.label == 1 else np.zeros(im.shape[:2], bool)
            for s, im in zip(dataset.test, images, strict=True)
        ]
        if has_masks
        else None
    )
    rows = {}
    for name, candidate in CANDIDATES.items():
        trial = PatchFeatures(
            features.backbone,
            candidate.neighbourhood,
            None,
            candidate.normalize,
            features.half_scale,
            norm_power=config.features.norm_power,
        )
        bank = _bank(trial, train, config, detector.device)
        scorer = AnomalyScorer(bank, config.scoring, preprocessor.input_size, trial.column_groups)
        scores, maps = [], []
        for batch in test:
            m, s = scorer(trial.aggregate(batch))
            scores.append(s.numpy())
            maps.append(m)
        import torch

        rows[name] = {
            "image_auroc": round(float(roc_auc_score(labels, np.concatenate(scores))), 4),
            "pixel_auroc": (
                round(_pixel_auroc(preprocessor, torch.cat(maps), truths), 4) if truths else None
            ),
        }
    return {"chosen": choice.chosen, "selection": choice.candidates, "real": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    args = parser.parse_args()
    names = args.categories.split(",") if args.categories else None
    out = {}
    for name, root in category_roots(names, SHARED, args.synthetic_root).items():
        out[name] = result = run(root)
        real = result["real"]
        print(
            f"{name:14s} chosen {result['chosen']:10s} real: "
            + " ".join(f"{n}={r['image_auroc']:.3f}/{r['pixel_auroc']}" for n, r in real.items()),
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
