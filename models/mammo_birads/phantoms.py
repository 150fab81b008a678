"""Synthetic 2D digital mammograms (FFDM, for presentation), with BI-RADS ground truth.

Not anatomy, but what a BI-RADS triage model and the MG pipeline must cope with. Each
view is built as a map of relative attenuation along each ray, then turned into 12-bit
detector values the way a mammography system presents them (MONOCHROME2: brighter =
denser):

* a compressed breast: a half-ellipse from the chest wall (depth 80-150 mm), flat in the
  middle and thinning towards the skin line (a darker rim), a thin brighter skin line and
  the nipple at the front; air outside is near 0;
* fat (0.30) and fibroglandular tissue (0.48): a smoothed random field thresholded and
  blended so that 10-60 % of the breast is dense, sparing the subcutaneous and
  retromammary fat; Cooper's-ligament-like curvilinear strands and a few vessels;
* on the MLO, the pectoral muscle (0.58) as a triangle in the upper-left corner;
* a finding by BI-RADS category (1 nothing; 2 benign; 3 probably benign; 4 suspicious;
  5 highly suggestive), placed in the fibroglandular-bearing breast, away from the muscle
  and 15 mm or more from the skin; category 0 is an inadequate view (anterior breast cut
  off, motion blur, severe under-exposure) and carries no lesion.

Then exposure and detector: gain and offset, a gamma, detector blur, noise that grows
with signal. A seeded `np.random.Generator` reproduces a phantom exactly. Pixels are
0.6-0.8 mm on a ~240 x 300 mm detector (a real one is 0.07-0.1 mm): the triage model
sees a downsampled image either way (processors/preprocessing/).

Array convention, for every view and both breasts (orientation is normalised so one model
sees every view the same way): the chest wall (pectoral side) is column 0 and the nipple
points towards the last column. CC rows run lateral -> medial, MLO rows superior ->
inferior. models/mammo_birads/writer.py mirrors right-breast views on writing, as real systems
store them; processors/mammogram.py undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

# The views' channel order, the ACR hierarchy and how views combine are the stream's
# (processors/birads.py): the ground truth is decided by the same rule as the suggestion.
from processors.birads import BREASTS, VIEWS, overall_category

CATEGORIES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # what the phantoms draw; 6 is clinical, never drawn
BITS_STORED = 12
MAX_VALUE = 2**BITS_STORED - 1
LATERALITIES: tuple[str, ...] = ("L", "R")
VIEW_POSITIONS: tuple[str, ...] = ("CC", "MLO")
SIDES = BREASTS

FAT, GLAND, MUSCLE = 0.30, 0.48, 0.58
# The lesion kinds each category draws (the first is not preferred: one is picked at random).
LESIONS: dict[int, tuple[str, ...]] = {
    0: ("cutoff", "motion", "underexposed"),
    1: ("none",),
    2: ("popcorn_mass", "coarse_calcs", "fatty_hilum_node"),
    3: ("oval_circumscribed",),
    4: ("indistinct_mass", "pleomorphic_calcs"),
    5: ("spiculated_mass", "spiculated_calcs"),
}
MIN_SKIN_DISTANCE_MM = 15.0


@dataclass(frozen=True)
class MammoView:
    pixels: np.ndarray  # (rows, cols) uint16 12-bit MONOCHROME2, chest wall at column 0
    pixel_mm: tuple[float, float]  # (row, column) spacing at the detector, mm
    laterality: str  # "L" or "R"
    view: str  # "CC" or "MLO"
    category: int  # the BI-RADS category this view shows (0-5)
    lesion: str  # one of LESIONS[category]
    lesion_mm: float = 0.0  # mass diameter or cluster extent; 0 for none / category 0
    centre_px: tuple[float, float] | None = None  # (row, col) of the lesion
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # lesion pixels, bool


@dataclass(frozen=True)
class MammoStudy:
    views: tuple[MammoView, ...]  # one per VIEWS entry, in VIEWS order
    category: int  # overall: the most concerning view category by CONCERN_ORDER
    side: str | None  # "left"/"right": breast of the finding that sets the category; None for 1


@dataclass(frozen=True)
class _Breast:
    """What the two views of one breast share (each view jitters it a little): the same
    breast compressed two ways is similar in size and density, never identical."""

    depth_mm: float  # chest wall to nipple
    width_ratio: float  # half-width / depth
    density: float  # fibroglandular fraction of the breast
    texture_mm: float  # scale of the fibroglandular texture


@dataclass(frozen=True)
class _Plan:
    """A finding as both views of a breast draw it: same kind, size and contrast, same
    depth from the chest wall; `seed` makes its shape alike in both."""

    kind: str
    size_mm: float
    contrast: float
    seed: int
    depth_mm: float | None = None


@dataclass(frozen=True)
class _Geometry:
    """The ground truth behind a view, for tests: breast (skin line inside), muscle, and
    the distance to the skin in mm."""

    breast: np.ndarray
    muscle: np.ndarray
    skin_mm: np.ndarray


def _draw_breast(rng: np.random.Generator) -> _Breast:
    u = rng.uniform
    return _Breast(
        depth_mm=u(80, 150),
        width_ratio=u(0.75, 1.0),
        density=u(0.10, 0.60),
        texture_mm=u(2.5, 5.0),
    )


def _jitter(rng: np.random.Generator, b: _Breast) -> _Breast:
    u = rng.uniform
    return _Breast(
        depth_mm=b.depth_mm * u(0.93, 1.07),
        width_ratio=b.width_ratio * u(0.95, 1.05),
        density=float(np.clip(b.density + u(-0.03, 0.03), 0.10, 0.60)),
        texture_mm=b.texture_mm,
    )


def _draw_plan(rng: np.random.Generator, category: int, lesion: str | None) -> _Plan:
    kinds = LESIONS[category]
    if lesion is None:
        lesion = str(rng.choice(kinds))
    elif lesion not in kinds:
        raise ValueError(f"lesion {lesion!r} is not drawn for category {category}; one of {kinds}")
    u = rng.uniform
    size = {
        "none": 0.0,
        "cutoff": 0.0,
        "motion": 0.0,
        "underexposed": 0.0,
        "popcorn_mass": u(8, 20),
        "coarse_calcs": u(10, 30),  # extent of the scattered calcifications
        "fatty_hilum_node": u(8, 15),
        "oval_circumscribed": u(5, 12),
        "indistinct_mass": u(8, 25),
        "pleomorphic_calcs": u(5, 15),  # cluster extent
        "spiculated_mass": u(8, 30),
        "spiculated_calcs": u(8, 30),
    }[lesion]
    # Masses: 0.08-0.30 above the local tissue, log-uniform so small faint ones are common
    # (0.05 at the bottom was below what the reference network learns in its CPU budget:
    # view AUC for BI-RADS 4/5 0.69 after 12 epochs).
    contrast = float(np.exp(u(np.log(0.08), np.log(0.30))))
    if lesion.startswith("spiculated"):
        contrast = max(contrast, u(0.10, 0.25))  # "dense"
    elif lesion == "oval_circumscribed":
        contrast = min(max(contrast, 0.06), 0.16)  # "moderate"
    return _Plan(kind=lesion, size_mm=round(float(size), 2), contrast=contrast, seed=int(rng.integers(2**31)))


def _splat_curve(img: np.ndarray, pts: np.ndarray, weight: np.ndarray) -> None:
    """Add `weight` at the pixels of a sampled curve (row, col), those inside `img`."""
    r = np.round(pts).astype(int)
    ok = (r[:, 0] >= 0) & (r[:, 0] < img.shape[0]) & (r[:, 1] >= 0) & (r[:, 1] < img.shape[1])
    np.add.at(img, (r[ok, 0], r[ok, 1]), weight[ok])


def _blob(
    img: np.ndarray, r0: float, c0: float, s_major: float, s_minor: float, angle: float, amp: float
) -> None:
    """A solid-looking elongated bump (calcification) of `amp`, sigmas in pixels, added in place."""
    h = int(np.ceil(3 * max(s_major, 0.5))) + 1
    r_lo, r_hi = max(int(r0) - h, 0), min(int(r0) + h + 1, img.shape[0])
    c_lo, c_hi = max(int(c0) - h, 0), min(int(c0) + h + 1, img.shape[1])
    if r_lo >= r_hi or c_lo >= c_hi:
        return
    rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi]
    dr, dc = rr - r0, cc - c0
    a = np.cos(angle) * dr + np.sin(angle) * dc
    b = -np.sin(angle) * dr + np.cos(angle) * dc
    g = np.exp(-0.5 * ((a / max(s_major, 0.3)) ** 2 + (b / max(s_minor, 0.3)) ** 2))
    # Flat-topped: calcifications are solid, not gaussian haze.
    img[r_lo:r_hi, c_lo:c_hi] += amp * np.clip(1.6 * g, 0, 1)


def _mass_profile(
    rng: np.random.Generator,
    rr: np.ndarray,
    cc: np.ndarray,
    radius_px: float,
    *,
    lobes: float,
    irregular: float,
    aspect: float,
) -> np.ndarray:
    """Indicator of a mass in local coords (rr, cc from its centre): a radius that varies
    with angle (`lobes`: low-order lobulation, `irregular`: higher-order), `aspect` <= 1
    squashing it into an oval."""
    phi = rng.uniform(0, np.pi)
    a = np.cos(phi) * rr + np.sin(phi) * cc
    b = (-np.sin(phi) * rr + np.cos(phi) * cc) / aspect
    theta = np.arctan2(b, a)
    rho = np.hypot(a, b)
    edge = np.ones_like(theta)
    for k in (2, 3, 4):
        edge += lobes * rng.uniform(0.3, 1.0) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in (5, 7, 9, 11):
        edge += irregular * rng.uniform(0.3, 1.0) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (rho <= radius_px * edge).astype(np.float32)


def _draw_lesion(
    plan: _Plan, centre: tuple[float, float], pixel: float, shape: tuple[int, int], local: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The finding's added attenuation and its mask (both full size). `local` is the
    attenuation around it, for the fatty hilum (fat darker than the node)."""
    rng = np.random.default_rng(plan.seed)
    u = rng.uniform
    add = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    r0, c0 = centre
    radius = plan.size_mm / 2 / pixel
    reach = int(np.ceil(radius + 32 / pixel + 6))
    r_lo, r_hi = max(int(r0) - reach, 0), min(int(r0) + reach + 1, shape[0])
    c_lo, c_hi = max(int(c0) - reach, 0), min(int(c0) + reach + 1, shape[1])
    win = (slice(r_lo, r_hi), slice(c_lo, c_hi))
    rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi].astype(np.float32)
    rr -= r0
    cc -= c0
    kind, contrast = plan.kind, plan.contrast
    sub = add[win]

    def scattered_calcs(
        n: int,
        extent_px: float,
        size_mm: tuple[float, float] = (0.5, 1.2),
        elongation: tuple[float, float] = (1.0, 2.5),
        density: tuple[float, float] = (0.35, 0.7),
    ) -> np.ndarray:
        """`n` calcifications scattered within `extent_px`, each of a random size, elongation,
        orientation and density in those ranges; by default fine pleomorphic specks (dots,
        commas, short rods)."""
        calcs = np.zeros_like(sub)
        for _ in range(n):
            rad = extent_px / 2 * np.sqrt(u(0, 1))
            ang = u(0, 2 * np.pi)
            size_px = u(*size_mm) / pixel
            elong = u(*elongation)
            _blob(
                calcs,
                r0 - r_lo + rad * np.sin(ang),
                c0 - c_lo + rad * np.cos(ang),
                size_px / 2.355 * elong,
                size_px / 2.355,
                u(0, np.pi),
                u(*density),
            )
        return calcs

    if kind in ("oval_circumscribed", "popcorn_mass", "fatty_hilum_node"):
        aspect = {"oval_circumscribed": u(0.55, 0.85), "popcorn_mass": u(0.85, 1.0)}.get(kind, u(0.5, 0.7))
        body = _mass_profile(rng, rr, cc, radius, lobes=0.04, irregular=0.0, aspect=aspect)
        # Circumscribed: a margin softened by less than a pixel.
        soft = ndimage.gaussian_filter(body, 0.6)
        sub += contrast * soft
        mask[win] = body > 0.5
        if kind == "popcorn_mass":
            for _ in range(int(rng.integers(2, 6))):
                rad = radius * 0.6 * np.sqrt(u(0, 1))
                ang = u(0, 2 * np.pi)
                size_px = u(2, 4) / pixel
                _blob(
                    sub,
                    r0 - r_lo + rad * np.sin(ang),
                    c0 - c_lo + rad * np.cos(ang),
                    size_px / 2.355 * u(1.0, 1.6),
                    size_px / 2.355,
                    u(0, np.pi),
                    u(0.4, 0.7),
                )
        elif kind == "fatty_hilum_node":
            # The hilum: a notch of fat at one end, darker than the tissue around the node.
            ang = u(0, 2 * np.pi)
            hr, hc = radius * 0.55 * np.sin(ang), radius * 0.55 * np.cos(ang)
            hilum = ((rr - hr) ** 2 + (cc - hc) ** 2 <= (radius * u(0.35, 0.5)) ** 2) & (body > 0.5)
            fat_level = FAT - 0.03
            sub -= ndimage.gaussian_filter(
                hilum.astype(np.float32) * (contrast + np.clip(local[win] - fat_level, 0, None)), 0.7
            )
    elif kind == "indistinct_mass":
        body = _mass_profile(rng, rr, cc, radius, lobes=u(0.25, 0.45), irregular=0.05, aspect=u(0.7, 1.0))
        margin_mm = u(2, 4)
        sub += contrast * ndimage.gaussian_filter(body, margin_mm / pixel / 2)
        mask[win] = body > 0.5
    elif kind in ("spiculated_mass", "spiculated_calcs"):
        body = _mass_profile(
            rng, rr, cc, radius, lobes=u(0.15, 0.3), irregular=u(0.15, 0.3), aspect=u(0.75, 1.0)
        )
        sub += contrast * ndimage.gaussian_filter(body, 0.8)
        mask[win] = body > 0.5
        spicules = np.zeros_like(sub)
        for _ in range(int(rng.integers(8, 21))):
            ang = u(0, 2 * np.pi)
            length = u(10, 30) / pixel
            n = int(length * 2) + 2
            t = np.linspace(0, 1, n)
            wiggle = np.cumsum(rng.normal(0, 0.02, n))
            start = radius * 0.6
            dist = start + t * length
            pts = np.stack(
                [r0 - r_lo + dist * np.sin(ang + wiggle), c0 - c_lo + dist * np.cos(ang + wiggle)], axis=1
            )
            _splat_curve(spicules, pts, 0.5 * (1 - 0.8 * t))  # thin, tapering
        sub += contrast * u(0.5, 0.9) * ndimage.gaussian_filter(spicules, 0.6) * 2.5
        if kind == "spiculated_calcs":
            sub += scattered_calcs(int(rng.integers(5, 15)), 2 * radius * 0.8)
    elif kind == "pleomorphic_calcs":
        calcs = scattered_calcs(int(rng.integers(5, 21)), 2 * radius)
        sub += calcs
        mask[win] = ndimage.binary_dilation(calcs > 0.15)
    elif kind == "coarse_calcs":
        # Few, large and dense (2-5 mm), rod-like or round: benign.
        calcs = scattered_calcs(
            int(rng.integers(3, 9)), 2 * radius, size_mm=(2, 5), elongation=(1.0, 3.0), density=(0.6, 0.9)
        )
        sub += calcs
        mask[win] = calcs > 0.2
    return add, mask


