"""SyntheticScenes: an offline multitask dataset rendered by vectorised numpy ray casting, so examples and tests run
without downloads while the tasks still share real 3-D structure (as in NYUv2).

Each scene is a room (floor, walls, ceiling) holding random boxes, spheres, cylinders and articulated "figures"
made of parts (head, torso, upper / lower arms, upper / lower legs), with random colours, procedural textures
(plain, checker, stripes, waves) and Lambertian shading from a point light. Every label is exact:

- `depth`: z-depth in metres (camera-frame z of the hit point); every pixel is valid.
- `normals`: unit normals in the camera frame (x right, y down, z forward), facing the camera.
- `semseg`: 7 classes, `SYNTHETIC_CLASSES` (wall, floor, ceiling, box, sphere, cylinder, figure).
- `parts`: 0 background, 1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg (the PASCAL-MT
  grouping) when a figure is visible; all 255 (ignored) when none is, as for PASCAL images without persons.
- `saliency`: 1 on the most prominent object (largest visible area, weighted towards the image centre).
- `edge`: 1 on semantic boundaries: a pixel whose class differs from its right or lower neighbour.
- `albedo`: the surface colour before shading (colour times texture, without light or noise), (H, W, 3) float32 in
  [0, 1]: not one of the paper's tasks, defined by `ALBEDO_TASK_SPEC` (a 3-channel regression task) through
  `CTALConfig(task_specs={"albedo": ALBEDO_TASK_SPEC})`.

Configs: `nyuv2` (semseg, depth, normals, albedo) and `pascal` (semseg, parts, saliency, normals, edge). Scenes are a pure
function of (seed, split, index): `render_scene(index, seed=0, split="train", ...)`.

    >>> from dataset_scripts.synthetic import SyntheticScenes
    >>> builder = SyntheticScenes(config_name="nyuv2", num_train=64, num_validation=16)  # doctest: +SKIP
    >>> builder.download_and_prepare(); ds = builder.as_dataset()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import datasets
import numpy as np

from ctal_hf.dataset_classes import SYNTHETIC_CLASSES, SYNTHETIC_PART_CLASSES

from ._common import IGNORE_INDEX, CTALBuilderMixin, task_features

CONFIG_TASKS = {
    "nyuv2": ("semseg", "depth", "normals", "albedo"),
    "pascal": ("semseg", "parts", "saliency", "normals", "edge"),
}
# The spec of the `albedo` column's task (a custom task: `CTALConfig(task_specs={"albedo": ALBEDO_TASK_SPEC})`).
ALBEDO_TASK_SPEC = {"kind": "regression", "num_channels": 3, "value_range": [0.0, 1.0], "title": "Albedo"}
TASK_SPECS = {"albedo": ALBEDO_TASK_SPEC}
_WALL, _FLOOR, _CEILING, _BOX, _SPHERE, _CYLINDER, _FIGURE = range(7)
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}
_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Primitive:
    """One convex solid: `kind` in {"box", "sphere", "cylinder"}; `rot` columns are its local axes in the world
    (a cylinder's axis is local y); `size` holds half extents (box), (radius, half length) or (radius,)."""

    kind: str
    center: np.ndarray
    rot: np.ndarray
    size: np.ndarray
    semantic: int
    obj: int
    part: int = 0


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _basis_from_axis(axis: np.ndarray) -> np.ndarray:
    """Rotation whose local y axis is `axis` (unit)."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    x = _cross(axis, helper)
    x /= math.sqrt(x @ x)
    return np.stack([x, axis, _cross(x, axis)], axis=1)


def _segment(p0: np.ndarray, p1: np.ndarray, radius: float, semantic: int, obj: int, part: int) -> _Primitive:
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    return _Primitive(
        "cylinder", (p0 + p1) / 2, _basis_from_axis(axis / length), np.array([radius, length / 2]), semantic, obj, part
    )


def _hit_box(prim: _Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Ray parameter of the first hit (inf on a miss): slab test in the box frame."""
    local_o = prim.rot.T @ (origin - prim.center)
    local_d = prim.rot.T @ dirs
    local_d[np.abs(local_d) < 1e-12] = 1e-12
    inv = 1.0 / local_d
    t1 = (-prim.size - local_o)[:, None] * inv
    t2 = (prim.size - local_o)[:, None] * inv
    t_near = np.minimum(t1, t2).max(axis=0)
    t_far = np.maximum(t1, t2).min(axis=0)
    return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)


