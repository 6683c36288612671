"""Deterministic image transforms for drift studies (`augmented_copy` writes whole datasets).

Every transform is a pure function of (image, strength parameters) on RGB uint8 (H, W, 3) arrays.
The geometric ones (:func:`rotate`, :func:`shift`) also take bool (H, W) masks, which they move
with nearest-neighbour sampling over exactly the same coordinate mapping, so a defect and its mask
stay aligned. Randomness exists only in :class:`Augmentation`: parameters given as ``(low, high)``
ranges are drawn per image from a generator seeded by (seed, the image's relative path), so a
copy is identical however often, and in whatever order, it is written.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import color

from defectscope.errors import ConfigError

# Our names for what lies beyond the border -> scipy's. "reflect" avoids black corners that a
# detector would flag as anomalies on their own.
FILL_MODES = {"reflect": "reflect", "constant": "constant", "edge": "nearest", "wrap": "grid-wrap"}
GEOMETRIC_OPS = frozenset({"rotate", "shift"})


def _geometric(
    array: np.ndarray,
    transform: Callable[[np.ndarray, int, str], np.ndarray],
    fill: str,
    nearest: bool,
) -> np.ndarray:
    if fill not in FILL_MODES:
        raise ConfigError(f"unknown fill {fill!r}; expected one of {', '.join(FILL_MODES)}")
    mode = FILL_MODES[fill]
    if array.dtype == np.bool_:
        return transform(array.astype(np.uint8), 0, mode).astype(bool)
    order = 0 if nearest else 1
    out = transform(array.astype(np.float32), order, mode)
    if array.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(array.dtype)


def rotate(
    image: np.ndarray, degrees: float, *, fill: str = "reflect", nearest: bool = False
) -> np.ndarray:
    """Rotate counter-clockwise (as displayed) about the image centre, keeping the size.

    Bool arrays (masks) are always sampled with nearest neighbour; ``nearest`` forces it for
    other arrays.
    """

    def transform(array: np.ndarray, order: int, mode: str) -> np.ndarray:
        return ndimage.rotate(array, degrees, axes=(1, 0), reshape=False, order=order, mode=mode)

    if degrees % 360 == 0:
        return image.copy()
    return _geometric(image, transform, fill, nearest)


def shift(
    image: np.ndarray,
    dx: float = 0.0,
    dy: float = 0.0,
    *,
    fill: str = "reflect",
    nearest: bool = False,
) -> np.ndarray:
    """Move the content ``dx`` pixels right and ``dy`` pixels down (a camera shift)."""

    def transform(array: np.ndarray, order: int, mode: str) -> np.ndarray:
        offset = (dy, dx) + (0,) * (array.ndim - 2)
        return ndimage.shift(array, offset, order=order, mode=mode)

    if dx == 0 and dy == 0:
        return image.copy()
    return _geometric(image, transform, fill, nearest)


def _to_float(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image.astype(np.float32)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale intensities by ``factor`` (1 = unchanged, 0 = black)."""
    return _to_uint8(_to_float(image) * factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level (1 = unchanged, 0 = flat grey)."""
    data = _to_float(image)
    mean = float(_gray(data).mean())
    return _to_uint8(mean + (data - mean) * factor)


def saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the greyscale image (1 = unchanged, 0 = grey)."""
    data = _to_float(image)
    gray = _gray(data)[..., None]
    return _to_uint8(gray + (data - gray) * factor)


def hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate hues by ``shift`` turns, in [-0.5, 0.5]."""
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift must be in [-0.5, 0.5], got {shift}")
    if shift == 0:
        return image.copy()
    hsv = color.rgb2hsv(_to_float(image) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    return _to_uint8(color.hsv2rgb(hsv) * 255.0)


# color_jitter's parameters shadow these names.
_brightness, _contrast, _saturation, _hue = brightness, contrast, saturation, hue


def color_jitter(
    image: np.ndarray,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
) -> np.ndarray:
    """Apply brightness, contrast and saturation factors and a hue shift, in that order."""
    out = _brightness(image, brightness)
    out = _contrast(out, contrast)
    out = _saturation(out, saturation)
    return _hue(out, hue)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each channel with a Gaussian of ``sigma`` pixels (a defocused lens)."""
    if sigma <= 0:
        return image.copy()
    return _to_uint8(ndimage.gaussian_filter(_to_float(image), sigma=(sigma, sigma, 0)))


def gaussian_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Add Gaussian noise of ``sigma`` grey levels (sensor noise); same seed, same noise."""
    data = _to_float(image)
    if sigma <= 0:
        return image.copy()
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=data.shape).astype(np.float32)
    return _to_uint8(data + noise)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "rotate": rotate,
    "shift": shift,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "hue": hue,
    "color_jitter": color_jitter,
    "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise,
}
# Parameters that belong to the pipeline, not to one op's strength.
_PIPELINE_PARAMS = {"image", "fill", "nearest", "seed"}


def _op_params(name: str) -> tuple[set[str], set[str]]:
    """(all strength parameters, required ones) of op ``name``."""
    signature = inspect.signature(OPS[name])
    names = {p for p in signature.parameters if p not in _PIPELINE_PARAMS}
    required = {p for p in names if signature.parameters[p].default is inspect.Parameter.empty}
    return names, required


ParamValue = float | tuple[float, float]


@dataclass(frozen=True)
class Op:
    """One named transform; a parameter is a number or a ``(low, high)`` uniform range."""

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPS:
            raise ConfigError(
                f"unknown augmentation {self.name!r}; expected one of {', '.join(OPS)}"
            )
        allowed, required = _op_params(self.name)
        unknown = set(self.params) - allowed
        if unknown:
            raise ConfigError(
                f"augmentation {self.name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                f"it takes {', '.join(sorted(allowed))}"
            )
        if required - set(self.params):
            raise ConfigError(
                f"augmentation {self.name!r} needs {', '.join(sorted(required - set(self.params)))}"
            )
        normalised: dict[str, ParamValue] = {}
        for key, value in self.params.items():
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or float(value[0]) > float(value[1]):
                    raise ConfigError(
                        f"{self.name}.{key}: a range must be [low, high], got {value}"
                    )
                normalised[key] = (float(value[0]), float(value[1]))
            else:
                normalised[key] = float(value)
        object.__setattr__(self, "params", normalised)

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        return {
            k: float(rng.uniform(*v)) if isinstance(v, tuple) else v for k, v in self.params.items()
        }


@dataclass(frozen=True)
class Augmentation:
    """An ordered list of ops; ``fill`` says what geometric ops show beyond the border."""

    ops: tuple[Op, ...]
    seed: int = 0
    fill: str = "reflect"

    def __post_init__(self) -> None:
        ops = tuple(_as_op(op) for op in self.ops)
        object.__setattr__(self, "ops", ops)
        if self.fill not in FILL_MODES:
            raise ConfigError(
                f"unknown fill {self.fill!r}; expected one of {', '.join(FILL_MODES)}"
            )

    @classmethod
    def single(cls, name: str, seed: int = 0, **params: ParamValue) -> Augmentation:
        return cls((Op(name, params),), seed=seed)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Augmentation:
        """From ``{"seed": 0, "fill": "reflect", "ops": [{"name": "rotate", "degrees": 5}]}``."""
        unknown = set(data) - {"ops", "seed", "fill"}
        if unknown:
            raise ConfigError(f"augmentation spec has unknown key(s) {', '.join(sorted(unknown))}")
        return cls(
            tuple(data.get("ops", ())),
            seed=int(data.get("seed", 0)),
            fill=str(data.get("fill", "reflect")),
        )

    def to_dict(self) -> dict[str, Any]:
        ops = [
            {
                "name": op.name,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in op.params.items()},
            }
            for op in self.ops
        ]
        return {"seed": self.seed, "fill": self.fill, "ops": ops}

    @property
    def is_geometric(self) -> bool:
        return any(op.name in GEOMETRIC_OPS for op in self.ops)

    def sample(self, key: str = "", seed: int | None = None) -> list[tuple[str, dict[str, float]]]:
        """The concrete parameters used for the image identified by ``key``."""
        rng = _rng(self.seed if seed is None else seed, key)
        return [(op.name, op.sample(rng)) for op in self.ops]

    def apply(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        key: str = "",
        seed: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Transform ``image`` (and ``mask`` through the geometric ops) for image ``key``."""
        base_seed = self.seed if seed is None else seed
        image, mask = apply_ops(image, mask, self.sample(key, base_seed), self.fill, base_seed, key)
        return image, mask


def spec_from_options(
    *,
    rotate: float = 0.0,
    dx: float = 0.0,
    dy: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    blur: float = 0.0,
    noise: float = 0.0,
    random: bool = False,
    seed: int = 0,
) -> Augmentation:
    """A spec from command-line style strengths, where 0 means "leave alone".

    Factors are given as changes: ``brightness=0.2`` means a factor of 1.2. By default every image
    gets exactly these strengths (a systematic drift); with ``random`` each strength becomes a
    symmetric range, ``rotate=5`` -> uniform in [-5, 5] degrees and ``brightness=0.2`` -> a factor
    in [0.8, 1.2] (blur and noise: [0, strength]). Order: geometry, colour, blur, noise.
    """

    def value(strength: float, centre: float = 0.0, one_sided: bool = False) -> ParamValue:
        if not random:
            return centre + strength
        low = centre if one_sided else centre - abs(strength)
        return (low, centre + abs(strength))

    ops: list[Op] = []
    if rotate:
        ops.append(Op("rotate", {"degrees": value(rotate)}))
    if dx or dy:
        ops.append(Op("shift", {"dx": value(dx), "dy": value(dy)}))
    jitter = {
        name: value(strength, centre)
        for name, strength, centre in (
            ("brightness", brightness, 1.0),
            ("contrast", contrast, 1.0),
            ("saturation", saturation, 1.0),
            ("hue", hue, 0.0),
        )
        if strength
    }
    if jitter:
        ops.append(Op("color_jitter", jitter))
    if blur:
        ops.append(Op("gaussian_blur", {"sigma": value(blur, one_sided=True)}))
    if noise:
        ops.append(Op("gaussian_noise", {"sigma": value(noise, one_sided=True)}))
    return Augmentation(tuple(ops), seed=seed)


def apply_ops(
    image: np.ndarray,
    mask: np.ndarray | None,
    ops: Sequence[tuple[str, dict[str, float]]],
    fill: str,
    seed: int,
    key: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    if mask is not None:
        mask = np.asarray(mask) != 0
    for index, (name, params) in enumerate(ops):
        if name in GEOMETRIC_OPS:
            image = OPS[name](image, **params, fill=fill)
            if mask is not None:
                mask = OPS[name](mask, **params, fill=fill)
        elif name == "gaussian_noise":
            # Noise differs per image and per op position yet repeats for the same spec.
            noise_seed = int(_rng(seed, f"{key}\0noise{index}").integers(2**31))
            image = gaussian_noise(image, **params, seed=noise_seed)
        else:
            image = OPS[name](image, **params)
    return image, mask


def _as_op(op: Op | Mapping[str, Any] | tuple[str, Mapping[str, Any]]) -> Op:
    if isinstance(op, Op):
        return op
    if isinstance(op, Mapping):
        params = dict(op)
        if "name" not in params:
            raise ConfigError(f"augmentation op {op!r} has no 'name'")
        name = params.pop("name")
        return Op(str(name), params.pop("params", None) or params)
    if isinstance(op, tuple) and len(op) == 2:
        return Op(str(op[0]), dict(op[1]))
    raise ConfigError(f"cannot read augmentation op {op!r}")


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


__all__ = [
    "FILL_MODES",
    "GEOMETRIC_OPS",
    "OPS",
    "Augmentation",
    "Op",
    "brightness",
    "color_jitter",
    "contrast",
    "gaussian_blur",
    "gaussian_noise",
    "hue",
    "rotate",
    "saturation",
    "shift",
    "spec_from_options",
]
