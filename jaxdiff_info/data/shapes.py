"""A generated 10-class image dataset with a two-level class hierarchy.

Each 32x32 RGB image shows one shape on a coloured background. The class is
``coarse * 5 + fine``: the coarse attribute is the temperature of the background
(warm: reds, oranges, yellows; cool: cyans, blues), which covers most of the image; the
fine attribute is the shape (disk, square, triangle, cross, ring), drawn in a near-neutral
dark or light colour. Nuisance variation makes every image different: shape position,
size and rotation, ring and cross thickness, background hue, saturation, brightness and
gradient, foreground tint and brightness, and pixel noise.

Generation is vectorised numpy, deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np

COARSE_NAMES = ("warm", "cool")
FINE_NAMES = ("disk", "square", "triangle", "cross", "ring")
NUM_FINE = len(FINE_NAMES)
NUM_CLASSES = len(COARSE_NAMES) * NUM_FINE
CLASS_NAMES = tuple(f"{c}-{f}" for c in COARSE_NAMES for f in FINE_NAMES)
COARSE_GROUPS: list[list[int]] = [
    [c * NUM_FINE + f for f in range(NUM_FINE)] for c in range(len(COARSE_NAMES))
]
FINE_GROUPS: list[list[int]] = [
    [c * NUM_FINE + f for c in range(len(COARSE_NAMES))] for f in range(NUM_FINE)
]
DECISION_PROBLEMS: dict[str, list[list[int]]] = {"coarse": COARSE_GROUPS, "fine": FINE_GROUPS}

SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 50_000, "test": 10_000}

SIZE = 32
_CHUNK = 256  # images rendered at a time; keeps the working arrays in cache
# Background hue ranges in degrees, one per coarse value.
_BG_HUES = ((-10.0, 50.0), (175.0, 245.0))
_MIN_RADIUS, _MAX_RADIUS = 6.0, 10.0
_EXTENT = 1.1  # how far (in radii) a shape may reach from its centre
_TRIANGLE_SCALE = 1.1  # circumradius of the triangle, so its area is like the others
# Pixel centres of a 32x32 image, flattened row-major.
_PIXEL_Y, _PIXEL_X = np.divmod(np.arange(SIZE * SIZE, dtype=np.float32), np.float32(SIZE))
_TRIANGULAR_STD = float(np.sqrt(2 * (256**2 - 1) / 12))  # of the sum of two uniform bytes


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (hue in turns) to RGB, all in [0, 1]; output has a trailing axis of 3."""
    h6 = (h % 1.0) * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    cases = [sector == k for k in range(6)]
    r = np.select(cases, [v, q, p, p, t, v])
    g = np.select(cases, [t, v, v, q, p, p])
    b = np.select(cases, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _signed_distance(fine: int, u: np.ndarray, v: np.ndarray,
                     thickness: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in radii, negative inside) to shape ``fine``.

    ``u``, ``v`` are pixel coordinates in the shape's frame, divided by its radius;
    ``thickness`` (broadcastable) sets the ring's width and the cross's arm width.
    """
    name = FINE_NAMES[fine]
    if name in ("disk", "ring"):
        rho = np.sqrt(u * u + v * v)
        if name == "disk":
            return rho - 1.0
        return np.abs(rho - (1.0 - 0.5 * thickness)) - 0.5 * thickness
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if name == "triangle":
        # Equilateral triangle with circumradius _TRIANGLE_SCALE: the distance to the
        # farthest of its three edge lines, whose normals are 120 degrees apart.
        c = np.float32(np.sqrt(3.0) / 2.0)
        half_v = 0.5 * v
        edges = np.maximum(np.maximum(v, c * u - half_v), -c * u - half_v)
        return edges - 0.5 * _TRIANGLE_SCALE
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        half = 0.5 * thickness
        return np.minimum(np.maximum(au - half, av - 1.0), np.maximum(av - half, au - 1.0))
    raise ValueError(f"unknown shape index {fine}")


def _coverage(fine: int, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray,
              angle: np.ndarray, thickness: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (m, 32 * 32) in [0, 1] of m shapes of one kind."""
    dx = _PIXEL_X - cx[:, None]
    dy = _PIXEL_Y - cy[:, None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    r = radius[:, None]
    u = (cos * dx + sin * dy) / r
    v = (cos * dy - sin * dx) / r
    distance = _signed_distance(fine, u, v, thickness[:, None])
    # A pixel is covered by the fraction of it inside the edge, to first order.
    return np.clip(0.5 - distance * r, 0.0, 1.0)


def _shape_alpha(fine: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray,
                 angle: np.ndarray, thickness: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of each image's shape, shape (n, 32 * 32) row-major."""
    alpha = np.empty((fine.shape[0], SIZE * SIZE), np.float32)
    for k in range(NUM_FINE):
        idx = np.flatnonzero(fine == k)
        if idx.size:
            alpha[idx] = _coverage(k, cx[idx], cy[idx], radius[idx], angle[idx],
                                   thickness[idx])
    return alpha


def _draw_parameters(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image nuisance parameters, all float32 arrays of length n (colours (n, 3))."""
    n = labels.shape[0]
    coarse, fine = labels // NUM_FINE, labels % NUM_FINE

    def uniform(lo, hi, shape=(n,)):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    lo = np.array([r[0] for r in _BG_HUES], np.float32)[coarse]
    hi = np.array([r[1] for r in _BG_HUES], np.float32)[coarse]
    bg_hue = (lo + (hi - lo) * uniform(0.0, 1.0)) / 360.0
    background = _hsv_to_rgb(bg_hue, uniform(0.55, 0.9), uniform(0.5, 0.8))

    light = rng.random(n) < 0.5
    fg_value = np.where(light, uniform(0.9, 1.0), uniform(0.05, 0.25)).astype(np.float32)
    foreground = _hsv_to_rgb(uniform(0.0, 1.0), uniform(0.0, 0.25), fg_value)

    radius = uniform(_MIN_RADIUS, _MAX_RADIUS)
    margin = _EXTENT * radius + 1.0
    return {
        "fine": fine,
        "background": background.astype(np.float32),
        "foreground": foreground.astype(np.float32),
        "gradient_angle": uniform(0.0, 2 * np.pi),
        "gradient_amount": uniform(0.0, 0.2),
        "radius": radius,
        "cx": margin + (SIZE - 1 - 2 * margin) * uniform(0.0, 1.0),
        "cy": margin + (SIZE - 1 - 2 * margin) * uniform(0.0, 1.0),
        "angle": uniform(0.0, 2 * np.pi),
        "thickness": uniform(0.35, 0.5),
        "noise": uniform(0.01, 0.04),
    }


def _render(params: dict[str, np.ndarray], rng: np.random.Generator,
            out: np.ndarray) -> None:
    """Draw images from per-image parameters into ``out`` (n, 32 * 32, 3) uint8."""
    # Work on channel planes (n, 3, 32 * 32), in 0..255 units, so that every operation
    # runs along contiguous rows of pixels.
    half = (SIZE - 1) / 2
    ga = params["gradient_angle"][:, None]
    ramp = (np.cos(ga) * (_PIXEL_X - half) + np.sin(ga) * (_PIXEL_Y - half)) / half
    shade = 1.0 + params["gradient_amount"][:, None] * ramp
    image = (255.0 * params["background"])[:, :, None] * shade[:, None, :]
    alpha = _shape_alpha(params["fine"], params["cx"], params["cy"], params["radius"],
                         params["angle"], params["thickness"])[:, None, :]
    # image += alpha * (foreground - image), in place
    work = (255.0 * params["foreground"])[:, :, None] - image
    work *= alpha
    image += work
    # Triangular pixel noise (the sum of two uniform bytes, centred): cheap and smooth.
    noise = np.frombuffer(rng.bytes(2 * image.size), np.uint8).reshape(2, *image.shape)
    np.add(noise[0], noise[1], out=work, dtype=np.float32)
    scale = (255.0 * params["noise"] / _TRIANGULAR_STD)[:, None, None]
    work *= scale
    work += 0.5 - 255.0 * scale  # centre the noise; +0.5 rounds on the truncating cast
    image += work
    for channel in range(3):
        np.clip(image[:, channel], 0.0, 255.0, out=out[:, :, channel], casting="unsafe")


def generate_shapes(num_examples: int, rng: np.random.Generator | int,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int32), classes balanced and shuffled.

    ``rng`` is a numpy Generator (advanced in place) or an integer seed.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be non-negative, got {num_examples}")
    rng = np.random.default_rng(rng)
    labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int32)
    params = _draw_parameters(labels, rng)
    images = np.empty((num_examples, SIZE, SIZE, 3), np.uint8)
    pixels = images.reshape(num_examples, SIZE * SIZE, 3)
    for start in range(0, num_examples, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        _render({k: p[chunk] for k, p in params.items()}, rng, pixels[chunk])
    return images, labels


def load_shapes(split: str = "train", *, seed: int = 0, num_examples: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One split of the shapes dataset: (images, labels, class names).

    ``seed`` and ``split`` together determine the images; the splits of one seed are
    independent draws. ``num_examples`` defaults to 50,000 (train) or 10,000 (test).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {SPLITS}")
    n = DEFAULT_SIZES[split] if num_examples is None else num_examples
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images, labels = generate_shapes(n, rng)
    return images, labels, CLASS_NAMES
