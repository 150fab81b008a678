"""Synthetic chest radiographs (PA, upright), with ground truth for a pneumothorax.

Not anatomy, but what a chest X-ray triage model and the pipeline must cope with. The
image is built as a map of attenuation along each ray (thicker or denser = more), then
turned into 12-bit detector values the way a DX system presents them (MONOCHROME2:
brighter = more attenuation):

* the body outline with shoulders and neck, soft-tissue thickness falling off laterally;
  the abdomen under the diaphragm domes (the right dome higher);
* two lung fields (dark) between mediastinum and chest wall, with costophrenic angles
  and apices; the heart shadow bulging into the left lower lung field;
* spine, posterior ribs curving down and out from the spine, fainter anterior ribs,
  clavicles — bright bands crossing the lungs;
* lung markings: branching vessel trees from both hila, thinning and fading towards the
  periphery;
* a pneumothorax if asked: on one side, a rim of the lung field along the chest wall
  and apex (5-45 % of the hemithorax width, widest at the apex as air rises in an
  upright patient) with no lung markings and a little darker, the collapsed lung's
  edge a thin bright visceral pleural line;
* mimics a model must not call: skin folds (a line across the lung with markings on both
  sides of it), the medial border of the scapulae.

Then exposure and detector: gain and offset (kV, dose), a gamma, detector blur, noise
that grows with signal, sometimes a vendor's edge enhancement. Image size, pixel
spacing, patient size and position vary. A seeded `np.random.Generator` reproduces a
phantom exactly. Grids are 300-400 pixels of 1.0-1.4 mm (a real detector is 3000 of
0.14 mm): the model sees ~1.7 mm pixels either way (processors/preprocessing/).

Array convention: row 0 is the top (head), the last column is the patient's left —
the conventional PA display, PatientOrientation "L\\F" in the DICOM written by
models/cxr_triage/writer.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SIDES = ("left", "right")
BITS_STORED = 12
MAX_VALUE = 2**BITS_STORED - 1


@dataclass(frozen=True)
class Radiograph:
    pixels: np.ndarray  # (rows, cols) uint16, 12-bit presentation values, MONOCHROME2
    pixel_mm: tuple[float, float]  # (row, column) spacing at the detector, mm
    has_pneumothorax: bool
    side: str | None = None  # patient's side of the pneumothorax
    rim_fraction: float = 0.0  # pneumothorax rim width / hemithorax width, at mid-lung
    # Pixels of the pneumothorax (pleural air), (rows, cols) bool; None = none.
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)


def _splat_tree(
    rng: np.random.Generator,
    img: np.ndarray,
    start: np.ndarray,
    direction: float,
    length: float,
    width: float,
    weight: float,
    depth: int,
) -> None:
    """One vessel and, recursively, its branches, as weighted points (row, col in pixels)."""
    n = max(int(length), 2)
    angles = direction + np.cumsum(rng.normal(0, 0.06, n))
    pts = start + np.cumsum(np.stack([np.sin(angles), np.cos(angles)], axis=1), axis=0)
    fade = np.linspace(1.0, 0.55, n)
    r = np.round(pts).astype(int)
    ok = (r[:, 0] >= 0) & (r[:, 0] < img.shape[0]) & (r[:, 1] >= 0) & (r[:, 1] < img.shape[1])
    np.add.at(img, (r[ok, 0], r[ok, 1]), weight * width * fade[ok])
    if depth == 0:
        return
    for _ in range(int(rng.integers(2, 4))):
        k = int(rng.integers(n // 3, n))
        _splat_tree(
            rng,
            img,
            pts[k],
            float(angles[k] + rng.choice([-1, 1]) * rng.uniform(0.25, 0.7)),
            length * rng.uniform(0.45, 0.7),
            width * 0.65,
            weight,
            depth - 1,
        )


def chest_radiograph_phantom(
    rng: np.random.Generator,
    *,
    pneumothorax: bool,
    side: str | None = None,
    min_rim_fraction: float = 0.05,
    shape: tuple[int, int] | None = None,
) -> Radiograph:
    """A PA chest radiograph; with a pneumothorax on `side` (else a random side) if asked.

    `min_rim_fraction` raises the smallest pneumothorax drawn (tests and demos that need
    an unmistakable one); training uses the full range.
    """
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    u = rng.uniform
    rows, cols = (int(rng.integers(320, 401)), int(rng.integers(300, 401))) if shape is None else shape
    pixel = u(1.0, 1.4)
    # Patient frame in mm: x to the patient's left (columns), y down (rows), origin mid-chest.
    cx, cy = u(-15, 15), u(-20, 20)
    y_mm = (np.arange(rows) - rows / 2) * pixel - cy
    x_mm = (np.arange(cols) - cols / 2) * pixel - cx
    Y, X = np.meshgrid(y_mm, x_mm, indexing="ij")
    half_w = u(135, 170)  # half the chest width at the lung bases
    apex_y = -u(110, 140)  # lung apices above mid-chest
    dome_r, dome_l = u(70, 100), u(85, 115)  # diaphragm dome heights below mid-chest
    tilt = u(-0.04, 0.04)
    X = X + tilt * Y  # a patient standing slightly rotated

    # Soft tissue: a chest that narrows to the shoulders and neck above the apices.
    width = np.where(
        Y > apex_y - 20,
        half_w * np.sqrt(np.clip(1 - ((Y - 40) / 330) ** 2, 0.05, 1)),
        u(45, 60) + (half_w - 50) * np.clip((Y - (apex_y - 70)) / 50, 0, 1),
    )
    inside = np.clip(1 - (X / np.maximum(width, 1)) ** 2, 0, 1)
    atten = 0.9 * np.sqrt(inside) * (np.abs(X) < width)
    # Abdomen under the domes: water-dense all the way across.
    # The diaphragm: a dome per side, lowest at the costophrenic angles.
    dome = np.where(X < 0, dome_r, dome_l) + 28 * (X / half_w) ** 2 * u(0.6, 1.2)
    below = Y > dome
    atten += 0.35 * below * np.sqrt(inside)

    # Lungs: between the mediastinum and the chest wall, apex to the dome; the lateral
    # edge curves in towards the apex, the medial edge is the mediastinum.
    med = u(22, 35)
    heart_w, heart_h = u(55, 75), u(55, 70)
    heart_cx, heart_cy = u(10, 25), dome_l - heart_h * 0.55
    heart = ((X - heart_cx) / heart_w) ** 2 + ((Y - heart_cy) / heart_h) ** 2 <= 1
    lung_outer = width - u(12, 20)
    rise = np.sqrt(np.clip((Y - apex_y) / u(60, 80), 0, 1))
    lungs: dict[str, np.ndarray] = {}
    for name, sgn in (("left", 1.0), ("right", -1.0)):
        lat = sgn * X
        outer = med + 8 + (lung_outer - med - 8) * rise
        one = (lat > med + 8 * (1 - rise)) & (lat < outer) & (Y < dome) & (Y > apex_y)
        if name == "left":
            one &= ~heart
        lungs[name] = one
    lung = lungs["left"] | lungs["right"]
    lung_depth = ndimage.gaussian_filter(lung.astype(np.float32), 4 / pixel)
    atten -= u(0.45, 0.6) * lung_depth

    # Spine and the mediastinum above the heart.
    atten += 0.15 * (np.abs(X) < u(15, 22)) * (Y > apex_y - 60)
    atten += 0.1 * heart
    # Posterior ribs: arcs from the spine down and out; anterior ribs fainter, sloping the
    # other way; both only over the thorax.
    rib_gap = u(20, 26)
    rib_w = u(7, 10)
    lat = np.abs(X)
    thorax = (Y < dome + 10) & (Y > apex_y - 15) & (lat < width - 5)
    ribs = np.zeros((rows, cols), dtype=np.float32)
    for k in range(10):
        y0 = apex_y + 5 + k * rib_gap
        arc = y0 + 0.25 * lat + 0.0012 * lat**2
        ribs += 0.11 * (np.abs(Y - arc) < rib_w / 2) * (lat > 12)
        ant = y0 + 45 - 0.35 * (lat - 40) + 0.0008 * lat**2
        ribs += 0.045 * (np.abs(Y - ant) < rib_w * 0.7) * (lat > 40)
    atten += ndimage.gaussian_filter(ribs * thorax, 0.8)
    # Clavicles.
    clav = apex_y + u(5, 20) + 0.12 * lat
    atten += 0.12 * (np.abs(Y - clav) < 6) * (lat > 10) * (lat < half_w * 0.75)
    # Scapular medial borders: a soft line over the upper lateral lung (mimic).
    if rng.random() < 0.5:
        scap = lat - (lung_outer - u(25, 45)) - 0.25 * (Y - apex_y)
        atten += 0.05 * (np.abs(scap) < 2.5) * (Y < apex_y + 140) * lung

    # Pneumothorax: the lateral/apical rim of one lung field.
    ptx = np.zeros((rows, cols), dtype=bool)
    rim_fraction = 0.0
    ptx_side: str | None = None
    if pneumothorax:
        ptx_side = side or str(rng.choice(SIDES))
        one = lungs[ptx_side]
        sgn = 1.0 if ptx_side == "left" else -1.0
        # Distance from the chest wall and apex only: the medial side and the diaphragm are
        # counted as lung, so distance grows from lateral/apical edges inwards.
        extended = (
            one
            | ((sgn * X < med + 12) & (sgn * X > 0) & (Y > apex_y + 40))
            | ((Y >= dome - 5) & (sgn * X > 0))
            | heart
        )
        dist_mm = ndimage.distance_transform_edt(extended) * pixel
        hemi = float(np.median(lung_outer[one] - med)) if one.any() else 100.0
        rim_fraction = float(max(min_rim_fraction, np.exp(u(np.log(0.05), np.log(0.45)))))
        rim_fraction = min(rim_fraction, 0.45)
        # Wider at the apex: air rises in an upright patient.
        apical = np.clip(1 - (Y - apex_y) / 120, 0, 1)
        w_mm = rim_fraction * hemi * (1 + u(0.3, 1.0) * apical)
        ptx = one & (dist_mm < w_mm)
        collapsed = one & ~ptx
        pleural_line = collapsed & ~ndimage.binary_erosion(collapsed, iterations=1)
        pleural_line &= ndimage.binary_dilation(ptx, iterations=2)

    # Lung markings: vessel trees from each hilum, weaker towards the periphery.
    markings = np.zeros((rows, cols), dtype=np.float32)
    for sgn in (1.0, -1.0):
        hilum = np.array([(u(-30, 0) + cy) / pixel + rows / 2, (sgn * u(45, 60) + cx) / pixel + cols / 2])
        for _ in range(int(rng.integers(6, 10))):
            # Steps are (sin, cos) = (row, col): angle 0 runs towards the patient's left. Fan
            # out laterally, more downwards (the lower lobes carry most of the vessels).
            ang = float((0.0 if sgn > 0 else np.pi) + sgn * u(-1.2, 1.4))
            _splat_tree(rng, markings, hilum, ang, u(60, 110) / pixel, 1.0, u(0.8, 1.2), depth=3)
    markings = 5.0 * ndimage.gaussian_filter(markings, 0.9)
    markings *= lung & ~ptx
    atten += u(0.06, 0.1) * np.clip(markings, 0, 1.5)
    atten += 0.02 * ndimage.gaussian_filter(rng.standard_normal((rows, cols)), 2.0) * lung

    if pneumothorax:
        atten -= u(0.06, 0.12) * ndimage.gaussian_filter(ptx.astype(np.float32), 1.0)  # air only
        atten += u(0.05, 0.12) * pleural_line
        atten += 0.03 * collapsed  # the collapsed lung is a little denser
    if rng.random() < 0.3:  # skin fold: a curved line across a lung, markings on both sides
        fold_side = float(rng.choice([-1.0, 1.0]))
        fold = fold_side * X - (lung_outer - u(10, 40)) + 0.002 * (Y - u(-40, 40)) ** 2
        atten += u(0.03, 0.08) * (np.abs(fold) < 1.5) * lung

    # Exposure and detector: a gamma, blur, signal-dependent noise, 12-bit values.
    atten = np.clip(atten, 0, None)
    signal = atten ** u(0.85, 1.15)
    signal = ndimage.gaussian_filter(signal, u(0.5, 1.0))
    if rng.random() < 0.5:  # vendor edge enhancement (unsharp mask)
        signal = signal + u(0.2, 0.6) * (signal - ndimage.gaussian_filter(signal, 4.0))
    gain, offset = u(1800, 2600), u(150, 500)
    values = offset + gain * signal
    values += rng.standard_normal((rows, cols)) * (u(6, 14) + 0.01 * values)
    pixels = np.clip(np.round(values), 0, MAX_VALUE).astype(np.uint16)
    has = bool(ptx.any())
    return Radiograph(
        pixels=pixels,
        pixel_mm=(round(pixel, 4), round(pixel, 4)),
        has_pneumothorax=has,
        side=ptx_side if has else None,
        rim_fraction=round(rim_fraction, 4) if has else 0.0,
        mask=ptx if has else None,
    )