def _draw_detector(rng: np.random.Generator, shape: tuple[int, int] | None) -> tuple[int, int, float]:
    """(rows, cols, pixel mm): ~240 x 300 mm of 0.6-0.8 mm pixels, or `shape` of them."""
    u = rng.uniform
    if shape is None:
        rows_mm, cols_mm = u(220, 260), u(280, 320)
        pixel = u(0.6, 0.8)
        return int(rows_mm / pixel), int(cols_mm / pixel), pixel
    return int(shape[0]), int(shape[1]), u(0.6, 0.8)


def _place(
    rng: np.random.Generator,
    candidates: np.ndarray,
    pixel: float,
    depth_mm: float | None,
) -> tuple[float, float]:
    """A random candidate pixel, near `depth_mm` from the chest wall if given."""
    rows, cols = np.nonzero(candidates)
    if depth_mm is not None:
        off = np.abs(cols * pixel - depth_mm)
        near = off <= max(3.0, float(off.min()) + 1.0)
        rows, cols = rows[near], cols[near]
    k = int(rng.integers(len(rows)))
    return float(rows[k]) + float(rng.uniform(-0.5, 0.5)), float(cols[k]) + float(rng.uniform(-0.5, 0.5))


def _render(
    rng: np.random.Generator,
    *,
    category: int,
    laterality: str,
    view: str,
    plan: _Plan,
    breast: _Breast,
    shape: tuple[int, int] | None,
    detector: tuple[int, int, float] | None = None,
) -> tuple[MammoView, _Geometry]:
    u = rng.uniform
    rows, cols, pixel = _draw_detector(rng, shape) if detector is None else detector
    height_mm, width_mm = rows * pixel, cols * pixel
    y_mm = np.arange(rows, dtype=np.float32)[:, None] * pixel
    x_mm = np.arange(cols, dtype=np.float32)[None, :] * pixel
    kind = plan.kind

    # The breast outline: a half-ellipse from the chest wall.
    depth = min(breast.depth_mm, 0.85 * width_mm)
    if kind == "cutoff":
        # The nipple and anterior breast beyond the far edge: badly positioned, or a breast
        # too large for the detector.
        depth = width_mm + u(10, 40)
    half_w = min(depth * breast.width_ratio, 0.46 * height_mm)
    if view == "CC":
        yc = height_mm / 2 + u(-0.04, 0.04) * height_mm
    else:
        yc = min(u(0.52, 0.6) * height_mm, height_mm - half_w - 4 * pixel)
        half_w = min(half_w, height_mm - yc - 4 * pixel)
    yc = float(np.clip(yc, half_w + 2 * pixel, height_mm - half_w - 2 * pixel))
    ell = (x_mm / depth) ** 2 + ((y_mm - yc) / half_w) ** 2
    inside = ell <= 1.0
    muscle = np.zeros((rows, cols), dtype=bool)
    if view == "MLO":
        pec_w = u(0.25, 0.45) * min(depth, width_mm)
        pec_h = u(0.45, 0.7) * height_mm
        muscle = (x_mm / pec_w + y_mm / pec_h) < 1.0
        # The axillary tail: the breast reaches up along the muscle to the top edge.
        inside |= (x_mm / (pec_w * u(1.3, 1.6)) + y_mm / (pec_h * u(1.05, 1.2))) < 1.0
    # The nipple: a small bump on the front of the outline.
    nip_r = u(4, 7)
    nipple = (x_mm - depth) ** 2 + (y_mm - yc) ** 2 <= nip_r**2
    inside |= nipple
    skin_mm = ndimage.distance_transform_edt(inside).astype(np.float32) * pixel
    # Compressed thickness: flat in the middle, falling off towards the skin line.
    falloff = u(8, 15)
    thick = np.clip(skin_mm / falloff, 0, 1) ** u(0.5, 0.8)

    # Fibroglandular tissue: a smoothed random field, biased away from the subcutaneous
    # and retromammary fat, thresholded to the breast's density and blended softly.
    noise = rng.standard_normal((rows, cols)).astype(np.float32)
    s = breast.texture_mm / pixel
    fine = ndimage.gaussian_filter(noise, s)
    coarse = ndimage.zoom(ndimage.gaussian_filter(noise[::4, ::4], 3 * s / 4), 4, order=1)[:rows, :cols]
    coarse = np.pad(coarse, ((0, rows - coarse.shape[0]), (0, cols - coarse.shape[1])), mode="edge")
    # Fine detail on top: parenchyma is not smooth blobs.
    detail = ndimage.gaussian_filter(noise[::-1], 1.2)
    field_ = (
        fine / (fine.std() + 1e-6)
        + 1.2 * coarse / (coarse.std() + 1e-6)
        + 0.6 * detail / (detail.std() + 1e-6)
    )
    bias = np.clip((skin_mm - 5) / 20, 0, 1) * np.clip((x_mm - 5) / 20, 0, 1)
    field_ = field_ + 2.0 * bias
    tissue = inside & ~muscle
    thr = float(np.quantile(field_[tissue], 1 - breast.density)) if tissue.any() else 0.0
    gland = np.clip((field_ - thr) / 1.2 + 0.5, 0, 1) * tissue
    atten = np.where(muscle & inside, MUSCLE, FAT + (GLAND - FAT) * gland).astype(np.float32)
    # Fine parenchymal pattern inside the dense tissue: the detail motion blur wipes out.
    atten += u(0.025, 0.045) * detail / (detail.std() + 1e-6) * gland
    atten = atten * thick * inside

    # Cooper's ligaments (arcs, mostly in the fat near the skin) and vessels (chest wall
    # towards the nipple), drawn as thin lines and blurred once together.
    lines = np.zeros((rows, cols), dtype=np.float32)
    for _ in range(int(rng.integers(10, 26))):
        t_ang = u(-np.pi / 2, np.pi / 2)
        near = u(0.55, 0.92)
        cy = yc + near * half_w * np.sin(t_ang)
        cx = near * depth * np.cos(t_ang)
        rad = u(8, 25)
        a0 = u(0, 2 * np.pi)
        span = u(0.6, 1.6)
        n = int(rad * span / pixel * 2) + 2
        a = a0 + np.linspace(0, span, n)
        pts = np.stack([(cy + rad * np.sin(a)) / pixel, (cx + rad * np.cos(a)) / pixel], axis=1)
        _splat_curve(lines, pts, np.full(n, u(0.03, 0.06), dtype=np.float32))
    for _ in range(int(rng.integers(2, 6))):
        n = int(depth / pixel * 2)
        ang = u(-0.5, 0.5) + np.cumsum(rng.normal(0, 0.04, n))
        step = 0.5
        start = np.array([yc / pixel + u(-0.6, 0.6) * half_w / pixel, u(0, 10) / pixel])
        pts = start + np.cumsum(np.stack([np.sin(ang), np.cos(ang)], axis=1) * step, axis=0)
        _splat_curve(lines, pts, np.full(n, u(0.025, 0.045), dtype=np.float32))
    lines = ndimage.gaussian_filter(lines, 0.7) * 2.5
    atten += lines * (inside & ~muscle) * thick
    # Skin line: a thin band of denser tissue along the outline; the nipple a little denser.
    skin = inside & (skin_mm <= 1.5 * pixel)
    atten += u(0.06, 0.1) * skin + 0.1 * nipple

    # The finding, in the fibroglandular-bearing breast, away from muscle and skin.
    lesion_mm, centre, mask = 0.0, None, None
    if category >= 2:
        r_mm = plan.size_mm / 2
        muscle_mm = (
            ndimage.distance_transform_edt(~muscle).astype(np.float32) * pixel
            if muscle.any()
            else np.full((rows, cols), np.inf, dtype=np.float32)
        )
        gland_near = ndimage.uniform_filter(gland, max(int(8 / pixel), 1))
        base = tissue & (muscle_mm >= r_mm + 8) & (x_mm >= r_mm + 8)
        cand = base & (skin_mm >= MIN_SKIN_DISTANCE_MM + r_mm) & (gland_near > 0.3)
        if not cand.any():
            cand = base & (skin_mm >= MIN_SKIN_DISTANCE_MM + r_mm)
        if not cand.any():  # a tiny breast (a small test shape): as deep in it as it goes
            cand = base & (skin_mm >= 0.9 * float(skin_mm[base].max())) if base.any() else inside
        centre = _place(rng, cand, pixel, plan.depth_mm)
        add, mask = _draw_lesion(plan, centre, pixel, (rows, cols), atten)
        atten += add * np.maximum(thick, 0.5)
        mask &= inside
        lesion_mm = plan.size_mm

    # Exposure and detector: gamma, blur, (motion), gain/offset, signal-dependent noise.
    atten = np.clip(atten, 0, None)
    signal = atten ** u(0.85, 1.15)
    signal = ndimage.gaussian_filter(signal, u(0.5, 1.0))
    if kind == "motion":
        sigma = [0.0, 0.0]
        sigma[int(rng.integers(2))] = u(3, 6)
        signal = ndimage.gaussian_filter(signal, sigma)
    if kind == "underexposed":
        gain, offset, floor = u(250, 450), u(10, 40), u(15, 30)
    else:
        gain, offset, floor = u(3000, 3800), u(10, 60), u(2, 6)
    values = offset + gain * signal
    values += rng.standard_normal((rows, cols)).astype(np.float32) * (
        floor + u(0.4, 0.9) * np.sqrt(np.clip(values, 0, None))
    )
    pixels = np.clip(np.round(values), 0, MAX_VALUE).astype(np.uint16)
    out = MammoView(
        pixels=pixels,
        pixel_mm=(round(pixel, 4), round(pixel, 4)),
        laterality=laterality,
        view=view,
        category=category,
        lesion=kind,
        lesion_mm=lesion_mm,
        centre_px=(round(centre[0], 2), round(centre[1], 2)) if centre is not None else None,
        mask=mask,
    )
    return out, _Geometry(breast=inside, muscle=muscle & inside, skin_mm=skin_mm)


