"""Validated configuration of a detector.

Every field has a default that works on the embedded backbone; configs load from plain dicts or
YAML and report bad values with the field path and the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defectscope.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Section):
    name: str = Field("tf_efficientnet_lite0", description="timm model name.")
    weights: str = Field(
        "default",
        description=(
            "'default' (weights shipped in a Python package), 'hub' (timm hub, needs internet), "
            "'random', "
            "or a path to a .pth/.pt/.safetensors file (Meta's DINOv3 format is converted)."
        ),
    )
    layers: list[int] | None = Field(
        None,
        description="Feature layer indices (timm forward_intermediates); None = family default.",
    )


class FeatureConfig(_Section):
    input_size: tuple[int, int] = Field((256, 256), description="Network input (height, width).")
    aspect: Literal["auto", "stretch", "pad"] = Field(
        "auto",
        description="'stretch' resizes to input_size; 'pad' keeps the aspect and pads; 'auto' "
        "decides at fit time from the training images' sizes (pad when their shapes differ; "
        "an input of the images' shape when they share one elongated shape).",
    )
    padding: Literal["reflect", "mean"] = Field(
        "reflect",
        description="With aspect='pad': 'reflect' mirrors the image into the padding (no "
        "content edge whose place varies by image); 'mean' fills with the mean colour.",
    )
    large_image_scale: float = Field(
        2.0,
        ge=1.0,
        le=4.0,
        description="With aspect='auto': the most a large image's input may grow, as a "
        "multiple of input_size (cost grows with its square; see max_downscale); 1 = never.",
    )
    max_downscale: float | None = Field(
        1.6,
        ge=1.0,
        le=16.0,
        description="With aspect='auto': the input grows (within large_image_scale) until the "
        "median image is shrunk at most this much (by its short side when stretched, by its fit "
        "in the canvas when padded), so 512 px images are fed at 320 and small defects keep a "
        "few patches. None: only images shrunk at least 3x get a larger input.",
    )
    neighbourhood: int = Field(
        1, ge=1, le=9, description="Local aggregation window in patches (PatchCore uses 3)."
    )
    normalize: Literal["l2", "power", "none"] = Field(
        "l2",
        description="'l2' scales each layer's patch vectors to unit length, so that layers weigh "
        "equally in distances whatever their width and activation scale; 'none' keeps the "
        "activation strength; 'power' divides each vector by its length to features.norm_power, "
        "keeping part of the strength.",
    )
    norm_power: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="With normalize='power': each layer's patch vectors are divided by their "
        "length to this power (0 would be raw features, 1 unit length).",
    )
    embedding_dim: int | None = Field(
        None, ge=8, description="Reduce patch features to this many dims (adaptive pooling)."
    )
    layer_weights: list[Annotated[float, Field(gt=0.0, le=1e6)]] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="Multiply each backbone layer's patch vectors by these weights, one per "
        "layer, after normalisation. Auto mode's balanced candidates set them so that "
        "every layer has one mean norm on the training images.",
    )
    half_scale: bool = Field(
        False,
        description="Also run the backbone on the input at half size and add those layers to "
        "each patch's features: context over twice the area, for large low-contrast defects "
        "(about 1.25x the backbone cost, a bank twice as wide).",
    )
    half_size_bank: float = Field(
        0.5,
        ge=0.0,
        le=4.0,
        description="Weight of a second memory bank, fitted on the image at half size (its "
        "own coreset and calibration on a grid half as fine), whose map and score are added to "
        "the full-size ones, each in units of its own threshold on good images: larger defects "
        "and low-contrast regions stand out at the coarser scale (see detector.scales). 0: one "
        "bank. On a CPU the fit takes about 1.1x as long, a prediction about 1.4x.",
    )
    input_pooling: Literal[1, 2] = Field(
        1,
        description="The backbone sees the input averaged over this many pixels per side: 2 is "
        "the half-size bank's coarser view of the same input (set by the fit, not by hand).",
    )

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 32 or max(value) > 2048:
            raise ValueError("each side must be between 32 and 2048 pixels")
        return value


class CoresetConfig(_Section):
    method: Literal["greedy", "sharded", "random", "none"] = Field(
        "sharded",
        description="'greedy' exact k-center; 'sharded' per-shard greedy (fast, bounded memory); "
        "'random' subsample; 'none' keeps every patch.",
    )
    ratio: float = Field(0.02, gt=0.0, le=1.0, description="Fraction of patches to keep.")
    size: int | None = Field(None, ge=1, description="Absolute bank size; overrides ratio.")
    projection_dim: int | None = Field(
        128, ge=4, description="Random projection used only for selection; None = no projection."
    )
    shard_size: int = Field(16384, ge=256, description="Patches per shard for 'sharded'.")
    min_size: int | None = Field(
        5_000,
        ge=1,
        description="Lower bound on the bank size whatever ratio gives (every patch where there "
        "are fewer): a small training set's 2 % leaves textures thinly covered, and the bank "
        "then depends on the coreset's draw. max_size wins over it; the half-size bank's "
        "bound is a quarter of it. None = no bound.",
    )
    max_size: int | None = Field(
        10_000,
        ge=1,
        description="Upper bound on the bank size whatever ratio gives (bounds the coreset time "
        "and the predict latency of large training sets); None = no bound. Not for 'none'.",
    )
    seed: int = 0


class ScoringConfig(_Section):
    k: int = Field(1, ge=1, le=64, description="Nearest neighbours averaged into a patch score.")
    reduction: Literal["max", "topk_mean", "patchcore"] = "max"
    topk_fraction: float = Field(0.01, gt=0.0, le=1.0, description="For 'topk_mean'.")
    reweight_neighbours: int = Field(
        3,
        ge=2,
        description="For 'patchcore' re-weighting (the nearest bank patch and its neighbours).",
    )
    smoothing_sigma: float = Field(4.0, ge=0.0, description="Gaussian sigma in input pixels.")
    edge_correction: bool = Field(
        True,
        description="Score the grid's outer patches on the inner ones' scale, as learned from "
        "the training images' leave-one-out scores (one-pass banks, leave-one-out fits).",
    )
    knn_backend: Literal["auto", "torch", "faiss", "faiss_ivf", "faiss_hnsw", "faiss_ivfpq"] = (
        Field(
            "auto",
            description="'torch'/'faiss' exact search; 'faiss_ivf', 'faiss_hnsw', 'faiss_ivfpq' "
            "approximate (built from the bank at load time; leave-one-out calibration stays "
            "exact); 'auto' = torch, or exact faiss from faiss_min_bank rows.",
        )
    )
    faiss_min_bank: int = Field(
        200_000, ge=1, description="'auto' uses faiss (when installed) from this bank size."
    )
    chunk_size: int = Field(1024, ge=64, description="Query patches per distance block.")
    ivf_nlist: int | None = Field(
        None,
        ge=1,
        description="IVF lists for 'faiss_ivf'/'faiss_ivfpq'; None = about 4 * sqrt(bank rows).",
    )
    ivf_nprobe: int = Field(8, ge=1, description="IVF lists visited per query.")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW graph degree for 'faiss_hnsw'.")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW build-time beam width.")
    hnsw_ef_search: int = Field(64, ge=1, description="HNSW search beam width (recall vs time).")
    pq_m: int = Field(
        8, ge=1, description="'faiss_ivfpq' sub-quantizers; must divide the feature size."
    )
    pq_bits: int = Field(8, ge=4, le=12, description="'faiss_ivfpq' bits per sub-quantizer code.")


class CalibrationConfig(_Section):
    method: Literal["leave_one_out", "holdout", "in_sample"] = Field(
        "leave_one_out",
        description="'leave_one_out' scores each training image against the bank without its own "
        "patches; 'holdout' keeps a fraction of the images out of the bank; "
        "'in_sample' scores the training images as they are (biased low, fastest).",
    )
    holdout_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    tail_spread: float = Field(
        1.2,
        ge=1.0,
        le=4.0,
        description="With 'leave_one_out': the threshold's distance above the median good score "
        "is the quantile's times this (and extrapolated where there are too few images for the "
        "quantile). Leave-one-out scores spread less above their median than new good images' "
        "(2,400 new good images of eight kinds of product: 3.7 % flagged for a 1 % target with "
        "1.0, 1.5 % with 1.2, 1.1 % with 1.3). 1.0: the plain quantile.",
    )
    false_alarm_rate: float = Field(
        0.01, gt=0.0, lt=0.5, description="Target share of good images flagged at the threshold."
    )
    max_images: int = Field(
        1000,
        ge=2,
        description="Calibrate on a seeded sample of at most this many of the (held-out) "
        "training images: bounds calibration time and the embeddings kept for it.",
    )


class FitConfig(_Section):
    drop_suspects: bool = Field(
        False,
        description="Fit once more without the training images the first fit names as "
        "suspects (scored far above the others, like defects), so that their patches cannot "
        "hide defects like them; the model records them under training.dropped. Costs a "
        "second fit where there are suspects.",
    )
    chunk_images: int = Field(
        256,
        ge=1,
        description="Images embedded per chunk (shard): a chunk's embeddings are the largest "
        "array alive during fit. A set of at most this many images is fitted in one pass.",
    )
    oversample: float = Field(
        2.0,
        ge=1.0,
        le=16.0,
        description="Each chunk keeps this many times its share of the bank as coreset "
        "candidates for the final selection over all chunks.",
    )
    ram_budget_mb: int = Field(
        1024,
        ge=0,
        description="Candidates and calibration embeddings kept during fit beyond this many MiB "
        "go to a memory-mapped temporary file (deleted after fit).",
    )
    spill_dir: str | None = Field(
        None, description="Folder for those temporary files; None = the system temp folder."
    )


class AutoConfig(_Section):
    enabled: bool = Field(
        True,
        description="Choose the feature aggregation at fit time from synthetic defects painted "
        "on held-out good images (see defectscope.detector.selection).",
    )
    candidates: list[
        Literal["raw", "l2", "raw_pool3", "l2_pool3", "raw_balanced", "power_balanced"]
    ] = Field(
        ["l2", "power_balanced"],
        min_length=1,
        description="Candidates in order of preference: a later one must win by a margin. "
        "'power_balanced' is features divided by their length to features.norm_power, each "
        "layer at one mean norm (features.layer_weights); 'raw_balanced' the same on raw "
        "features; plain 'raw' and the pooled ones are off by default: they chose worse on "
        "the benchmark.",
    )
    reductions: list[Literal["max", "topk_mean"]] = Field(
        ["max"],
        min_length=1,
        description="Image scores compared for each candidate, in order of preference (the "
        "same maps, so free to vary): 'max' suits tiny defects, 'topk_mean' ignores a lone "
        "noisy patch on a good image. Only 'max' by default: synthetic defects chose "
        "'topk_mean' by chance on tiny spots, where it loses them.",
    )
    min_images: int = Field(
        20,
        ge=3,
        description="With fewer training images the configuration is kept as given: a quarter "
        "of them is held out, and fewer held-out images make the comparison noise.",
    )
    holdout_images: int = Field(
        10, ge=2, description="Good images held out for synthetic defects (at most 1/4)."
    )
    bank_images: int = Field(
        400,
        ge=1,
        description="Training images whose features make the candidates' banks (every image of "
        "a smaller set); the fit reuses their backbone pass.",
    )
    defects_per_image: int = Field(
        6,
        ge=1,
        le=10,
        description="Synthetic defects painted on each held-out image. Fewer let the draw "
        "decide between close candidates.",
    )
    known_defects: str | None = Field(
        None,
        description="A folder (searched recursively) or one image of real defective images of "
        "the product. When given, candidates are judged on them instead of synthetic defects "
        "(image AUROC against the held-out good images; at most 64 are read).",
    )
    min_known_defects: int = Field(
        5,
        ge=1,
        description="Fewer known defects than this are not used (synthetic defects decide, and "
        "the reason says so): with three, one draw chose raw features on a gravel texture and "
        "lost 0.14 image AUROC.",
    )
    min_known_separation: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Known defects decide only if the candidate they favour separates them from "
        "the held-out good images at least this well (image AUROC); below, a handful cannot "
        "rank candidates (five gravel defects at 0.72 chose raw features and lost 0.17), and "
        "synthetic defects decide.",
    )
    try_half_scale: bool = Field(
        True,
        description="With known_defects and no half-size bank (features.half_size_bank=0), "
        "also try the chosen candidate with the image at half size too (features.half_scale) "
        "and keep it if it separates them better by the margin. "
        "Synthetic defects cannot make this choice: they do not show a product's defect sizes.",
    )
    size_probe_images: int = Field(
        64, ge=1, description="Images whose sizes decide the geometry (aspect='auto')."
    )
    seed: int = 0


class FewShotConfig(_Section):
    enabled: bool = Field(
        True,
        description="Fit sets of fewer than auto.min_images images the few-shot way: a bank of "
        "every patch (up to bank_size), flipped/rotated views where synthetic defects show they "
        "help (see defectscope.detector.few_shot), and thresholds that work from one image.",
    )
    augmentation: Literal["auto", "none", "flips", "rot90", "rot45", "rot30"] = Field(
        "auto",
        description="Views of each training image in the bank: 'auto' compares 'none' with "
        "`candidates` on synthetic defects; 'flips' = mirror images and 180 degrees; 'rot90', "
        "'rot45', 'rot30' = rotations in those steps (square inputs only).",
    )
    candidates: list[Literal["flips", "rot90", "rot45", "rot30"]] = Field(
        ["flips", "rot90", "rot45"],
        description="View sets compared with 'none' in order: each must beat the one kept so "
        "far by `margin`.",
    )
    margin: float = Field(
        0.02,
        ge=0.0,
        le=0.5,
        description="Objective (mean of synthetic image and pixel AUROC) a view set must gain "
        "over the one kept so far: more views also make defects easier to explain away.",
    )
    bank_size: int = Field(
        16384,
        ge=1,
        description="Few-shot banks keep every patch up to this many rows, whatever "
        "coreset.ratio and coreset.max_size say (a 2 % coreset of one image is 20 patches).",
    )
    calibration: Literal["auto", "leave_one_out", "views", "halves"] = Field(
        "auto",
        description="'leave_one_out' scores jittered views of each image against the bank "
        "without any of its views (needs 2 images); 'views' scores jittered views that are not "
        "in the bank; "
        "'halves' (one image) scores each half of the image against the views of the rest "
        "of it; 'auto' = leave_one_out from loo_min_images images, halves below.",
    )
    loo_min_images: int = Field(
        2, ge=2, description="With 'auto' calibration: leave-one-out from this many images."
    )
    calibration_views: int = Field(
        8,
        ge=1,
        le=64,
        description="Jittered views per training image for 'views' and 'leave_one_out' "
        "calibration.",
    )
    folds: int = Field(
        4,
        ge=1,
        le=19,
        description="Held-out images for the choice of views (each one scored against the "
        "others' views; with one image, its four halves against the rest of it).",
    )
    defects_per_image: int = Field(6, ge=1, le=20)
    seed: int = 0


def check_device(device: str) -> str:
    """``device`` if it names one a detector can run on; ConfigError otherwise."""
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", device)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


class DetectorConfig(_Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    coreset: CoresetConfig = Field(default_factory=CoresetConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)
    few_shot: FewShotConfig = Field(default_factory=FewShotConfig)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    batch_size: int = Field(16, ge=1, le=1024)
    half_precision: bool = Field(False, description="fp16 backbone on CUDA.")

    @model_validator(mode="after")
    def _check_device(self) -> DetectorConfig:
        # ConfigError, not ValueError: pydantic lets it through unwrapped, so a bad --device is
        # one clear line also when it is assigned after validation.
        check_device(self.device)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DetectorConfig:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> DetectorConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data.get("detector", data) if data else {})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)
