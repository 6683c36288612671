"""Reference statistics of the good training images, stored with the model for drift checks.

A drift check compares recent inputs with what the model was fitted on. Image scores of good
images are already in the model (``calibration.good_scores``, out-of-sample by leave-one-out).
This module adds a compact summary of the *feature* distribution: every image's patch embeddings
are averaged over the grid (one pooled vector per image, the same for fit and for new images),
and the model keeps their per-channel mean and variance plus a random sample of up to
``MAX_SAMPLE`` pooled vectors, enough for a kernel two-sample test.

The sample is stored as base64 float16: 256 x 152 values (EfficientNet-Lite0) take ~100 KB of
JSON instead of ~400 KB as decimal text, and float16's 3 significant digits are far below the
spread of pooled features. Wide backbones keep fewer rows so the sample stays under
``MAX_SAMPLE_VALUES`` numbers (~350 KB).

It also stores the *effect-size floor* of the feature test (``effect_floor``): with enough
images the MMD test finds any difference significant, including ones too small to matter (on
MVTec bottle the unshifted test images differ from the training images by a mean |z| of 0.38,
at p = 1/4001). The floor is the ``EFFECT_FLOOR_QUANTILE`` quantile, over the training images,
of one image's mean absolute standardised deviation from the training mean: a window only
counts as feature drift when its *average* moved further than 99% of single good images lie from
it, i.e. beyond the natural image-to-image variation. It does not shrink with the window size or
the training set size, as a split-half null (sampling noise only) would. References written
before it existed use ``DEFAULT_EFFECT_FLOOR``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from defectscope.errors import ModelFileError

REFERENCE_VERSION = 1
MAX_SAMPLE = 256
MAX_SAMPLE_VALUES = 131_072
# Channel variances below this are treated as this, so a constant channel cannot blow up a
# standardised difference.
MIN_VARIANCE = 1e-8
EFFECT_FLOOR_QUANTILE = 0.99
# Fallback floor for references without one: the floor measured on MVTec bottle with the default
# backbone (1.18) rounded; Gaussian channels give ~0.8 + 2.3 * 0.6 / sqrt(D), 0.9-1.3 for D >= 8.
DEFAULT_EFFECT_FLOOR = 1.2


def pool_embeddings(embeddings: torch.Tensor) -> np.ndarray:
    """Patch embeddings (N, D, h, w) -> one vector per image (N, D), float32: the grid mean."""
    if embeddings.ndim != 4:
        raise ValueError(f"expected embeddings (N, D, h, w), got shape {tuple(embeddings.shape)}")
    return embeddings.float().mean(dim=(2, 3)).cpu().numpy().astype(np.float32)


@dataclass
class ReferenceStats:
    """Per-channel moments and a sample of the pooled embeddings of the good training images."""

    n_images: int
    mean: np.ndarray  # (D,)
    var: np.ndarray  # (D,)
    sample: np.ndarray  # (k, D), k <= MAX_SAMPLE
    seed: int = 0
    # Minimum mean |z| of a window's channel means for the feature test to vote (see above).
    effect_floor: float = DEFAULT_EFFECT_FLOOR

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def standardize(self, pooled: np.ndarray) -> np.ndarray:
        """Centre and scale pooled vectors by the reference moments (channels comparable)."""
        pooled = np.asarray(pooled, dtype=np.float64)
        if pooled.ndim != 2 or pooled.shape[1] != self.dim:
            raise ValueError(
                f"pooled embeddings have shape {pooled.shape}, the reference has {self.dim} "
                "channels"
            )
        return (pooled - self.mean) / np.sqrt(np.maximum(self.var, MIN_VARIANCE))

    def to_dict(self) -> dict[str, Any]:
        sample = np.ascontiguousarray(self.sample, dtype="<f2")
        return {
            "version": REFERENCE_VERSION,
            "kind": "pooled_patch_embeddings",
            "n_images": int(self.n_images),
            "dim": self.dim,
            "seed": int(self.seed),
            "mean": [float(v) for v in self.mean],
            "var": [float(v) for v in self.var],
            "sample_shape": list(sample.shape),
            "sample_dtype": "float16",
            "pooled_sample": base64.b64encode(sample.tobytes()).decode("ascii"),
            # Added without a version bump: older readers ignore unknown keys.
            "effect_floor": float(self.effect_floor),
            "effect_floor_quantile": EFFECT_FLOOR_QUANTILE,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceStats:
        """Parse stored statistics; malformed data raises ModelFileError."""
        try:
            version = int(data["version"])
            if version > REFERENCE_VERSION:
                raise ModelFileError(
                    f"drift reference statistics version {version} is newer than this "
                    f"defectscope supports ({REFERENCE_VERSION}); upgrade defectscope"
                )
            mean = np.asarray(data["mean"], dtype=np.float64)
            var = np.asarray(data["var"], dtype=np.float64)
            rows, dim = (int(v) for v in data["sample_shape"])
            raw = base64.b64decode(data["pooled_sample"], validate=True)
            sample = np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(rows, dim)
            floor = float(data.get("effect_floor", DEFAULT_EFFECT_FLOOR))
            if not np.isfinite(floor) or floor < 0:
                raise ValueError(f"effect_floor {floor}")
            stats = cls(int(data["n_images"]), mean, var, sample, int(data.get("seed", 0)), floor)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"drift reference statistics are malformed ({exc})") from None
        if mean.shape != (dim,) or var.shape != (dim,) or rows < 2:
            raise ModelFileError("drift reference statistics are malformed (inconsistent shapes)")
        return stats


def compute_reference(
    pooled: np.ndarray, max_sample: int = MAX_SAMPLE, seed: int = 0
) -> ReferenceStats:
    """Reference statistics from the pooled embeddings (N, D) of the good training images."""
    pooled = np.asarray(pooled, dtype=np.float64)
    if pooled.ndim != 2 or pooled.shape[0] < 2:
        raise ValueError(f"need pooled embeddings of at least 2 images, got shape {pooled.shape}")
    n, dim = pooled.shape
    rows = min(n, max_sample, max(2, MAX_SAMPLE_VALUES // dim))
    # A seeded random subset rather than the first rows: training lists are often sorted by
    # time or station, and the sample must represent all of them.
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
    stats = ReferenceStats(
        n_images=n,
        mean=pooled.mean(axis=0),
        var=pooled.var(axis=0, ddof=1),
        sample=pooled[chosen].astype(np.float32),
        seed=seed,
    )
    stats.effect_floor = compute_effect_floor(stats, pooled)
    return stats


def compute_effect_floor(stats: ReferenceStats, pooled: np.ndarray) -> float:
    """The feature test's effect-size floor from the training images' own spread.

    Per image, the mean absolute standardised deviation from the training mean; the floor is
    its ``EFFECT_FLOOR_QUANTILE`` quantile (with few images, close to the largest).
    """
    per_image = np.mean(np.abs(stats.standardize(pooled)), axis=1)
    return float(np.quantile(per_image, EFFECT_FLOOR_QUANTILE))


def reference_summary(embeddings: torch.Tensor, seed: int = 0) -> dict[str, Any] | None:
    """What ``Detector.fit`` stores: the JSON-able reference of its training embeddings.

    None when there are fewer than 2 images (no spread to compare against).
    """
    if embeddings.ndim != 4 or embeddings.shape[0] < 2:
        return None
    return compute_reference(pool_embeddings(embeddings), seed=seed).to_dict()


class PooledEmbeddings(NamedTuple):
    """Per-image pooled embeddings (N, D), as in the drift reference, and image scores (N,)."""

    embeddings: np.ndarray
    scores: np.ndarray


@torch.inference_mode()
def embed_pooled(
    engine: Any,
    preprocessor: Any,
    images: list[Any],
    batch_size: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> PooledEmbeddings:
    """Pooled embeddings and image scores of ``images`` through a fitted ``engine`` (a
    `TorchEngine`) in one forward pass per batch; an unreadable image raises its error."""
    from defectscope.data.loading import iter_loaded

    pooled: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    done = 0
    for batch in iter_loaded(images, batch_size):
        for item in batch:
            if item.error is not None:
                raise item.error
        # No error left: every LoadedImage of the batch holds its image.
        arrays = [item.image for item in batch if item.image is not None]
        _, batch_scores, embeddings = engine.score_and_embed(preprocessor(arrays))
        pooled.append(pool_embeddings(embeddings))
        scores.append(batch_scores.float().cpu().numpy())
        done += len(batch)
        if progress:
            progress("predict", done, len(images))
    dim = engine.scorer.bank.shape[1]
    features = np.concatenate(pooled) if pooled else np.empty((0, dim), np.float32)
    return PooledEmbeddings(features, np.concatenate(scores) if scores else np.empty(0, np.float32))
