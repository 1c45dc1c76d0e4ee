"""Procedural 3D scene renderer: numpy ray casting of primitives on a ground plane, with exact labels.

This is the framework's embedded default dataset: nothing is downloaded, every sample is a pure
function of ``(seed, index)``, and because the renderer builds the image itself it knows every
label exactly (depth, normals, semantic and instance masks, boxes, a caption, a scene label).

Conventions
-----------
* World: y is up, the ground is the plane y = 0 (a disc of radius ``GROUND_RADIUS``).
* Camera coordinates (OpenCV style): x right, y down, z forward (into the scene).
* ``depth`` is the z coordinate of the hit point in camera coordinates (not the ray length);
  pixels that see sky get ``SKY_DEPTH``.
* ``normals`` are unit vectors in camera coordinates; sky pixels get (0, 0, -1), i.e. pointing
  back at the camera.
* Pixel (row i, col j) samples the ray through its centre; boxes use pixel edges, so a box is
  ``(col_min / R, row_min / R, (col_max + 1) / R, (row_max + 1) / R)``.
* All random draws happen before any pixel is touched, so the scene is identical at every
  resolution; only the sampling of it changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SEMANTIC_CLASSES: tuple[str, ...] = ("background", "sky", "ground", "sphere", "cube", "cylinder", "cone")
OBJECT_SHAPES: tuple[str, ...] = SEMANTIC_CLASSES[3:]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.55, 0.18, 0.75),
    "orange": (0.98, 0.50, 0.08),
    "white": (0.92, 0.92, 0.92),
    "cyan": (0.10, 0.80, 0.85),
}
NUM_LABELS: int = len(COLOURS)  # label = colour of the visible object with the most pixels
MAX_OBJECTS: int = 5
SKY_DEPTH: float = 100.0
GROUND_RADIUS: float = 60.0  # keeps every ground depth finite and below SKY_DEPTH

SKY_ID, GROUND_ID = SEMANTIC_CLASSES.index("sky"), SEMANTIC_CLASSES.index("ground")
_F = np.float32  # float32 halves memory traffic; scene units are O(10) so precision is ample
_EPS = 1e-3  # minimum ray parameter, and the offset that keeps shadow rays off their own surface


@dataclass(frozen=True)
class _Object:
    """One primitive standing on the ground; ``radius`` is the half edge for cubes."""

    shape: str
    colour: str
    size: str
    x: float
    z: float
    radius: float
    height: float
    yaw: float  # only cubes use it

    @property
    def centre(self) -> np.ndarray:
        """[3] centre of the object's bounding box (world)."""
        return np.array([self.x, self.height / 2, self.z], _F)

    @property
    def footprint(self) -> float:
        """Radius of the disc the object covers on the ground."""
        return self.radius * math.sqrt(2) if self.shape == "cube" else self.radius

    @property
    def bound(self) -> float:
        """Radius of a sphere around ``centre`` that contains the object (for culling rays)."""
        if self.shape == "sphere":
            return self.radius
        return math.hypot(self.footprint, self.height / 2)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-ray dot product of component-major vectors a, b [3,M] (or [3,1]) -> [M]. Rays are
    stored component-major because numpy reduces a [M,3] array over its short axis ~10x slower."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _hit_sphere(o, d, r):
    """Rays o + t d (o, d: [3,M] or [3,1], d unit) against a sphere of radius r centred at (0, r, 0).
    Returns (t [M] with inf on miss, normals [3,M])."""
    oc = o - np.array([[0], [r], [0]], _F)
    b = _dot(oc, d)
    disc = b * b - (_dot(oc, oc) - r * r)
    sq = np.sqrt(np.maximum(disc, 0))
    t = np.where(-b - sq > _EPS, -b - sq, -b + sq)  # second root only matters for rays starting inside
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    return t, (oc + np.where(np.isfinite(t), t, 0) * d) / r


def _quadric_root(a, b, c, o, d, h):
    """Smallest t > eps solving a t^2 + 2 b t + c = 0 whose hit has 0 <= y <= h. a, b, c: [M];
    o, d: [3,M]. Returns t [M] (inf on miss). Both roots are tried because for cones `a` can be
    negative, which swaps their order."""
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    best = np.full(disc.shape, np.inf, _F)
    with np.errstate(divide="ignore", invalid="ignore"):
        for root in ((-b - sq) / a, (-b + sq) / a):
            y = o[1] + root * d[1]
            ok = (disc >= 0) & (root > _EPS) & (y >= 0) & (y <= h) & (root < best)
            best = np.where(ok, root, best)
    return best


