"""Synthetic CT angiograms of the head and neck in Hounsfield units, with ground truth.

Not anatomy, but what a large-vessel-occlusion (LVO) triage model and the pipeline
must cope with:

* a head (scalp, skull, CSF, enhancing parenchyma) on a neck (soft tissue, cervical
  spine with a dense cortex and a cancellous body as bright as contrast);
* contrast-filled arteries at 250-500 HU (the bolus peak varies from study to study),
  drawn as tubes of varying calibre with partial volume: both cervical internal carotids
  rising through the skull base to their termini, both vertebrals joining into the
  basilar, the circle of Willis (A1 and A2 segments of both anterior cerebral arteries,
  both posterior cerebral arteries, sometimes a posterior communicating artery), and on
  each side the middle cerebral artery — M1 running laterally from the carotid
  terminus, then two or three M2 trunks climbing over the insula and their M3 branches;
* an occlusion if asked: on one side (left or right), a missing contrast segment of
  4-20 mm at the carotid terminus ("T" occlusion), anywhere along M1, or in the proximal
  part of one M2 trunk, filled with clot (40-65 HU: the hyperdense vessel sign, barely
  above parenchyma); everything downstream fills only through collaterals, at 10-80 %
  of the normal contrast;
* normal variants that a model must not call occlusions: a hypoplastic A1, a missing
  posterior communicating artery, calibre asymmetry between sides, a slightly late or
  early bolus, venous contamination (a contrast-filled superior sagittal sinus),
  calcified plaque at the carotid siphon.

Then the scanner: point-spread blur and quantum noise (8-20 HU). Head size, pose
(shift, in-plane rotation), field of view, slice count and thickness vary. Everything
is drawn from the caller's seeded `np.random.Generator`, so a seed reproduces a phantom
exactly.

Coordinates are the DICOM patient system (LPS): +x towards the patient's left, +y
posterior, +z towards the head; `models.dicom_writer.write_ct_series` lays column index
along +x, so "left" here is the patient's left in the written series too.

Grids are coarse next to a real CTA (0.5-0.7 mm slices, 512 x 512): 36-52 slices of
128 x 128 keep a phantom to a fraction of a second, so training sets of a thousand
studies are made in a couple of CPU-minutes. The tubes are rendered on a finer slice
grid and averaged, so thin vessels running between slices keep their partial volume
instead of vanishing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from models.phantoms import AIR_HU, HU_MAX, HU_MIN, _coords, _smooth_field

SIDES = ("left", "right")
OCCLUSION_SITES = ("ICA-T", "M1", "M2")


@dataclass(frozen=True)
class Occlusion:
    side: str  # "left" or "right" (patient's)
    site: str  # "ICA-T", "M1" or "M2"
    length_mm: float
    collateral_fill: float  # contrast downstream, as a fraction of normal


@dataclass(frozen=True)
class CtaPhantom:
    hu: np.ndarray  # (z, y, x) int16 Hounsfield units
    spacing_zyx: tuple[float, float, float]  # mm
    has_lvo: bool
    occlusion: Occlusion | None = None
    # Voxels of the occluded (clot-filled) segment, (z, y, x) bool; the training's dense
    # auxiliary target. None = no occlusion.
    occlusion_mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def side(self) -> str | None:
        return self.occlusion.side if self.occlusion else None


@dataclass
class _Vessel:
    name: str
    points: np.ndarray  # (k, 3) x, y, z in mm, anatomical frame, 1 mm apart or so
    radius: np.ndarray  # (k,) mm
    fill: np.ndarray  # (k,) fraction of the bolus's contrast (1 = normal)
    clot: np.ndarray  # (k,) bool: occluded, filled with clot instead of contrast


def _path(
    rng: np.random.Generator, control: list[tuple[float, float, float]], wiggle_mm: float
) -> np.ndarray:
    """A smooth curve through `control` points (mm), sampled every ~1 mm, with tortuosity."""
    ctrl = np.asarray(control, dtype=np.float64)
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(t[-1]), 2)
    s = np.linspace(0.0, t[-1], n)
    pts = np.stack([np.interp(s, t, ctrl[:, i]) for i in range(3)], axis=1)
    if wiggle_mm > 0 and n > 8:
        # Tortuosity: a smooth random displacement, zero at both ends so branches stay joined.
        noise = ndimage.gaussian_filter1d(rng.standard_normal((n, 3)), sigma=max(n / 6, 2), axis=0)
        noise /= np.abs(noise).max() + 1e-9
        taper = np.sin(np.linspace(0, np.pi, n))[:, None]
        pts = pts + wiggle_mm * noise * taper
    pts = ndimage.gaussian_filter1d(pts, sigma=1.5, axis=0, mode="nearest")
    pts[0], pts[-1] = ctrl[0], ctrl[-1]
    return pts


def _vessel(name: str, pts: np.ndarray, r0: float, r1: float | None = None) -> _Vessel:
    k = len(pts)
    return _Vessel(name, pts, np.linspace(r0, r1 if r1 is not None else r0, k), np.ones(k), np.zeros(k, bool))


def _arteries(rng: np.random.Generator, z_bottom: float) -> list[_Vessel]:
    """Every artery of both sides, in the anatomical frame (circle of Willis near z = 0).

    The two hemispheres share one layout (drawn once per study) and each side departs from
    it by a little (about an eighth of the range between people) plus its own tortuosity:
    people differ far more from each other than their left and right sides do, and that
    is what makes a one-sided occlusion stand out against the other side.
    """
    vessels: list[_Vessel] = []
    # A per-study scale and per-side calibre asymmetry (normal variation, not disease).
    scale = rng.uniform(0.9, 1.12)
    term_y = rng.uniform(-14, -4)
    layout_seed = int(rng.integers(2**32))
    for s, side in ((1.0, "left"), (-1.0, "right")):
        layout = np.random.default_rng(layout_seed)  # the same draws for both sides

        def u(lo: float, hi: float, layout: np.random.Generator = layout) -> float:
            return float(layout.uniform(lo, hi) + 0.12 * (hi - lo) * rng.standard_normal())

        cal = scale * u(0.88, 1.12)
        tx, tz = s * u(13, 19), u(-3, 3)  # carotid terminus
        # Cervical ICA, then the siphon (an S-bend at the skull base), up to the terminus.
        ica_ctrl = [
            (s * u(20, 26), u(-2, 6), z_bottom - 2),
            (s * u(20, 25), u(-2, 4), -45 + u(-5, 5)),
            (s * u(17, 22), u(0, 8), -28 + u(-3, 3)),
            (s * u(14, 19), term_y - u(6, 12), -14 + u(-3, 3)),
            (s * u(14, 19), term_y + u(-2, 4), -6 + u(-2, 2)),
            (tx, term_y, tz),
        ]
        vessels.append(_vessel(f"ICA-{side}", _path(rng, ica_ctrl, 2.5), 2.6 * cal, 2.1 * cal))
        # M1: lateral from the terminus, slightly anterior-superior; 16-28 mm.
        m1_len = u(16, 28)
        m1_end = (tx + s * m1_len, term_y + u(-6, 4), tz + u(0, 6))
        m1_ctrl = [(tx, term_y, tz), (tx + s * m1_len / 2, term_y + u(-4, 3), tz + u(-2, 3)), m1_end]
        vessels.append(_vessel(f"M1-{side}", _path(rng, m1_ctrl, 1.5), 1.8 * cal, 1.5 * cal))
        # M2 trunks climbing over the insula, then M3 towards the convexity.
        n_m2 = int(layout.choice([2, 2, 3]))
        for j in range(n_m2):
            ay = -12 + 24 * (j + 0.5) / n_m2 + u(-5, 5)
            knee = (m1_end[0] + s * u(6, 12), m1_end[1] + ay * 0.6, m1_end[2] + u(4, 10))
            top = (m1_end[0] + s * u(10, 20), m1_end[1] + ay * 1.6, m1_end[2] + u(26, 40))
            vessels.append(
                _vessel(f"M2-{side}-{j}", _path(rng, [m1_end, knee, top], 2.0), 1.25 * cal, 1.0 * cal)
            )
            m3_end = (top[0] - s * u(0, 15), top[1] + u(-20, 20), top[2] + u(15, 28))
            vessels.append(_vessel(f"M3-{side}-{j}", _path(rng, [top, m3_end], 2.0), 0.9 * cal, 0.7 * cal))
        # A1 medially-anterior to the anterior communicating region; sometimes hypoplastic.
        a1_r = 0.6 if rng.random() < 0.12 else 1.2 * cal
        acom = (s * u(1.5, 3), term_y - u(12, 18), tz + u(3, 8))
        vessels.append(_vessel(f"A1-{side}", _path(rng, [(tx, term_y, tz), acom], 1.0), a1_r))
        a2_ctrl = [
            acom,
            (s * u(1.5, 4), acom[1] - u(15, 25), acom[2] + u(20, 30)),
            (s * u(1.5, 5), acom[1] + u(0, 20), acom[2] + u(55, 70)),
        ]
        vessels.append(_vessel(f"A2-{side}", _path(rng, a2_ctrl, 2.0), 1.2 * cal, 0.9 * cal))
        # Vertebral artery (through the transverse foramina) up to the vertebrobasilar junction.
        va_ctrl = [
            (s * u(14, 19), u(12, 18), z_bottom - 2),
            (s * u(12, 17), u(14, 20), -50 + u(-5, 5)),
            (s * u(4, 8), u(16, 22), -38 + u(-3, 3)),
            (s * 0.5, u(13, 17), -30 + u(-2, 2)),
        ]
        vessels.append(_vessel(f"VA-{side}", _path(rng, va_ctrl, 1.5), 1.6 * cal, 1.4 * cal))
        # PCA from the basilar tip, posterior-laterally around the midbrain.
        pca_ctrl = [
            (0.0, 10.0, -4.0),
            (s * u(14, 20), u(14, 20), u(-3, 2)),
            (s * u(25, 35), u(40, 55), u(3, 12)),
        ]
        vessels.append(_vessel(f"PCA-{side}", _path(rng, pca_ctrl, 2.0), 1.2 * cal, 0.9 * cal))
        if rng.random() < 0.7:  # posterior communicating artery: often absent or tiny
            vessels.append(
                _vessel(f"PCom-{side}", _path(rng, [(tx, term_y, tz), pca_ctrl[1]], 1.0), 0.6 * cal)
            )
    ba = [(0.0, rng.uniform(13, 17), -30.0), (0.0, rng.uniform(10, 14), -16.0), (0.0, 10.0, -4.0)]
    basilar = _path(rng, ba, 1.0)
    vessels.append(_vessel("BA", basilar, 1.8 * scale, 1.6 * scale))
    return vessels


def _occlude(rng: np.random.Generator, vessels: list[_Vessel], side: str) -> Occlusion:
    """Replace a segment with clot and reduce what lies downstream to collateral filling."""
    site = str(rng.choice(OCCLUSION_SITES, p=[0.25, 0.5, 0.25]))
    by = {v.name: v for v in vessels}
    length = float(rng.uniform(4, 20))
    fill = float(rng.uniform(0.1, 0.8))
    m2 = [v for v in vessels if v.name.startswith(f"M2-{side}-")]
    if site == "ICA-T":
        ica = by[f"ICA-{side}"]
        # The last few mm of the carotid plus the origin of M1.
        k = len(ica.points)
        a = max(k - int(length * 0.6), 1)
        ica.clot[a:] = True
        m1 = by[f"M1-{side}"]
        m1.clot[: max(int(length * 0.4), 2)] = True
        m1.fill[:] = np.where(m1.clot, 1.0, fill)
        downstream = [v for v in vessels if v.name.startswith((f"M2-{side}", f"M3-{side}"))]
        # The A1 fills across the anterior communicating artery, a little less.
        by[f"A1-{side}"].fill[:] = min(1.0, fill + 0.3)
    elif site == "M1":
        m1 = by[f"M1-{side}"]
        k = len(m1.points)
        n = min(max(int(length), 3), k)
        a = int(rng.integers(0, k - n + 1))
        m1.clot[a : a + n] = True
        m1.fill[a + n :] = fill
        downstream = [v for v in vessels if v.name.startswith((f"M2-{side}", f"M3-{side}"))]
    else:
        j = int(rng.integers(len(m2)))
        trunk = m2[j]
        n = min(max(int(length), 3), len(trunk.points) - 2)
        a = int(rng.integers(0, max(len(trunk.points) // 3 - n, 0) + 1))  # proximal M2
        trunk.clot[a : a + n] = True
        trunk.fill[a + n :] = fill
        downstream = [by[f"M3-{side}-{j}"]]
    for v in downstream:
        v.fill[:] = fill
    return Occlusion(side=side, site=site, length_mm=round(length, 1), collateral_fill=round(fill, 3))


def _render(
    vessels: list[_Vessel],
    shp: tuple[int, int, int],
    spacing: tuple[float, float, float],
    to_scanner: tuple[np.ndarray, np.ndarray],
    contrast_hu: float,
    clot_hu: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessel occupancy (0-1), vessel HU contribution and clot occupancy on the grid.

    Tubes are rendered on a slice grid `ss` times finer along z and averaged back, so a
    3 mm vessel between two 5 mm slices still shows in both (partial volume). Each voxel
    near a centreline takes the radius and filling of its nearest centreline point
    (points are ~1 mm apart, so that is the distance to the curve within a fraction of
    a mm); only voxels within reach of some point are looked at.
    """
    dz, dy, dx = spacing
    ss = max(1, int(np.ceil(dz / 1.5)))
    nz, ny, nx = shp
    fine = (nz * ss, ny, nx)
    fdz = dz / ss
    # Index -> mm (centred on the volume, as models.phantoms._coords).
    origin = np.array([-(nz * dz) / 2 + fdz / 2, -(ny - 1) * dy / 2, -(nx - 1) * dx / 2])
    step = np.array([fdz, dy, dx])
    rot, shift = to_scanner
    ramp = 0.5 * dx + 0.3  # mm: the in-plane partial-volume edge
    pts = np.concatenate([v.points for v in vessels]) @ rot.T + shift  # scanner frame, (x, y, z)
    radius = np.concatenate([v.radius for v in vessels])
    is_clot = np.concatenate([v.clot for v in vessels])
    value = np.where(is_clot, clot_hu, contrast_hu * np.concatenate([v.fill for v in vessels]))
    pts_zyx = pts[:, ::-1]
    centre = np.round((pts_zyx - origin) / step).astype(int)
    # Candidate voxels: a box around each centreline point, sized for thin or thick vessels.
    chunks = []
    for group in (radius <= 1.4, radius > 1.4):
        if not group.any():
            continue
        half = np.ceil((float(radius[group].max()) + ramp) / step).astype(int)
        offsets = np.stack(
            np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), axis=-1
        ).reshape(-1, 3)
        chunks.append((centre[group][:, None, :] + offsets[None, :, :]).reshape(-1, 3))
    cand = np.concatenate(chunks)
    inside = np.all((cand >= 0) & (cand < np.array(fine)), axis=1)
    flat = np.unique(np.ravel_multi_index(tuple(cand[inside].T), fine))
    idx = np.stack(np.unravel_index(flat, fine), axis=1)
    dist, nearest = cKDTree(pts_zyx).query(origin + idx * step, k=1)
    o = np.clip((radius[nearest] - dist) / ramp + 0.5, 0.0, 1.0)
    occ = np.zeros(fine, dtype=np.float32).reshape(-1)
    contrib = np.zeros_like(occ)
    clot = np.zeros_like(occ)
    occ[flat] = o
    contrib[flat] = o * value[nearest]
    clot[flat] = o * is_clot[nearest]

    # Back to the scanner's slices.
    def down(a: np.ndarray) -> np.ndarray:
        return a.reshape(nz, ss, ny, nx).mean(axis=1)

    return down(occ), down(contrib), down(clot)