def _hit_sphere(prim: _Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    oc = origin - prim.center
    a = np.einsum("ij,ij->j", dirs, dirs)
    b = oc @ dirs
    disc = b * b - a * (oc @ oc - prim.size[0] ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc > 0) & (t > _EPS), t, np.inf)


def _hit_cylinder(prim: _Primitive, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Capped cylinder along its local y axis: the nearer of the side and the cap facing the ray."""
    radius, half = prim.size
    local_o = prim.rot.T @ (origin - prim.center)
    dx, dy, dz = prim.rot.T @ dirs
    a = dx * dx + dz * dz
    b = local_o[0] * dx + local_o[2] * dz
    disc = b * b - a * (local_o[0] ** 2 + local_o[2] ** 2 - radius**2)
    flat = a < 1e-12
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / np.where(flat, 1.0, a)
    side_ok = (disc > 0) & ~flat & (t_side > _EPS) & (np.abs(local_o[1] + t_side * dy) <= half)
    dy = np.where(np.abs(dy) > 1e-12, dy, 1e-12)
    t_cap = (np.where(dy < 0, half, -half) - local_o[1]) / dy
    cx = local_o[0] + t_cap * dx
    cz = local_o[2] + t_cap * dz
    cap_ok = (t_cap > _EPS) & (cx * cx + cz * cz <= radius**2)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _surface_at(prim: _Primitive, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward normals (3, M) and face ids (M,) at points (3, M) on the surface of `prim`."""
    if prim.kind == "sphere":
        return (points - prim.center[:, None]) / prim.size[0], np.zeros(points.shape[1], dtype=np.int64)
    local = prim.rot.T @ (points - prim.center[:, None])
    normal = np.zeros_like(local)
    cols = np.arange(local.shape[1])
    if prim.kind == "box":
        axis = (np.abs(local) / prim.size[:, None]).argmax(axis=0)
        sign = np.sign(local[axis, cols])
        normal[axis, cols] = sign
        face = axis * 2 + (sign > 0)
    else:
        radius, half = prim.size
        radial = np.hypot(local[0], local[2])
        cap = np.abs(np.abs(local[1]) - half) < np.abs(radial - radius)
        safe = np.where(radial > 0, radial, 1.0)
        normal[0] = np.where(cap, 0.0, local[0] / safe)
        normal[1] = np.where(cap, np.sign(local[1]), 0.0)
        normal[2] = np.where(cap, 0.0, local[2] / safe)
        face = np.where(cap, np.where(local[1] > 0, 1, 2), 0)
    return prim.rot @ normal, face


def _bounding_radius(prim: _Primitive) -> float:
    if prim.kind == "box":
        return float(np.linalg.norm(prim.size))
    if prim.kind == "cylinder":
        return float(math.hypot(prim.size[0], prim.size[1]))
    return float(prim.size[0])


def _screen_rays(center, radius, camera, cam_rot, focal, cx, cy, height, width) -> np.ndarray | None:
    """Indices of the pixels whose rays may hit a sphere (a conservative screen-space rectangle), so each solid is
    only tested against the rays near it; `None` means all rays (the sphere reaches behind the image plane)."""
    x, y, z = cam_rot.T @ (center - camera)
    if z - radius <= 0.05:
        return None
    near, far = z - radius, z + radius
    u = [
        focal * (x - radius) / near,
        focal * (x - radius) / far,
        focal * (x + radius) / near,
        focal * (x + radius) / far,
    ]
    v = [
        focal * (y - radius) / near,
        focal * (y - radius) / far,
        focal * (y + radius) / near,
        focal * (y + radius) / far,
    ]
    j0 = max(int(math.floor(min(u) + cx - 0.5)), 0)
    j1 = min(int(math.ceil(max(u) + cx - 0.5)) + 1, width)
    i0 = max(int(math.floor(min(v) + cy - 0.5)), 0)
    i1 = min(int(math.ceil(max(v) + cy - 0.5)) + 1, height)
    if j0 >= j1 or i0 >= i1:
        return np.empty(0, dtype=np.int64)
    return (np.arange(i0, i1)[:, None] * width + np.arange(j0, j1)[None, :]).ravel()


# ----------------------------------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------------------------------
def _figure(rng: np.random.Generator, root: np.ndarray, yaw: float, height: float, obj: int) -> list[_Primitive]:
    """An articulated figure: head, torso, arms and legs as spheres / boxes / cylinders, posed at random."""
    s = height / 1.75
    rot = _rot_y(yaw)

    def world(p):
        return root + rot @ (np.asarray(p, dtype=np.float64) * s)

    def limb_direction(swing: float, spread: float) -> np.ndarray:
        # Hanging down, swung forward / back by `swing` and out sideways by `spread` (figure frame).
        return np.array([math.sin(spread), -math.cos(spread) * math.cos(swing), math.cos(spread) * math.sin(swing)])

    prims = [
        _Primitive("box", world([0.0, 1.18, 0.0]), rot, np.array([0.19, 0.28, 0.11]) * s, _FIGURE, obj, 2),
        _Primitive("sphere", world([0.0, 1.62, 0.0]), np.eye(3), np.array([0.12 * s]), _FIGURE, obj, 1),
        _segment(world([0.0, 1.44, 0.0]), world([0.0, 1.54, 0.0]), 0.05 * s, _FIGURE, obj, 2),  # neck
    ]
    for side in (-1.0, 1.0):
        shoulder = np.array([0.25 * side, 1.42, 0.0])
        upper = limb_direction(rng.uniform(-1.0, 1.2), side * rng.uniform(0.05, 0.9))
        elbow = shoulder + 0.30 * upper
        lower = limb_direction(rng.uniform(-0.2, 1.6), side * rng.uniform(0.0, 0.6))
        hand = elbow + 0.28 * lower
        prims.append(_segment(world(shoulder), world(elbow), 0.05 * s, _FIGURE, obj, 3))
        prims.append(_segment(world(elbow), world(hand), 0.042 * s, _FIGURE, obj, 4))
        hip = np.array([0.1 * side, 0.92, 0.0])
        thigh = limb_direction(rng.uniform(-0.5, 0.6), side * rng.uniform(0.0, 0.25))
        knee = hip + 0.45 * thigh
        shin = limb_direction(rng.uniform(-0.9, 0.0), side * rng.uniform(0.0, 0.1))
        ankle = knee + 0.45 * shin
        prims.append(_segment(world(hip), world(knee), 0.075 * s, _FIGURE, obj, 5))
        prims.append(_segment(world(knee), world(ankle), 0.06 * s, _FIGURE, obj, 6))
    return prims


@dataclass
class _Scene:
    room_lo: np.ndarray
    room_hi: np.ndarray
    camera: np.ndarray
    cam_rot: np.ndarray  # columns: camera x (right), y (down), z (forward) in world coordinates
    light: np.ndarray
    prims: list


def _sample_scene(rng: np.random.Generator, figure_range: tuple[int, int], max_objects: int) -> _Scene:
    width, height, depth = rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.2), rng.uniform(5.0, 9.0)
    room_lo = np.array([-width / 2, 0.0, -1.0])
    room_hi = np.array([width / 2, height, depth])
    camera = np.array([rng.uniform(-width / 2 + 1.2, width / 2 - 1.2), rng.uniform(1.1, 1.7), 0.0])
    yaw, pitch = rng.uniform(-0.35, 0.35), rng.uniform(-0.45, -0.08)
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    down = -(np.array([0.0, 1.0, 0.0]) - forward[1] * forward)
    down /= np.linalg.norm(down)
    cam_rot = np.stack([right, down, forward], axis=1)
    light = np.array([rng.uniform(-width / 3, width / 3), height - 0.15, rng.uniform(0.5, depth / 2)])

    prims: list[_Primitive] = []
    obj = 0

    def floor_spot(margin: float, near: float = 1.6, far: float | None = None) -> tuple[float, float]:
        # A floor position in front of the camera (inside its horizontal field of view), kept inside the room.
        far = depth - margin if far is None else far
        distance = rng.uniform(near, max(near, far))
        lateral = rng.uniform(-0.45, 0.45) * distance
        x = camera[0] + distance * math.sin(yaw) + lateral * math.cos(yaw)
        z = camera[2] + distance * math.cos(yaw) - lateral * math.sin(yaw)
        return float(np.clip(x, -width / 2 + margin, width / 2 - margin)), float(np.clip(z, 1.2, depth - margin))

    for _ in range(int(rng.integers(2, max_objects + 1))):
        obj += 1
        kind = rng.choice(["box", "sphere", "cylinder"], p=[0.45, 0.3, 0.25])
        if kind == "box":
            half = rng.uniform([0.12, 0.08, 0.12], [0.6, 0.55, 0.6])
            x, z = floor_spot(max(half[0], half[2]) + 0.05)
            lift = 0.0 if rng.random() < 0.8 else rng.uniform(0.3, 1.2)
            prims.append(
                _Primitive("box", np.array([x, half[1] + lift, z]), _rot_y(rng.uniform(0, np.pi)), half, _BOX, obj)
            )
        elif kind == "sphere":
            radius = rng.uniform(0.1, 0.45)
            x, z = floor_spot(radius + 0.05)
            lift = 0.0 if rng.random() < 0.7 else rng.uniform(0.2, 1.4)
            prims.append(
                _Primitive("sphere", np.array([x, radius + lift, z]), np.eye(3), np.array([radius]), _SPHERE, obj)
            )
        else:
            radius, half_len = rng.uniform(0.07, 0.35), rng.uniform(0.15, 1.1)
            x, z = floor_spot(radius + 0.05)
            prims.append(
                _Primitive(
                    "cylinder", np.array([x, half_len, z]), np.eye(3), np.array([radius, half_len]), _CYLINDER, obj
                )
            )
    for _ in range(int(rng.integers(figure_range[0], figure_range[1] + 1))):
        obj += 1
        fig_height = rng.uniform(1.3, 1.9)
        x, z = floor_spot(0.5, near=2.2, far=5.5)
        yaw_fig = math.pi + rng.uniform(-1.0, 1.0)  # figure-local z is its front: pi faces the camera
        prims.extend(_figure(rng, np.array([x, 0.0, z]), yaw_fig, fig_height, obj))
    return _Scene(room_lo, room_hi, camera, cam_rot, light, prims)


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def camera_intrinsics(height: int, width: int, fov_degrees: float = 62.0) -> tuple[float, float, float]:
    """(focal, cx, cy) in pixels for a horizontal field of view; pixel (i, j) looks through (j + 0.5, i + 0.5)."""
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    return focal, width / 2, height / 2


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int, fov_degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame ray directions (3, H*W) with z = 1, and a per-pixel weight favouring the image centre."""
    focal, cx, cy = camera_intrinsics(height, width, fov_degrees)
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64) + 0.5, np.arange(height, dtype=np.float64) + 0.5)
    dirs = np.stack([((jj - cx) / focal).ravel(), ((ii - cy) / focal).ravel(), np.ones(jj.size)])
    offset = np.hypot(ii / height - 0.5, jj / width - 0.5) / math.hypot(0.5, 0.5)
    dirs.setflags(write=False)
    return dirs, (1.0 - 0.6 * offset).ravel()


def render_scene(
    index: int,
    seed: int = 0,
    split: str = "train",
    height: int = 96,
    width: int = 128,
    config: str = "nyuv2",
    max_objects: int = 6,
    figures: tuple[int, int] | None = None,
    fov_degrees: float = 62.0,
) -> dict[str, np.ndarray]:
    """Render scene `index` of a split; a pure function of its arguments.

    Returns every label (whatever the config), in the dataset column layouts: `image` (H, W, 3) uint8, `semseg`,
    `parts`, `saliency`, `edge` (H, W) uint8, `depth` (H, W) float32, `normals` and `albedo` (H, W, 3) float32, plus
    helpers for tests: `instance` (H, W) int32 primitive id (0 = room), `surface` (H, W) int32 id of the face hit
    (planar faces are room faces, box faces and cylinder caps), `planar` (H, W) bool, and `intrinsics` (focal, cx,
    cy)."""
    if config not in CONFIG_TASKS:
        raise ValueError(f"Unknown SyntheticScenes config {config!r}; choose from {sorted(CONFIG_TASKS)}.")
    if split not in _SPLIT_STREAM:
        raise ValueError(f"Unknown split {split!r}; choose from {sorted(_SPLIT_STREAM)}.")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    if figures is None:
        figures = (1, 2) if config == "pascal" else (0, 1)
    scene = _sample_scene(rng, figures, max_objects)

    focal, cx, cy = camera_intrinsics(height, width, fov_degrees)
    dirs_cam, centre_weight = _pixel_grid(height, width, fov_degrees)
    dirs = scene.cam_rot @ dirs_cam  # camera z = 1, so the ray parameter t is the z-depth
    origin = scene.camera
    n_rays = dirs.shape[1]

    # Room: the exit of the interior box.
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
    bound = np.where(safe > 0, scene.room_hi[:, None], scene.room_lo[:, None])
    t_axes = (bound - origin[:, None]) / safe
    axis = t_axes.argmin(axis=0)
    cols = np.arange(n_rays)
    t_best = t_axes[axis, cols]
    positive = safe[axis, cols] > 0
    normal_world = np.zeros((3, n_rays))
    normal_world[axis, cols] = np.where(positive, -1.0, 1.0)
    room_face = axis * 2 + positive  # 0/1 x walls, 2 floor, 3 ceiling, 4/5 back / front walls
    semantic = np.where(axis == 1, np.where(positive, _CEILING, _FLOOR), _WALL).astype(np.int64)
    prim_id = np.zeros(n_rays, dtype=np.int64)  # 0 = room, k = primitive k - 1
    face = room_face.astype(np.int64)

    for k, prim in enumerate(scene.prims):
        rays = _screen_rays(prim.center, _bounding_radius(prim), origin, scene.cam_rot, focal, cx, cy, height, width)
        if rays is not None and rays.size == 0:
            continue
        if rays is None:
            t = _HIT[prim.kind](prim, origin, dirs)
            closer = t < t_best
            t_best[closer] = t[closer]
            prim_id[closer] = k + 1
        else:
            t = _HIT[prim.kind](prim, origin, dirs[:, rays])
            closer = t < t_best[rays]
            t_best[rays[closer]] = t[closer]
            prim_id[rays[closer]] = k + 1
    points = origin[:, None] + dirs * t_best
    for k in np.unique(prim_id[prim_id > 0]):
        hits = np.nonzero(prim_id == k)[0]
        normal_world[:, hits], face[hits] = _surface_at(scene.prims[k - 1], points[:, hits])

    # Per-primitive attributes, index 0 = room.
    prim_semantic = np.array([0] + [p.semantic for p in scene.prims])
    prim_part = np.array([0] + [p.part for p in scene.prims])
    prim_obj = np.array([0] + [p.obj for p in scene.prims])
    is_room = prim_id == 0
    semantic = np.where(is_room, semantic, prim_semantic[prim_id])
    # Planar faces: the room, box faces and cylinder caps (code 0 room, 1 box, 2 sphere, 3 cylinder).
    kind_code = np.array([0] + [("box", "sphere", "cylinder").index(p.kind) + 1 for p in scene.prims])[prim_id]
    planar = (kind_code <= 1) | ((kind_code == 3) & (face > 0))

    # Shading: albedo per surface (room faces by class, objects by their colour) x procedural texture x Lambert.
    # Colours: 0..5 room faces, 6 skin, 7 shirt, 8 trousers (figure parts), 9 + k object k.
    n_colours = 10 + int(prim_obj.max())
    hue = rng.uniform(0, 1, n_colours)
    sat = rng.uniform(0.15, 0.8, n_colours)
    val = rng.uniform(0.45, 0.95, n_colours)
    palette = _hsv_to_rgb(hue, sat, val)  # (n_colours, 3)
    tex_kind = rng.integers(0, 4, n_colours)
    tex_freq = rng.uniform(1.5, 8.0, n_colours)
    tex_dir = rng.normal(size=(n_colours, 3))
    tex_dir /= np.linalg.norm(tex_dir, axis=1, keepdims=True)
    part_colour = np.array([0, 6, 7, 7, 6, 8, 8])
    pixel_part = prim_part[prim_id]
    colour_id = np.where(is_room, room_face, np.where(pixel_part > 0, part_colour[pixel_part], 9 + prim_obj[prim_id]))
    phase = np.einsum("ij,ji->i", tex_dir[colour_id], points) * tex_freq[colour_id]
    kind = tex_kind[colour_id]
    wave = np.sin(phase * 3.0)
    texture = np.ones(n_rays)
    chequered = kind == 1
    texture[chequered] -= 0.35 * (np.floor(points[:, chequered] * (0.5 * tex_freq[colour_id[chequered]])).sum(0) % 2)
    texture[kind == 2] = 0.8 + 0.2 * np.sign(wave[kind == 2])
    texture[kind == 3] = 0.85 + 0.15 * wave[kind == 3]
    to_light = scene.light[:, None] - points
    dist2 = np.einsum("ij,ij->j", to_light, to_light)
    lambert = np.maximum(np.einsum("ij,ij->j", normal_world, to_light) / np.sqrt(dist2), 0.0)
    shade = 0.28 + 0.85 * lambert / (1.0 + 0.015 * dist2)
    albedo = palette[colour_id].T * texture  # the surface colour before shading
    rgb = albedo * shade
    rgb += rng.normal(0.0, 0.008, size=rgb.shape)
    image = np.clip(rgb.T.reshape(height, width, 3) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    normals_cam = (scene.cam_rot.T @ normal_world).T.reshape(height, width, 3)
    normals_cam /= np.linalg.norm(normals_cam, axis=-1, keepdims=True)
    semseg = semantic.reshape(height, width).astype(np.uint8)
    instance = prim_id.reshape(height, width).astype(np.int32)
    obj_map = prim_obj[prim_id].reshape(height, width)

    part_map = prim_part[prim_id].reshape(height, width).astype(np.uint8)
    if not (semseg == _FIGURE).any():
        part_map = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)

    saliency = np.zeros((height, width), dtype=np.uint8)
    scores = np.bincount(obj_map.ravel(), weights=centre_weight, minlength=2)
    scores[0] = 0.0  # the room is never salient
    if scores.max() > 0:
        saliency[obj_map == int(np.argmax(scores))] = 1

    edge = np.zeros((height, width), dtype=np.uint8)
    edge[:, :-1] |= semseg[:, :-1] != semseg[:, 1:]
    edge[:-1, :] |= semseg[:-1, :] != semseg[1:, :]

    return {
        "image": image,
        "semseg": semseg,
        "parts": part_map,
        "depth": t_best.reshape(height, width).astype(np.float32),
        "normals": normals_cam.astype(np.float32),
        "saliency": saliency,
        "edge": edge,
        "albedo": np.clip(albedo.T.reshape(height, width, 3), 0.0, 1.0).astype(np.float32),
        "instance": instance,
        "surface": (prim_id * 8 + face).reshape(height, width).astype(np.int32),
        "planar": planar.reshape(height, width),
        "intrinsics": np.array([focal, cx, cy]),
    }


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    )
    return table[i, np.arange(h.size)]


# ----------------------------------------------------------------------------------------------------------------
# datasets builder
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticScenesConfig(datasets.BuilderConfig):
    """Args:
    tasks: label columns (set by the config name: `nyuv2` or `pascal`).
    image_size: (H, W); the defaults (96, 128) are divisible by 32 for the backbones.
    num_train / num_validation: images per split.
    seed: scene seed; a row is a pure function of (seed, split, index).
    max_objects: most non-figure objects per scene.
    """

    tasks: tuple[str, ...] = CONFIG_TASKS["nyuv2"]
    image_size: tuple[int, int] = (96, 128)
    num_train: int = 400
    num_validation: int = 100
    seed: int = 0
    max_objects: int = 6


def check_synthetic_config(config) -> None:
    """Refuses sizes and counts that would render empty images or empty splits (datasets sets builder keyword
    arguments on a copy of the config after construction, so the builder checks them, not the config)."""
    size = config.image_size
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size)
    ):
        raise ValueError(f"SyntheticScenes image_size must be (height, width), two integers >= 1, got {size!r}.")
    for field in ("num_train", "num_validation"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"SyntheticScenes {field} must be an integer >= 1 (else the split is empty), got {value!r}."
            )
    if isinstance(config.max_objects, bool) or not isinstance(config.max_objects, int) or config.max_objects < 0:
        raise ValueError(f"SyntheticScenes max_objects must be an integer >= 0, got {config.max_objects!r}.")


class SyntheticScenes(CTALBuilderMixin, datasets.GeneratorBasedBuilder):
    """Procedural rooms rendered offline; configs `nyuv2` (3 paper tasks and albedo) and `pascal` (5 tasks)."""

    VERSION = "1.1.0"
    BUILDER_CONFIG_CLASS = SyntheticScenesConfig
    BUILDER_CONFIGS = [
        SyntheticScenesConfig(name="nyuv2", tasks=CONFIG_TASKS["nyuv2"], description="semseg, depth, normals, albedo"),
        SyntheticScenesConfig(
            name="pascal", tasks=CONFIG_TASKS["pascal"], description="semseg, parts, saliency, normals, edge"
        ),
    ]
    DEFAULT_CONFIG_NAME = "nyuv2"

    def _info(self) -> datasets.DatasetInfo:
        check_synthetic_config(self.config)  # the builder's __init__ calls this first
        height, width = self.config.image_size
        return datasets.DatasetInfo(
            description="Procedurally rendered rooms with exact multitask labels (ctal_hf SyntheticScenes).",
            features=task_features(list(self.config.tasks), height, width, task_specs=TASK_SPECS),
        )

    def _split_generators(self, dl_manager):
        return [
            datasets.SplitGenerator(name="train", gen_kwargs={"split": "train", "count": self.config.num_train}),
            datasets.SplitGenerator(
                name="validation", gen_kwargs={"split": "validation", "count": self.config.num_validation}
            ),
        ]

    def _generate_examples(self, split, count):
        height, width = self.config.image_size
        scene_config = "pascal" if "parts" in self.config.tasks else "nyuv2"
        for index in range(count):
            sample = render_scene(
                index,
                seed=self.config.seed,
                split=split,
                height=height,
                width=width,
                config=scene_config,
                max_objects=self.config.max_objects,
            )
            row = {"id": f"{split}/{index}", "image": sample["image"]}
            row.update({task: sample[task] for task in self.config.tasks})
            yield f"{split}/{index}", row


def save_sample_grid(path, rows: int = 4, config: str = "pascal", seed: int = 0, height: int = 96, width: int = 128):
    """Save a picture of `rows` scenes: image, semseg, depth, normals, parts, edges and albedo side by side, each
    label coloured as its task kind colours ground truth (`ctal_hf.tasks`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctal_hf.tasks import resolve_tasks

    tasks = resolve_tasks(["semseg", "depth", "normals", "parts", "edge", "albedo"], TASK_SPECS, num_semseg_classes=7)
    columns = ["image", *tasks]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 1.75 * rows), squeeze=False)
    for r in range(rows):
        scene = render_scene(r, seed=seed, split="validation", height=height, width=width, config=config)
        for c, name in enumerate(columns):
            value = scene[name] if name == "image" else tasks[name].colorize(scene[name], label=True)
            axes[r, c].imshow(value, cmap="gray" if value.ndim == 2 else None, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a grid of SyntheticScenes samples.")
    parser.add_argument("output", help="PNG path, e.g. docs/synthetic_samples.png")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--config", default="pascal", choices=sorted(CONFIG_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save_sample_grid(args.output, args.rows, args.config, args.seed)


__all__ = [
    "ALBEDO_TASK_SPEC",
    "CONFIG_TASKS",
    "TASK_SPECS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PART_CLASSES",
    "SyntheticScenes",
    "SyntheticScenesConfig",
    "camera_intrinsics",
    "render_scene",
    "save_sample_grid",
]