def _hit_cap(o, d, r, h, t):
    """Updates t [M] in place with hits on the top cap (disc of radius r at height h) of rays
    o, d [3,M]; returns the boolean [M] mask of rays whose nearest hit is now the cap. The bottom
    cap lies on the ground, which always hides it, so it is never tested."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (h - o[1]) / d[1]
    x, z = o[0] + tc * d[0], o[2] + tc * d[2]
    cap = (tc > _EPS) & (x * x + z * z <= r * r) & (tc < t)
    t[cap] = tc[cap]
    return cap


def _hit_cylinder(o, d, r, h):
    """Rays (o, d: [3,M] or [3,1]) against a vertical cylinder of radius r on y in [0, h] around
    the y axis. Returns (t [M], normals [3,M])."""
    o, d = np.broadcast_arrays(o, d)
    a = d[0] ** 2 + d[2] ** 2
    b = o[0] * d[0] + o[2] * d[2]
    c = o[0] ** 2 + o[2] ** 2 - r * r
    t = _quadric_root(a, b, c, o, d, h)
    cap = _hit_cap(o, d, r, h, t)
    p = o + np.where(np.isfinite(t), t, 0) * d
    n = np.stack([p[0] / r, np.zeros_like(t), p[2] / r])
    n[:, cap] = [[0], [1], [0]]
    return t, n


def _hit_cone(o, d, r, h):
    """Rays (o, d: [3,M] or [3,1]) against an upright cone, base radius r at y = 0, apex at y = h.
    Returns (t [M], normals [3,M])."""
    o, d = np.broadcast_arrays(o, d)
    k2 = (r / h) ** 2
    q = h - o[1]
    a = d[0] ** 2 + d[2] ** 2 - k2 * d[1] ** 2
    b = o[0] * d[0] + o[2] * d[2] + k2 * q * d[1]
    c = o[0] ** 2 + o[2] ** 2 - k2 * q * q
    t = _quadric_root(a, b, c, o, d, h)
    p = o + np.where(np.isfinite(t), t, 0) * d
    # gradient of x^2 + z^2 - k^2 (h - y)^2; the epsilon only guards the apex
    n = np.stack([p[0], k2 * (h - p[1]), p[2]])
    return t, n / (np.sqrt(_dot(n, n)) + 1e-9)


def _hit_cube(o, d, s, yaw):
    """Rays (o, d: [3,M] or [3,1]) against a cube of half edge s resting on the ground at the
    origin, turned by `yaw` about the y axis (slab test in the cube's frame).
    Returns (t [M], normals [3,M])."""
    c, sn = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, 0, sn], [0, 1, 0], [-sn, 0, c]], _F)  # world -> cube frame
    ol, dl = np.broadcast_arrays(rot @ (o - np.array([[0], [s], [0]], _F)), rot @ d)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1 / dl
        t1, t2 = (-s - ol) * inv, (s - ol) * inv
    tmin = np.minimum(t1, t2)
    t_near, t_far = tmin.max(axis=0), np.maximum(t1, t2).min(axis=0)
    t = np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf).astype(_F)
    axis = tmin.argmax(axis=0)  # the slab entered last is the face that was hit
    n = np.zeros(dl.shape, _F)
    cols = np.arange(len(t))
    n[axis, cols] = -np.sign(dl[axis, cols])
    return t, rot.T @ n


def _intersect(obj: _Object, o: np.ndarray, d: np.ndarray):
    """World rays (o, unit d: [3,M] or [3,1]) against one object.
    Returns (t [M] with inf on miss, unit world normals [3,M])."""
    o = o - np.array([[obj.x], [0], [obj.z]], _F)  # every primitive is defined standing on the origin
    if obj.shape == "sphere":
        return _hit_sphere(o, d, obj.radius)
    if obj.shape == "cube":
        return _hit_cube(o, d, obj.radius, obj.yaw)
    if obj.shape == "cylinder":
        return _hit_cylinder(o, d, obj.radius, obj.height)
    return _hit_cone(o, d, obj.radius, obj.height)


def _bound_candidates(obj: _Object, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Indices [K] of the rays (o, d: [3,M] or [3,1]) that pass through the object's bounding
    sphere ahead of their origin; the exact tests then run on those few rays only."""
    oc = o - obj.centre[:, None]
    b = _dot(oc, d)
    disc = b * b - (_dot(oc, oc) - obj.bound**2)
    return np.flatnonzero((disc > 0) & (b < np.sqrt(np.maximum(disc, 0))))


def _direction(elevation: float, azimuth: float) -> np.ndarray:
    """[3] unit world vector at `elevation` above the ground, turned by `azimuth` about y (radians)."""
    flat = math.cos(elevation)
    return np.array([flat * math.sin(azimuth), math.sin(elevation), flat * math.cos(azimuth)])


def _camera(rng: np.random.Generator):
    """Returns (eye [3], basis [3,3] with rows = camera x/right, y/down, z/forward in world, tan(fov/2))."""
    dist, elev = rng.uniform(8.0, 12.0), math.radians(rng.uniform(12.0, 38.0))
    azim, fov = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(35.0, 55.0))
    target = np.array([0, 0.5, 0])
    eye = target + dist * _direction(elev, azim)
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, [0, 1, 0])
    right /= np.linalg.norm(right)  # horizontal, so the camera never rolls
    basis = np.stack([right, np.cross(fwd, right), fwd])
    return eye.astype(_F), basis.astype(_F), math.tan(fov / 2)