def _check(category: int, laterality: str, view: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality must be one of {LATERALITIES}, got {laterality!r}")
    if view not in VIEW_POSITIONS:
        raise ValueError(f"view must be one of {VIEW_POSITIONS}, got {view!r}")


def mammo_view_phantom(
    rng: np.random.Generator,
    *,
    category: int,
    laterality: str = "L",
    view: str = "CC",
    lesion: str | None = None,
    shape: tuple[int, int] | None = None,
) -> MammoView:
    """One mammographic view showing BI-RADS `category`; `lesion` forces one of the kinds
    that category draws (LESIONS[category]; ValueError otherwise), else one at random."""
    _check(category, laterality, view)
    if shape is not None and (len(shape) != 2 or min(shape) < 32):
        raise ValueError(f"shape must be (rows, cols) of at least 32 each, got {shape}")
    plan = _draw_plan(rng, category, lesion)
    return _render(
        rng,
        category=category,
        laterality=laterality,
        view=view,
        plan=plan,
        breast=_draw_breast(rng),
        shape=shape,
    )[0]


def mammo_study_phantom(rng: np.random.Generator, *, category: int, side: str | None = None) -> MammoStudy:
    """A four-view screening study (VIEWS order) whose overall category is `category`.

    A finding (2-5) is in one breast (`side`, else random), drawn in both its views with
    the same kind, size and depth from the chest wall; the other breast is 1. Category 0:
    one random view is inadequate, the rest 1 (`side`, if given, picks its breast).
    Category 1: all four normal (`side` must be None)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if side is not None and side not in SIDES.values():
        raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
    if category == 1 and side is not None:
        raise ValueError("a category 1 study has no finding, so no side")
    # One detector for the study (one machine), one set of shape/density params per breast.
    detector = _draw_detector(rng, None)
    breasts = {lat: _draw_breast(rng) for lat in LATERALITIES}
    if category == 1:
        letter = None
    else:
        letter = next(k for k, v in SIDES.items() if v == side) if side else str(rng.choice(LATERALITIES))
    bad_view = str(rng.choice(VIEW_POSITIONS)) if category == 0 else None
    finding = _draw_plan(rng, category, None) if category >= 2 else None
    normal = _Plan(kind="none", size_mm=0.0, contrast=0.0, seed=0)
    views: list[MammoView] = []
    # Draw the finding breast's CC first, so its MLO can match the lesion's depth.
    depth_mm: float | None = None
    drawn: dict[str, MammoView] = {}
    order = sorted(VIEWS, key=lambda name: (name[0] != letter, name[1:] != "CC"))
    for name in order:
        lat, pos = name[0], name[1:]
        breast = _jitter(rng, breasts[lat])
        if lat == letter and finding is not None:
            plan, cat = replace(finding, depth_mm=depth_mm), category
        elif lat == letter and pos == bad_view:
            plan, cat = _draw_plan(rng, 0, None), 0
        else:
            plan, cat = normal, 1
        v, _ = _render(
            rng,
            category=cat,
            laterality=lat,
            view=pos,
            plan=plan,
            breast=breast,
            shape=None,
            detector=detector,
        )
        if v.centre_px is not None and depth_mm is None:
            depth_mm = v.centre_px[1] * v.pixel_mm[1]
        drawn[name] = v
    views = [drawn[name] for name in VIEWS]
    overall = overall_category(v.category for v in views)
    return MammoStudy(views=tuple(views), category=overall, side=SIDES[letter] if letter else None)
