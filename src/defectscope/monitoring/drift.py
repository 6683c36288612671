"""Drift detection: is a window of recent inputs still distributed like the training images?

Two tests decide the verdict, one per signal the model stores at fit time:

``score_ks``
    two-sample Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`, two-sided) between the
    window's image scores and the out-of-sample scores of the good training images
    (``calibration.good_scores``). Effect size: the KS statistic D (largest CDF gap, 0-1).
``feature_mmd``
    kernel two-sample test on pooled patch embeddings (one vector per image, standardised by the
    reference's per-channel mean and variance): unbiased MMD² with a Gaussian (RBF) kernel of
    median-heuristic bandwidth (:func:`sklearn.metrics.pairwise.rbf_kernel`) and a permutation
    p-value. Effect sizes: MMD² and the mean absolute standardised shift of channel means
    (``mean_abs_z``). The test only votes for warning/drift when ``mean_abs_z`` also reaches the
    reference's effect-size floor (see :mod:`defectscope.detector.reference`): large windows
    make tiny, harmless differences significant, and a drift alarm should mean the images
    changed by more than good images vary among themselves.

Verdict (:class:`DriftThresholds`): the p-values are Bonferroni-adjusted for the two tests;
``drift`` when an adjusted p-value is below 0.001, ``warning`` below 0.01, else ``ok``. So on a
stationary stream a window raises a warning or worse with probability <= 1% (both tests are
exact or conservative under the null), and ``drift`` needs overwhelming evidence (<= 0.1%).
A test whose p-value cannot reach the drift level with the given data (tiny samples) says so
in the notes.

Two more numbers are reported but do not vote:

``score_psi``
    population stability index of the scores over the reference deciles, with the usual bands
    (< 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift). PSI has no sampling theory and is
    biased upwards on small windows (about (bins - 1) / n under no drift: 0.9 for 10 images),
    so it is an effect size here, not a decision rule.
``alarm_rate``
    share of window images at or above the model's image threshold, with a one-sided binomial
    test (:func:`scipy.stats.binomtest`) against the calibrated false-alarm rate. It rises with
    drift *and* with a real rise in defects, so it cannot tell them apart on its own.

Score tests react to any change in what the model sees, including more defective parts; the
feature test reacts to a change of the images as a whole (light, focus, camera pose) and barely
to small local defects. Read them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats
from scipy.spatial.distance import pdist
from sklearn.metrics.pairwise import rbf_kernel

from defectscope.detector.reference import ReferenceStats

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector
from defectscope.errors import DefectscopeError, ModelFileError

VERDICTS = ("ok", "warning", "drift")
VOTING_TESTS = ("score_ks", "feature_mmd")
# Larger windows are randomly subsampled for the MMD: its cost grows with the square of the
# images compared, and 512 images already detect shifts far smaller than the ones that matter.
MAX_MMD_WINDOW = 512


class DriftError(DefectscopeError):
    """A drift check cannot run (window too small, no reference statistics, bad input)."""


class MissingReferenceError(DriftError):
    """The model file predates drift reference statistics."""


@dataclass(frozen=True)
class DriftThresholds:
    """Decision levels of the drift verdict (documented in the module docstring)."""

    warning_p: float = 0.01
    drift_p: float = 0.001
    min_window: int = 10
    permutations: int = 4000
    psi_bins: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.drift_p <= self.warning_p < 1:
            raise DriftError("drift thresholds need 0 < drift_p <= warning_p < 1")
        if self.min_window < 2:
            raise DriftError("min_window must be at least 2 images")
        if self.permutations < 100:
            raise DriftError("use at least 100 permutations for the MMD p-value")
        if self.psi_bins < 2:
            raise DriftError("psi_bins must be at least 2")


@dataclass
class DriftTest:
    name: str
    statistic: float
    p_value: float | None
    adjusted_p: float | None
    verdict: str | None  # None: reported, does not vote
    effect: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriftReport:
    verdict: str
    n_window: int
    tests: list[DriftTest]
    thresholds: DriftThresholds
    notes: list[str] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)

    def test(self, name: str) -> DriftTest:
        for item in self.tests:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "n_window": self.n_window,
            "tests": {
                t.name: {k: v for k, v in asdict(t).items() if k != "name"} for t in self.tests
            },
            "thresholds": asdict(self.thresholds),
            "reference": self.reference,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------ statistics
def ks_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """Two-sided two-sample KS test: (statistic D, p-value)."""
    result = stats.ks_2samp(np.asarray(reference, float), np.asarray(window, float))
    return float(result.statistic), float(result.pvalue)


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``window`` against ``reference`` over reference quantiles.

    Bins are the reference's quantiles (open-ended at both sides), so each holds ~1/bins of the
    reference. Counts get half a pseudo-count per bin (Jeffreys smoothing): an empty bin in a
    small window then costs a bounded amount instead of the arbitrary floor's log(1e-4).
    """
    reference = np.asarray(reference, dtype=np.float64)
    window = np.asarray(window, dtype=np.float64)
    if reference.size == 0 or window.size == 0:
        raise DriftError("PSI needs non-empty reference and window")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    k = edges.size + 1
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=k) + 0.5
    actual = np.bincount(np.searchsorted(edges, window, side="right"), minlength=k) + 0.5
    p = expected / expected.sum()
    q = actual / actual.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def mmd_test(
    reference: np.ndarray,
    window: np.ndarray,
    permutations: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """RBF-kernel MMD two-sample test: (unbiased MMD², permutation p-value, kernel gamma).

    The bandwidth is the median heuristic on the pooled sample (gamma = 1 / median squared
    distance). The p-value is (1 + #{permuted MMD² >= observed}) / (1 + permutations), which
    is exact under the null of exchangeability.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(window, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DriftError(f"MMD needs two (n, d) arrays of equal d, got {x.shape} and {y.shape}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise DriftError("MMD needs at least 2 samples on each side")
    joint = np.concatenate([x, y])
    sq = pdist(joint, "sqeuclidean")
    median = float(np.median(sq[sq > 0])) if np.any(sq > 0) else 1.0
    gamma = 1.0 / median
    kernel = rbf_kernel(joint, gamma=gamma)
    np.fill_diagonal(kernel, 0.0)  # unbiased estimator: no self-similarities
    total = kernel.sum()

    def statistic(in_x: np.ndarray) -> np.ndarray:
        # in_x: (P, N) 0/1 membership of the first sample. Sums over the kernel blocks follow
        # from two matrix products, so all permutations cost one (P, N) x (N, N) product.
        s_xx = np.einsum("pn,pn->p", in_x @ kernel, in_x)
        s_xy = (in_x @ kernel).sum(axis=1) - s_xx
        s_yy = total - s_xx - 2.0 * s_xy
        return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2.0 * s_xy / (m * n)

    observed_membership = np.zeros((1, m + n))
    observed_membership[0, :m] = 1.0
    observed = float(statistic(observed_membership)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, 500):
        count = min(500, permutations - start)
        order = rng.permuted(np.tile(np.arange(m + n), (count, 1)), axis=1)
        membership = (order < m).astype(np.float64)
        exceed += int(np.sum(statistic(membership) >= observed - 1e-12))
    return observed, (1 + exceed) / (1 + permutations), gamma


def _verdict(adjusted_p: float, thresholds: DriftThresholds) -> str:
    if adjusted_p < thresholds.drift_p:
        return "drift"
    if adjusted_p < thresholds.warning_p:
        return "warning"
    return "ok"


def worst(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=VERDICTS.index, default="ok")


# ------------------------------------------------------------------------------- detector
class DriftDetector:
    """Compares windows of (image scores, pooled embeddings) with a model's reference."""

    def __init__(
        self,
        reference: ReferenceStats,
        good_scores: Sequence[float] | np.ndarray,
        *,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        thresholds: DriftThresholds | None = None,
        seed: int = 0,
    ) -> None:
        self.reference = reference
        self.good_scores = np.asarray(good_scores, dtype=np.float64)
        if self.good_scores.size < 2:
            raise MissingReferenceError(
                "the model stores fewer than 2 good-image scores: nothing to compare with"
            )
        self.threshold = threshold
        self.false_alarm_rate = false_alarm_rate
        self.thresholds = thresholds or DriftThresholds()
        self.seed = seed

    @classmethod
    def from_detector(
        cls, detector: Detector, thresholds: DriftThresholds | None = None, seed: int = 0
    ) -> DriftDetector:
        """From a fitted or loaded ``Detector``; a model without reference stats is refused."""
        data = detector.info.reference
        if not data:
            raise MissingReferenceError(
                "this model has no drift reference statistics (it was saved by a defectscope "
                "without drift monitoring); refit it with `defectscope fit` to enable drift checks"
            )
        try:
            reference = ReferenceStats.from_dict(data)
        except ModelFileError as exc:
            raise MissingReferenceError(str(exc)) from None
        calibration = detector.calibration
        if calibration is None:
            raise MissingReferenceError("the detector is not fitted: call fit() or load() first")
        return cls(
            reference,
            calibration.good_scores,
            threshold=float(detector.threshold),
            false_alarm_rate=float(calibration.false_alarm_rate),
            thresholds=thresholds,
            seed=seed,
        )

    def check(self, scores: np.ndarray, pooled: np.ndarray) -> DriftReport:
        """Test one window: ``scores`` (n,) image scores and ``pooled`` (n, D) embeddings."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        pooled = np.asarray(pooled, dtype=np.float64)
        limits = self.thresholds
        n = scores.size
        if pooled.ndim != 2 or pooled.shape[0] != n:
            raise DriftError(f"window has {n} scores but pooled embeddings of shape {pooled.shape}")
        if n < limits.min_window:
            raise DriftError(
                f"drift window too small: {n} image(s), need at least {limits.min_window} for "
                "the tests to mean anything"
            )
        if not np.all(np.isfinite(scores)) or not np.all(np.isfinite(pooled)):
            raise DriftError("window contains non-finite scores or embeddings")
        if pooled.shape[1] != self.reference.dim:
            raise DriftError(
                f"pooled embeddings have {pooled.shape[1]} channels, the model's reference "
                f"{self.reference.dim}: were they computed with this model?"
            )
        notes: list[str] = []
        n_votes = len(VOTING_TESTS)
        ks, psi_test, rate_test = self._score_tests(scores, n_votes)

        x = self.reference.standardize(self.reference.sample)
        y = self.reference.standardize(pooled)
        if len(y) > MAX_MMD_WINDOW:
            rows = np.random.default_rng(self.seed).choice(len(y), MAX_MMD_WINDOW, replace=False)
            y_mmd = y[np.sort(rows)]
            notes.append(f"MMD on a random {MAX_MMD_WINDOW} of the {n} window images")
        else:
            y_mmd = y
        mmd2, p_mmd, gamma = mmd_test(x, y_mmd, limits.permutations, self.seed)
        mmd_adj = min(1.0, p_mmd * n_votes)
        # Channel means of the window in reference standard deviations.
        mean_abs_z = float(np.mean(np.abs(y.mean(axis=0))))
        floor = float(self.reference.effect_floor)
        mmd_verdict = _verdict(mmd_adj, limits)
        below_floor = mean_abs_z < floor
        if below_floor and mmd_verdict != "ok":
            notes.append(
                f"feature_mmd is significant (adjusted p {mmd_adj:.2g}) but its effect (mean |z| "
                f"{mean_abs_z:.2f}) is below the floor {floor:.2f}: not counted as drift"
            )
            mmd_verdict = "ok"
        mmd = DriftTest(
            "feature_mmd",
            mmd2,
            p_mmd,
            mmd_adj,
            mmd_verdict,
            effect={
                "mmd2": mmd2,
                "mean_abs_z": mean_abs_z,
                "max_abs_z": float(np.max(np.abs(y.mean(axis=0)))),
                "effect_floor": floor,
            },
            detail={
                "n_reference": len(x),
                "n_window": len(y_mmd),
                "gamma": gamma,
                "permutations": limits.permutations,
                "below_effect_floor": below_floor,
            },
        )
        smallest_p = 1.0 / (1 + limits.permutations)
        if smallest_p * n_votes >= limits.drift_p:
            notes.append(
                f"with {limits.permutations} permutations the MMD test cannot reach the drift "
                "level; it can at most warn"
            )

        tests = [t for t in (ks, mmd, psi_test, rate_test) if t is not None]

        if self.good_scores.size < 20 or self.reference.sample.shape[0] < 20:
            notes.append(
                "the reference holds fewer than 20 images: the tests can only see large shifts"
            )

        verdict = worst([t.verdict for t in tests if t.verdict is not None])
        return DriftReport(
            verdict=verdict,
            n_window=n,
            tests=tests,
            thresholds=limits,
            notes=notes,
            reference={
                "n_good_scores": int(self.good_scores.size),
                "n_feature_sample": int(self.reference.sample.shape[0]),
                "n_training_images": int(self.reference.n_images),
                "feature_dim": self.reference.dim,
            },
        )

    def _score_tests(
        self, scores: np.ndarray, n_votes: int
    ) -> tuple[DriftTest, DriftTest, DriftTest | None]:
        """KS (voting, Bonferroni over ``n_votes``), PSI and alarm rate (reported) on scores."""
        limits = self.thresholds
        n = scores.size
        d, p_ks = ks_test(self.good_scores, scores)
        ks_adj = min(1.0, p_ks * n_votes)
        median_ref = float(np.median(self.good_scores))
        ks = DriftTest(
            "score_ks",
            d,
            p_ks,
            ks_adj,
            _verdict(ks_adj, limits),
            effect={
                "ks_d": d,
                "median_shift": float(np.median(scores)) - median_ref,
                "median_ratio": float(np.median(scores)) / median_ref if median_ref else np.nan,
            },
            detail={"n_reference": int(self.good_scores.size), "n_window": n},
        )

        value = psi(self.good_scores, scores, limits.psi_bins)
        band = "stable" if value < 0.1 else "moderate" if value < 0.25 else "major"
        psi_test = DriftTest(
            "score_psi",
            value,
            None,
            None,
            None,
            effect={"psi": value},
            detail={
                "bins": limits.psi_bins,
                "band": band,
                "expected_under_no_drift": (limits.psi_bins - 1)
                * (1.0 / n + 1.0 / self.good_scores.size),
            },
        )
        rate_test = None

        if self.threshold is not None and self.false_alarm_rate is not None:
            flagged = int(np.sum(scores >= self.threshold))
            rate = self.false_alarm_rate
            p_rate = float(stats.binomtest(flagged, n, rate, alternative="greater").pvalue)
            rate_test = DriftTest(
                "alarm_rate",
                flagged / n,
                p_rate,
                None,
                None,
                effect={"alarm_rate": flagged / n, "calibrated_rate": rate},
                detail={"flagged": flagged, "threshold": self.threshold},
            )
        return ks, psi_test, rate_test

    def check_scores(self, scores: np.ndarray) -> DriftReport:
        """Test a window of image scores alone (no embeddings, e.g. from the prediction log).

        Only ``score_ks`` votes, so it is not Bonferroni-adjusted; the feature test is absent.
        """
        scores = np.asarray(scores, dtype=np.float64).ravel()
        limits = self.thresholds
        n = scores.size
        if n < limits.min_window:
            raise DriftError(
                f"drift window too small: {n} image(s), need at least {limits.min_window} for "
                "the tests to mean anything"
            )
        if not np.all(np.isfinite(scores)):
            raise DriftError("window contains non-finite scores")
        ks, psi_test, rate_test = self._score_tests(scores, 1)
        tests = [t for t in (ks, psi_test, rate_test) if t is not None]
        notes = ["score tests only: the feature test needs pooled embeddings of the window"]
        if self.good_scores.size < 20:
            notes.append("the reference holds fewer than 20 good scores: only large shifts show")
        return DriftReport(
            verdict=worst([t.verdict for t in tests if t.verdict is not None]),
            n_window=n,
            tests=tests,
            thresholds=limits,
            notes=notes,
            reference={"n_good_scores": int(self.good_scores.size)},
        )

    def check_images(
        self, detector: Any, images: Sequence[Any], progress: Any = None
    ) -> DriftReport:
        """Score and embed ``images`` with ``detector`` (one pass), then :meth:`check` them."""
        images = list(images)
        if not images:
            raise DriftError("no images to check for drift")
        if len(images) < self.thresholds.min_window:
            raise DriftError(
                f"drift window too small: {len(images)} image(s), need at least "
                f"{self.thresholds.min_window}"
            )
        pooled, scores = detector.pooled_embeddings(images, progress=progress)
        return self.check(scores, pooled)