def _to_image(p: np.ndarray, eye: np.ndarray, basis: np.ndarray, tan_half: float) -> tuple[float, float]:
    """World point p [3] -> normalised image coordinates (u right, v down), in [0, 1] inside the frame."""
    x, y, z = basis @ (p - eye)
    return 0.5 + 0.5 * x / (z * tan_half), 0.5 + 0.5 * y / (z * tan_half)


def _place_objects(rng: np.random.Generator, eye, basis, tan_half) -> list[_Object]:
    """Rejection-samples 1..MAX_OBJECTS non-overlapping objects whose centres are in view."""
    spread = min(3.2, 0.8 * float(np.linalg.norm(eye)) * tan_half)
    objects: list[_Object] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for attempt in range(40):
            shape = OBJECT_SHAPES[rng.integers(len(OBJECT_SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            size = "large" if rng.random() < 0.5 else "small"
            scale = rng.uniform(0.8, 1.1) if size == "large" else rng.uniform(0.4, 0.6)
            # the height factors keep each shape's volume roughly comparable at the same scale
            radius, height = {
                "sphere": (scale, 2 * scale),
                "cube": (0.85 * scale, 1.7 * scale),
                "cylinder": (0.8 * scale, scale * rng.uniform(1.4, 2.2)),
                "cone": (scale, scale * rng.uniform(1.8, 2.6)),
            }[shape]
            rho, phi = spread * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            yaw = rng.uniform(0, math.pi / 2)
            if not objects and attempt == 39:
                rho = 0.0  # the scene must not end up empty, and the camera always sees the origin
            obj = _Object(shape, colour, size, rho * math.cos(phi), rho * math.sin(phi), radius, height, yaw)
            u, v = _to_image(obj.centre, eye, basis, tan_half)
            in_view = (0.08 < u < 0.92 and 0.08 < v < 0.92) or rho == 0.0
            gaps = [math.hypot(obj.x - o.x, obj.z - o.z) - obj.footprint - o.footprint for o in objects]
            gap = min(gaps, default=1.0)
            if in_view and gap > 0.2:
                objects.append(obj)
                break
    return sorted(objects, key=lambda o: float(np.linalg.norm(o.centre)))


def _sample_scene(seed: int, index: int) -> dict:
    """Draws every random quantity of scene (seed, index); the renderer itself is deterministic."""
    rng = np.random.default_rng([seed, index])
    eye, basis, tan_half = _camera(rng)
    objects = _place_objects(rng, eye, basis, tan_half)
    light = _direction(math.radians(rng.uniform(30, 70)), rng.uniform(0, 2 * math.pi)).astype(_F)
    tint = 1 + rng.uniform(-0.15, 0.15, 3)
    zenith = np.array([0.25, 0.45, 0.85]) + rng.uniform(-0.1, 0.1, 3)
    ground = np.array([0.55, 0.52, 0.47]) + rng.uniform(-0.08, 0.08, 3)
    return dict(
        eye=eye, basis=basis, tan_half=tan_half, objects=objects, light=light,
        light_col=(0.8 * tint / tint.mean()).astype(_F),
        ambient=(0.42 * (0.5 * zenith + 0.5)).astype(_F),
        zenith=zenith.astype(_F), horizon=(0.55 * zenith + 0.45 * 0.95).astype(_F),
        ground=ground.astype(_F), tile=rng.uniform(0.8, 1.5), contrast=rng.uniform(0.08, 0.2),
    )


def _relation(a: _Object, b: _Object, basis: np.ndarray) -> str:
    """Spatial relation of a to b as seen by the camera, along whichever axis separates them more."""
    dx, _, dz = basis @ (a.centre - b.centre)
    if abs(dx) >= abs(dz):
        return "left of" if dx < 0 else "right of"
    return "in front of" if dz < 0 else "behind"


def _caption(objects: list[_Object], basis: np.ndarray) -> str:
    """Describes objects, pairing consecutive ones by a relation, e.g.
    'a large red sphere left of a small blue cube, and a small green cone.'"""
    if not objects:
        return "an empty scene."
    words = [f"a {o.size} {o.colour} {o.shape}" for o in objects]
    clauses = []
    for i in range(0, len(objects), 2):
        if i + 1 < len(objects):
            clauses.append(f"{words[i]} {_relation(objects[i], objects[i + 1], basis)} {words[i + 1]}")
        else:
            clauses.append(words[i])
    if len(clauses) == 1:
        return clauses[0] + "."
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1] + "."


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def render_scene(seed: int, index: int, resolution: int = 224) -> dict:
    """Renders scene `index` of the dataset with seed `seed` (both ints >= 0) at R x R, R = `resolution`.

    Returns a dict with rgb uint8 [R,R,3], depth float32 [R,R], normals float32 [R,R,3],
    semantic uint8 [R,R], instance uint8 [R,R] (0 = no object, i = row i - 1 of boxes),
    boxes float32 [N,4] (xmin, ymin, xmax, ymax in [0, 1]), box_classes int32 [N], caption str,
    label int32 0-d array (index into COLOURS of the colour of the visible object with the most
    pixels: a scene-level class that needs the object found, not just the mean colour; its shape
    would be the natural label but is not resolvable at the 4 x 4 patches of the tiny models)
    intrinsics float32 [3, 3] (pinhole K: the centre (u, v) = (col + 0.5, row + 0.5) of a pixel
    sees the camera ray K^-1 [u, v, 1], so depth * K^-1 [u, v, 1] is its 3D point),
    and objects: N dicts with shape, colour, size ("small"/"large"), centre (world xyz of the
    bounding-box centre) and pixels. N counts the objects with at least one visible pixel, in
    order of the distance of their centre to the world origin. N = 0 only happens at tiny
    resolutions where every object falls between pixel centres; the caption then reads
    "an empty scene." and the label is the colour of the object nearest the origin."""
    sc = _sample_scene(seed, index)
    eye, basis, objects, light = sc["eye"][:, None], sc["basis"], sc["objects"], sc["light"][:, None]
    R, P = resolution, resolution * resolution
    s = ((np.arange(R, dtype=_F) + 0.5) / R * 2 - 1) * _F(sc["tan_half"])
    rays = np.stack([np.tile(s, R), np.repeat(s, R), np.ones(P, _F)])  # [3,P], row-major pixels
    cos_z = 1 / np.sqrt(_dot(rays, rays))  # z of each unit ray: camera depth = ray length * cos_z
    dirs = basis.T @ (rays * cos_z)  # [3,P] unit world directions

    # hit code per pixel: -1 sky, 0 ground, k >= 1 object k (so hit + 1 indexes lookup tables)
    with np.errstate(divide="ignore", invalid="ignore"):  # rays parallel to the ground
        t_ground = -eye[1] / dirs[1]
        gx, gz = eye[0] + t_ground * dirs[0], eye[2] + t_ground * dirs[2]
        rho = np.sqrt(gx * gx + gz * gz)
    on_ground = (dirs[1] < 0) & (rho < GROUND_RADIUS)
    t = np.where(on_ground, t_ground, np.inf).astype(_F)
    hit = np.where(on_ground, 0, -1).astype(np.int16)
    normals = np.zeros((3, P), _F)
    normals[1] = 1
    for k, obj in enumerate(objects, start=1):
        cand = _bound_candidates(obj, eye, dirs)
        tk, nk = _intersect(obj, eye, np.take(dirs, cand, axis=1))
        closer = tk < t[cand]
        sel = cand[closer]
        t[sel], hit[sel], normals[:, sel] = tk[closer], k, nk[:, closer]

    # shadow rays only where the light could contribute at all; working on full arrays and
    # gathering just the few candidate rays per object is cheaper than compacting the lit pixels
    n_dot_l = _dot(normals, light)
    lit = (hit >= 0) & (n_dot_l > 0)
    origins = eye + np.where(lit, t, 0) * dirs + _EPS * normals
    shadowed = np.zeros(P, bool)
    for k, obj in enumerate(objects, start=1):
        cand = _bound_candidates(obj, origins, light)
        cand = cand[lit[cand] & (hit[cand] != k) & ~shadowed[cand]]  # convex objects cannot shadow themselves
        tk, _ = _intersect(obj, np.take(origins, cand, axis=1), light)
        shadowed[cand[np.isfinite(tk)]] = True
    diffuse = np.where(lit & ~shadowed, n_dot_l, 0)

    # albedo by lookup (column 0 sky, 1 ground, k + 1 object k); the ground's mild checker
    # fades out with distance, where it would only alias
    palette = np.array([(0, 0, 0), sc["ground"]] + [COLOURS[o.colour] for o in objects], _F).T
    albedo = np.take(palette, hit + 1, axis=1)
    with np.errstate(invalid="ignore"):  # rho is nan for rays that never reach the ground plane
        fog = _smoothstep((rho - 15) / (GROUND_RADIUS - 15))
        checker = (np.floor(gx / sc["tile"]) + np.floor(gz / sc["tile"])) % 2
    albedo *= np.where(hit == 0, 1 - sc["contrast"] * checker * (1 - fog), 1)
    rgb = albedo * (sc["ambient"][:, None] + sc["light_col"][:, None] * diffuse)
    # the sky colour seen along a ray is also what the ground fades into with distance (for rays
    # pointing down it is the horizon colour), which hides the edge of the ground disc
    horizon = sc["horizon"][:, None]
    sky_rgb = horizon + (sc["zenith"][:, None] - horizon) * np.clip(dirs[1], 0, 1) ** 0.6
    rgb += (sky_rgb - rgb) * np.where(hit == 0, fog, hit < 0)

    # drop objects without visible pixels and renumber the rest 1..N in the same order
    counts = np.bincount(hit + 1, minlength=len(objects) + 2)[2:]
    keep = np.flatnonzero(counts > 0)
    inst_lut = np.zeros(len(objects) + 2, np.uint8)
    inst_lut[keep + 2] = np.arange(1, len(keep) + 1)
    sem_lut = np.array([SKY_ID, GROUND_ID] + [SEMANTIC_CLASSES.index(o.shape) for o in objects], np.uint8)
    instance = inst_lut[hit + 1].reshape(R, R)
    boxes = np.zeros((len(keep), 4), np.float32)
    for i in range(len(keep)):
        mask = instance == i + 1
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[i] = (cols[0] / R, rows[0] / R, (cols[-1] + 1) / R, (rows[-1] + 1) / R)
    visible = [objects[k] for k in keep]
    largest = visible[int(np.argmax(counts[keep]))] if visible else objects[0]

    depth = np.where(hit >= 0, t * cos_z, SKY_DEPTH).astype(np.float32)
    normals = basis @ normals  # world -> camera coordinates
    normals /= np.sqrt(_dot(normals, normals))
    normals[:, hit < 0] = [[0], [0], [-1]]
    rgb = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return {
        "rgb": np.ascontiguousarray(rgb.T).reshape(R, R, 3),
        "depth": depth.reshape(R, R),
        "normals": np.ascontiguousarray(normals.T, dtype=np.float32).reshape(R, R, 3),
        "semantic": sem_lut[hit + 1].reshape(R, R),
        "instance": instance,
        "boxes": boxes,
        "box_classes": sem_lut[keep + 2].astype(np.int32),
        "caption": _caption(visible, sc["basis"]),
        "label": np.array(list(COLOURS).index(largest.colour), np.int32),
        "intrinsics": np.array([[R / (2 * sc["tan_half"]), 0, R / 2],
                                [0, R / (2 * sc["tan_half"]), R / 2], [0, 0, 1]], np.float32),
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size,
             "centre": tuple(float(c) for c in o.centre), "pixels": int(counts[k])}
            for o, k in zip(visible, keep)
        ],
    }
