"""`Detector`: learn what good looks like from images, then score and localise defects.

Life cycle as in scikit-learn: ``Detector(config).fit(images)``, ``.predict(images)``,
``.save(path)``, ``Detector.load(path)``. Every adapter (CLI, REST, export, monitoring) goes
through this class, so preprocessing and scoring exist exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from defectscope.config import DetectorConfig, FeatureConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector import scales
from defectscope.detector.calibration import Calibration
from defectscope.detector.engine import ScoringEngine, TorchEngine
from defectscope.detector.fit_info import FitInfo
from defectscope.detector.fitting import FitResult, extract_shard, fit_from_shards
from defectscope.detector.model_file import (
    config_from_metadata,
    read_model_file,
    resolve_model_path,
    write_model_file,
)
from defectscope.detector.parts import FeatureParts, resolve_device
from defectscope.detector.persistence import model_description, restore_engine
from defectscope.detector.plan import FitPlan
from defectscope.detector.prediction import Prediction
from defectscope.detector.progress import ProgressFn, with_stage_prefix
from defectscope.detector.reference import PooledEmbeddings, embed_pooled
from defectscope.detector.scoring import AnomalyScorer
from defectscope.detector.selection import PreparedMaps, SelectionResult, select_configuration
from defectscope.detector.shards import FitShard, ShardStore
from defectscope.detector.suspects import fit_without_suspects, suspect_images
from defectscope.errors import (
    DefectscopeError,
    ImageLoadError,
    NotFittedError,
)
from defectscope.features.backbones import BackboneCache, FeatureBackbone, create_backbone
from defectscope.features.patches import PatchFeatures
from defectscope.features.preprocess import Preprocessor

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Detector:
    """PatchCore-style anomaly detector (frozen backbone + memory bank of good patches)."""

    def __init__(self, config: DetectorConfig | dict | None = None) -> None:
        if isinstance(config, dict) or config is None:
            config = DetectorConfig.from_dict(config)
        self.config: DetectorConfig = config
        self.device = resolve_device(config.device)
        self.parts: FeatureParts | None = None
        self.preprocessor: Preprocessor | None = None
        self.engine: ScoringEngine | None = None
        self.calibration: Calibration | None = None
        self.info = FitInfo()
        self._backbone_module: FeatureBackbone | None = None
        self._selection: SelectionResult | None = None
        self._prepared = PreparedMaps()
        self._requested_features: FeatureConfig | None = None
        self._calibration_images: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ state
    @property
    def features(self) -> PatchFeatures | None:
        return self.parts.features if self.parts is not None else None

    @property
    def scorer(self) -> AnomalyScorer | None:
        """The memory bank and its scoring rules (None before a fit, and for exported graphs,
        which hold the bank inside)."""
        return self.engine.scorer if isinstance(self.engine, TorchEngine) else None

    @property
    def runtime(self) -> str:
        """What scores images: 'torch', or the runtime of an exported graph."""
        return self.engine.runtime if self.engine is not None else "torch"

    @property
    def is_fitted(self) -> bool:
        return self.engine is not None and self.calibration is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("the detector is not fitted: call fit() or Detector.load() first")

    def _fitted(self, part: _T | None) -> _T:
        """``part`` (one of the attributes below) of a fitted detector; NotFittedError before
        fit() or load(). Exported runtimes are fitted without a scorer or features."""
        self._require_fitted()
        if part is None:
            raise NotFittedError("the detector is not fitted: call fit() or Detector.load() first")
        return part

    @property
    def _fitted_features(self) -> PatchFeatures:
        return self._fitted(self.features)

    @property
    def _fitted_preprocessor(self) -> Preprocessor:
        return self._fitted(self.preprocessor)

    @property
    def _fitted_scorer(self) -> AnomalyScorer:
        if self.is_fitted and self.runtime != "torch":
            raise DefectscopeError("the memory bank is embedded in the exported graph")
        return self._fitted(self.scorer)

    @property
    def _fitted_calibration(self) -> Calibration:
        return self._fitted(self.calibration)

    @property
    def threshold(self) -> float:
        return self._fitted_calibration.threshold

    @property
    def pixel_threshold(self) -> float:
        return self._fitted_calibration.pixel_threshold

    @property
    def memory_bank(self) -> torch.Tensor:
        return self._fitted_scorer.bank

    @property
    def half_scale(self) -> scales.HalfScale | None:
        """The half-size bank and how it adds to the full-size one (None: one bank)."""
        return self.engine.half if isinstance(self.engine, TorchEngine) else None

    def memory_banks(self) -> dict[str, torch.Tensor]:
        """Every bank by its name in the model file: ``memory_bank``, and
        ``memory_bank_half`` for a model with a half-size bank."""
        banks = {"memory_bank": self.memory_bank}
        if self.half_scale is not None:
            banks["memory_bank_half"] = self.half_scale.scorer.bank
        return banks

    def set_thresholds(
        self, image: float | None = None, pixel: float | None = None, source: str = "user"
    ) -> None:
        """Replace the stored thresholds (e.g. F1-optimal ones from a labelled validation set)."""
        self.calibration = self._fitted_calibration.with_thresholds(image, pixel, source)

    def _backbone(self) -> FeatureBackbone:
        """The frozen backbone, built once: configuration choices at fit time keep it."""
        if self._backbone_module is None:
            self._backbone_module = create_backbone(self.config.backbone)
        return self._backbone_module

    def reset_features(self) -> None:
        """Forget the feature extractor and preprocessor (not the backbone) so that the next
        use builds them from the current ``config.features``."""
        self.parts = None
        self.preprocessor = None

    def _require_torch(self) -> None:
        if self.runtime != "torch":
            raise DefectscopeError(
                "an exported model gives anomaly maps and scores, not embeddings: "
                "fit, embed and save need the PyTorch model it was exported from"
            )

    def feature_parts(self) -> FeatureParts:
        """The feature extractor and preprocessor, built from the config on first use."""
        self._require_torch()
        if self.parts is None:
            self.parts = FeatureParts.build(
                self._backbone(), self.config.features, self.device, self.config.half_precision
            )
            self.preprocessor = self.parts.preprocessor
        return self.parts

    @property
    def selection(self) -> SelectionResult | None:
        """What `prepare` decided before the last fit (None before any fit in this process)."""
        return self._selection

    @property
    def prepared_maps(self) -> PreparedMaps:
        """Backbone maps `prepare` computed and the fit has not taken yet."""
        return self._prepared

    def prepare(
        self,
        images: Sequence[ImageInput],
        progress: ProgressFn | None = None,
        keep_maps: bool = True,
    ) -> SelectionResult:
        """Settle what depends on the training images before a fit: the image geometry and,
        in auto mode, the feature configuration (`defectscope.detector.selection`). The
        backbone maps auto mode computed are kept for this process's fit to reuse, unless
        ``keep_maps`` is false (shards extracted elsewhere)."""
        self._require_torch()  # before anything is reset: a refused call changes nothing
        if self._requested_features is None:
            self._requested_features = self.config.features.model_copy(deep=True)
        else:
            # A refit decides afresh from the features asked for, not from the last choice.
            self.config.features = self._requested_features.model_copy(deep=True)
        result, prepared = select_configuration(
            self._backbone(), self.config, self.device, images, progress
        )
        self._prepared = prepared if keep_maps else PreparedMaps()
        self.reset_features()
        self._selection = result
        return result

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, 3, H, W) -> patch embeddings (B, D, h, w), float32."""
        return self.feature_parts().embed(batch)

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        images: Sequence[ImageInput],
        *,
        on_error: str = "raise",
        progress: ProgressFn | None = None,
    ) -> Detector:
        """Learn the memory bank and thresholds from good images (paths, arrays, PIL, bytes).

        Staged (see `defectscope.detector.fitting`): plan, embed chunk by chunk, then one bank
        from all chunks; a distributed engine runs the same stages.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if not isinstance(images, Sequence):
            images = list(images)
        # A lazy Sequence (e.g. decoded on access) is only materialised one chunk at a time.
        plan = FitPlan.create(len(images), self.config)
        start = time.perf_counter()
        self.prepare(images, progress)
        # A few-shot fit's views and calibration are settled by prepare.
        plan = FitPlan.create(len(images), self.config, self._selection)
        with ShardStore.from_config(self.config.fit) as store:
            shards = [
                store.keep(
                    self.extract_shard(
                        [images[i] for i in range(offset, stop)],
                        plan,
                        offset,
                        on_error=on_error,
                        progress=progress,
                    )
                )
                for offset, stop in plan.chunks()
            ]
            self.fit_from_shards(shards, plan, progress=progress)
        self._prepared = PreparedMaps()
        half = self.half_scale_detector(len(images))
        if half is not None:
            half.fit(images, on_error=on_error, progress=with_stage_prefix(progress, "half-size "))
            self.join_half_scale(half)
        if self.config.fit.drop_suspects:
            self.config.fit.drop_suspects = False  # once: the second fit's suspects are named
            try:
                fit_without_suspects(
                    images,
                    self.info.training.suspects,
                    lambda kept: self.fit(kept, on_error=on_error, progress=progress),
                )
            finally:
                self.config.fit.drop_suspects = True
        self.info.timings["total_s"] = round(time.perf_counter() - start, 4)
        return self

    def half_scale_detector(self, n_images: int) -> Detector | None:
        """An unfitted detector for the half-size bank of this detector's configuration, sharing
        its backbone; None where it asks for one bank (`scales.uses_half_scale`)."""
        if not scales.uses_half_scale(self.config, n_images):
            return None
        half = Detector(scales.half_scale_config(self.config))
        half._backbone_module = self._backbone()
        return half

    def join_half_scale(self, half: Detector) -> None:
        """Add ``half`` (`half_scale_detector`, fitted alike) as the half-size bank."""
        weight = self.config.features.half_size_bank
        joined, calibration, record = scales.join_scales(
            weight,
            self._fitted_calibration,
            half.feature_parts(),
            half._fitted_scorer,
            half._fitted_calibration,
        )
        self.engine = TorchEngine(self.feature_parts(), self._fitted_scorer, joined)
        self.calibration = calibration
        scored = self._calibration_images  # the suspects of the joined scores
        self.info.training.suspects = suspect_images(calibration.good_scores, scored)
        self.info.scales = record
        self.info.timings["half_scale_s"] = round(half.info.timings.get("total_s", 0.0), 4)

    def extract_shard(
        self,
        images: Sequence[ImageInput],
        plan: FitPlan,
        offset: int,
        on_error: str = "raise",
        progress: ProgressFn | None = None,
    ) -> FitShard:
        """Embed the plan's images ``offset ..`` (a chunk) into coreset candidates and the rest
        of what `fit_from_shards` needs; runs anywhere the same config and backbone exist."""
        return extract_shard(
            self.feature_parts(),
            self.config,
            images,
            plan,
            offset,
            on_error,
            progress,
            self._prepared,
        )

    def fit_from_shards(
        self, shards: Sequence[FitShard], plan: FitPlan, progress: ProgressFn | None = None
    ) -> Detector:
        """Finish a fit from the shards of every chunk of ``plan``: final coreset, scorer,
        calibration, drift reference. Same shards and plan, same model."""
        parts = self.feature_parts()
        result = fit_from_shards(parts, self.config, shards, plan, progress, self._selection)
        self._keep(result)
        return self

    def _keep(self, result: FitResult) -> None:
        self.engine = TorchEngine(self.feature_parts(), result.scorer)
        self.calibration = result.calibration
        self.info = result.info
        self._calibration_images = result.calibration_images

    # ---------------------------------------------------------------- predict
    @torch.inference_mode()
    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input (B, 3, H, W) -> (anomaly maps at input size, image scores)."""
        return self._fitted(self.engine).score_batch(batch)

    @torch.inference_mode()
    def pooled_embeddings(
        self,
        images: Sequence[ImageInput],
        *,
        batch_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> PooledEmbeddings:
        """Per-image pooled embeddings (N, D), as stored in the drift reference at fit time,
        and the image scores (N,) from the same forward pass. An unreadable image raises its
        ImageLoadError."""
        self._require_fitted()
        self._require_torch()
        return embed_pooled(
            cast("TorchEngine", self.engine),
            self._fitted_preprocessor,
            list(images),
            batch_size or self.config.batch_size,
            progress,
        )

    def iter_predict(
        self,
        images: Sequence[ImageInput],
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[int, str | None, Prediction | ImageLoadError]]:
        """Yield (index, source, Prediction or the ImageLoadError) in input order."""
        for index, source, outcome, _ in self.iter_predict_decoded(
            images, threshold=threshold, pixel_threshold=pixel_threshold, batch_size=batch_size
        ):
            yield index, source, outcome

    def iter_predict_decoded(
        self,
        images: Sequence[ImageInput],
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[int, str | None, Prediction | ImageLoadError, np.ndarray | None]]:
        """As `iter_predict`, plus the decoded RGB image of each prediction (None for an
        unreadable one), so that pictures drawn over it need not decode it again."""
        calibration, preprocessor = self._fitted_calibration, self._fitted_preprocessor
        image_threshold = self.threshold if threshold is None else float(threshold)
        mask_threshold = self.pixel_threshold if pixel_threshold is None else float(pixel_threshold)
        size = batch_size or self.config.batch_size
        for batch in iter_loaded(list(images), size, prepare=preprocessor.resize):
            # A LoadedImage holds an image or its error.
            good = [(item, item.image) for item in batch if item.image is not None]
            results: dict[int, Prediction] = {}
            if good:
                t0 = time.perf_counter()
                tensor = preprocessor.batch([item.prepared for item, _ in good])
                maps, scores = self.score_batch(tensor)
                elapsed_ms = (time.perf_counter() - t0) * 1000.0 / len(good)
                normalized = calibration.normalize(scores.cpu().numpy(), image_threshold)
                for row, (item, image) in enumerate(good):
                    original = preprocessor.to_original(maps[row : row + 1], image.shape[:2])
                    anomaly_map = original[0].float().cpu().numpy()
                    score = float(scores[row])
                    results[item.index] = Prediction(
                        score=score,
                        normalized_score=float(normalized[row]),
                        is_anomalous=score >= image_threshold,
                        threshold=image_threshold,
                        anomaly_map=anomaly_map,
                        mask=anomaly_map >= mask_threshold,
                        pixel_threshold=mask_threshold,
                        source=item.source,
                        timings={"model_ms": elapsed_ms},
                    )
            for item in batch:
                outcome = item.error if item.error is not None else results[item.index]
                yield item.index, item.source, outcome, item.image

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        """Predictions for images, in order; an unreadable image raises ImageLoadError."""
        sources: Sequence[ImageInput]
        if isinstance(images, (str, Path, bytes, np.ndarray)) or not isinstance(images, Sequence):
            sources = [images]
        else:
            # bytes was excluded above; mypy keeps it (bytearray/memoryview promote to bytes).
            sources = cast("Sequence[ImageInput]", images)
        out = []
        for _, _, result in self.iter_predict(
            sources, threshold=threshold, pixel_threshold=pixel_threshold, batch_size=batch_size
        ):
            if isinstance(result, Exception):
                raise result
            out.append(result)
        return out

    # ------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """Everything a person or an adapter needs to know about this model (JSON-able)."""
        if self.runtime != "torch":
            engine = self._fitted(self.engine)
            return {**engine.describe(), "calibration": self._fitted_calibration.to_dict()}
        scorer, calibration = self._fitted_scorer, self._fitted_calibration
        return model_description(self.config, self.feature_parts(), scorer, calibration, self.info)

    def save(self, path: str | Path) -> Path | str:
        """Write the model (a folder or a .safetensors file name, local or an s3:// / gs:// URI)
        and return the file path (the object's URI when remote)."""
        return write_model_file(path, self.memory_banks(), self.describe())

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | None = None,
        backbone_cache: BackboneCache | None = None,
    ) -> Detector:
        """Load a saved model (sharing a backbone of ``backbone_cache``); refuses corrupt,
        foreign or incompatible files with a clear error."""
        file = resolve_model_path(path)
        tensors, meta = read_model_file(file)
        config = config_from_metadata(file, meta)
        if device is not None:
            config.device = device
        detector = cls(config)
        if backbone_cache is not None:
            detector._backbone_module = backbone_cache.get(config, detector.device)
        restored = restore_engine(file, tensors, meta, config, detector.feature_parts())
        detector.engine, detector.calibration, detector.info = restored
        return detector