def cta_phantom(
    rng: np.random.Generator,
    *,
    lvo: bool,
    side: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> CtaPhantom:
    """A CT angiogram of the head and neck; with a large-vessel occlusion if `lvo`.

    `side` ("left"/"right") fixes the occluded side (else drawn at random); `shape`
    (slices, rows, cols) fixes the grid (else 36-52 slices of 128 x 128).
    """
    if side is not None and side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    u = rng.uniform
    ax, ay, az = u(64, 76), u(80, 92), u(62, 74)
    head_cz = u(22, 30)  # head centre above the circle of Willis
    scalp_mm = u(3, 6)
    shp = (int(rng.integers(36, 53)), 128, 128) if shape is None else tuple(int(s) for s in shape)
    assert len(shp) == 3
    fov = 2 * (ay + scalp_mm + 8) * u(1.05, 1.2)
    pixel = fov / max(shp[1], shp[2])
    # Cover from the upper neck (C2-C3) to the vertex.
    z_top = head_cz + az + scalp_mm + u(2, 8)
    z_bottom = -u(60, 80)
    slice_mm = float(np.clip(round((z_top - z_bottom) / shp[0], 2), 2.0, 6.0))
    spacing = (slice_mm, pixel, pixel)
    # Scanner coordinates; the volume's z centre sits halfway between neck and vertex.
    z, y, x = _coords(shp, spacing)
    z_mid = (z_top + z_bottom) / 2
    cx, cy = u(-6, 6), u(-6, 6)
    yaw = u(-0.15, 0.15)
    cos, sin = np.cos(yaw), np.sin(yaw)
    # Anatomical (xa, ya, za) of each voxel; its inverse places the vessels.
    x0, y0 = x - cx, y - cy
    xa = x0 * cos + y0 * sin
    ya = -x0 * sin + y0 * cos
    za = z + z_mid
    del x0, y0
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    shift = np.array([cx, cy, -z_mid])

    hu = np.full(shp, AIR_HU, dtype=np.float32)
    r = np.sqrt((xa / ax) ** 2 + (ya / ay) ** 2 + ((za - head_cz) / az) ** 2)
    a_min = min(ax, ay, az)
    # Neck: an elliptic cylinder below the skull base, merging into the scalp.
    nx_, ny_ = u(48, 58), u(50, 60)
    neck = ((xa / nx_) ** 2 + ((ya - 8) / ny_) ** 2 <= 1.0) & (za < head_cz - 0.4 * az)
    hu[neck] = u(30, 60)  # muscle and glands (slightly enhanced)
    hu[r <= 1.0 + scalp_mm / a_min] = u(15, 45)
    skull_mm = u(5, 8) * (1 + 0.2 * _smooth_field(rng, shp, (8.0, 16.0, 16.0)))
    inner = 1.0 - skull_mm / a_min
    skull = (r <= 1.0) & (r > inner)
    # Bone stays above 800 HU: contrast (up to ~550 HU) and bone must not overlap, else the
    # preprocessing's bone strip leaves thin-skull patches that look like vessels.
    bone = u(1000, 1600) * (1 + 0.12 * _smooth_field(rng, shp, (4.0, 6.0, 6.0)))
    hu[skull] = np.maximum(bone, 800.0)[skull]
    intracranial = r <= inner
    hu[intracranial] = u(2, 10)
    brain = r <= inner - u(0.8, 3.0) / a_min
    texture = u(1.0, 2.5) * _smooth_field(rng, shp, (2.0, 3.0, 3.0))
    hu[brain] = (u(30, 42) + texture)[brain]  # parenchyma, a little enhanced
    # Cervical spine: a cancellous body (as bright as contrast) inside a dense cortex.
    spine_y = u(22, 30)
    rs = np.sqrt((xa / 9.0) ** 2 + ((ya - spine_y) / 9.0) ** 2)
    in_neck = za < head_cz - 0.55 * az
    hu[(rs <= 1.0) & in_neck] = u(250, 420)
    hu[(np.abs(rs - 1.0) < 0.15) & in_neck] = u(900, 1300)

    vessels = _arteries(rng, z_bottom)
    occlusion: Occlusion | None = None
    if lvo:
        occlusion = _occlude(rng, vessels, side or str(rng.choice(SIDES)))
    contrast_hu = u(250, 500)
    clot_hu = u(40, 65)
    extra: list[_Vessel] = []
    if rng.random() < 0.35:  # venous contamination: superior sagittal sinus at part-enhancement
        sss = _path(
            rng,
            [
                (0.0, -ay * 0.7, head_cz + az * 0.6),
                (0.0, 0.0, head_cz + az * 0.9),
                (0.0, ay * 0.8, head_cz + az * 0.3),
            ],
            1.0,
        )
        v = _vessel("SSS", sss, 3.0)
        v.fill[:] = u(0.3, 0.6)
        extra.append(v)
    occ, contrib, clot = _render(vessels + extra, shp, spacing, (rot, shift), contrast_hu, clot_hu)
    hu = hu * (1.0 - occ) + contrib
    if rng.random() < 0.4:  # calcified plaque at the carotid siphon: bone-bright specks
        for vname in ("ICA-left", "ICA-right"):
            ica = next(v for v in vessels if v.name == vname)
            k = int(rng.integers(len(ica.points) // 2, len(ica.points) * 3 // 4))
            p = ica.points[k] @ rot.T + shift
            speck = (x - p[0]) ** 2 + (y - p[1]) ** 2 + ((z - p[2]) / 1.5) ** 2 <= u(1.5, 3.0) ** 2
            hu[speck] = u(700, 1100)

    in_plane = u(0.35, 0.7)
    hu = ndimage.gaussian_filter(hu, (u(0.2, 0.4), in_plane, in_plane))
    hu += u(8, 20) * rng.standard_normal(shp, dtype=np.float32)
    out = np.clip(np.round(hu), HU_MIN, HU_MAX).astype(np.int16)
    mask = clot > 0.25 if occlusion else None
    if occlusion is not None and (mask is None or not mask.any()):
        # A clot entirely outside the field of view cannot be labelled: redraw.
        return cta_phantom(rng, lvo=lvo, side=side, shape=shape)
    return CtaPhantom(
        hu=out, spacing_zyx=spacing, has_lvo=occlusion is not None, occlusion=occlusion, occlusion_mask=mask
    )
