"""Procedural 3-D scenes with their exact depth maps and a caption: the data of depth-to-image.

SD 2's depth model (``stable-diffusion-2-depth``) joins a MiDaS depth estimate to the latent
input. No depth estimator can be had here, so the scenes are rendered with the depth known
exactly: one to three objects (spheres, boxes, cylinders, tori) of named colours stand on a
floor before a back wall, seen by a pinhole camera and lit by one directional light plus
ambient light (Lambertian shading). Rays are cast per pixel in torch (the camera at the origin,
pitched down, 1 above the floor): the floor and wall
analytically, the objects by sphere tracing their signed distance functions (Hart 1996), which
converges to the exact surface. The depth map holds each pixel's camera-space ``z`` of the
first surface its ray hits.

Captions name the objects and, for two, how they stand: ``"a red sphere in front of a blue
box"`` (the first is nearer by more than ``DEPTH_GAP``), ``"... behind ..."``, or ``"... left
of ..."`` / ``"... right of ..."`` when their depths are close. Scene ``i`` of a dataset is a
function of ``(seed, i)`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from difflab.data.base import ImageDataset, check_split
from difflab.errors import bad_value

KINDS = ("sphere", "box", "cylinder", "torus")
COLORS = {"red": (0.85, 0.15, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9),
          "yellow": (0.95, 0.85, 0.15), "purple": (0.6, 0.2, 0.75), "orange": (0.95, 0.5, 0.1),
          "white": (0.92, 0.92, 0.92), "cyan": (0.1, 0.8, 0.85)}
FLOOR_Y, WALL_Z = -1.0, 9.0  # the floor plane y = -1 and the back wall z = 9 (world)
FOV_DEG = 50.0
PITCH_DEG = 10.0  # the camera at the origin looks this far down from the horizontal
LIGHT = (-0.5, 0.8, -0.45)  # towards the light (up, left, towards the camera)
DEPTH_GAP = 1.0  # nearer by more than this: "in front of"
MAX_STEPS, HIT_EPS = 96, 1e-4
RENDER_VERSION = 1  # bump when rendering changes (cached renders are keyed by it)


@dataclass(frozen=True)
class Shape:
    """One object: ``kind``, its ``color`` name, ``center`` (x, y, z) in camera space (y up,
    z away from the camera), ``size`` (sphere radius, box half-extent, cylinder radius and
    half-height, torus major radius; the torus tube is ``size / 3``) and ``yaw`` (radians about
    the vertical axis)."""

    kind: str
    color: str
    center: tuple[float, float, float]
    size: float
    yaw: float = 0.0

    @property
    def height(self) -> float:
        """Half the object's vertical extent (it stands on the floor at this height)."""
        return self.size / 3 if self.kind == "torus" else self.size


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def caption(self) -> str:
        return caption(self)


def _sdf(shape: Shape, p: torch.Tensor) -> torch.Tensor:
    """Signed distance from points ``p (..., 3)`` to ``shape`` (negative inside)."""
    q = p - p.new_tensor(shape.center)
    c, s = math.cos(shape.yaw), math.sin(shape.yaw)
    x, y, z = c * q[..., 0] - s * q[..., 2], q[..., 1], s * q[..., 0] + c * q[..., 2]
    r = shape.size
    if shape.kind == "sphere":
        return torch.sqrt(x * x + y * y + z * z) - r
    if shape.kind == "box":
        d = torch.stack([x.abs(), y.abs(), z.abs()], -1) - r
        outside = d.clamp_min(0).norm(dim=-1)
        return outside + d.max(-1).values.clamp_max(0)
    if shape.kind == "cylinder":  # vertical axis, radius r, half-height r
        d = torch.stack([torch.sqrt(x * x + z * z) - r, y.abs() - r], -1)
        return d.max(-1).values.clamp_max(0) + d.clamp_min(0).norm(dim=-1)
    if shape.kind == "torus":  # lying flat: ring of radius r in the xz-plane, tube r / 3
        ring = torch.sqrt(x * x + z * z) - r
        return torch.sqrt(ring * ring + y * y) - r / 3
    raise bad_value("shape kind", shape.kind, " / ".join(KINDS))


def rays(size: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(world directions, camera-space z of each direction)``, ``(size, size, 3)`` and
    ``(size, size)``: unit rays of a pinhole camera at the origin, pitched ``PITCH_DEG`` down
    from +z, row 0 at the top. A hit at distance ``t`` has depth ``t * z``."""
    f = 0.5 * size / math.tan(math.radians(FOV_DEG) / 2)
    c = (torch.arange(size, dtype=dtype) + 0.5 - size / 2) / f
    v, u = torch.meshgrid(-c, c, indexing="ij")
    d = torch.stack([u, v, torch.ones_like(u)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    a = math.radians(PITCH_DEG)
    ca, sa = math.cos(a), math.sin(a)
    world = torch.stack([d[..., 0], ca * d[..., 1] - sa * d[..., 2],
                         sa * d[..., 1] + ca * d[..., 2]], -1)
    return world, d[..., 2]


def render(scene: Scene, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image (3, size, size) in [-1, 1], depth (1, size, size))``, float32; depth is the
    camera-space z of the first surface each pixel's ray hits."""
    d, cam_z = rays(size)
    dz = d[..., 2]
    # the back wall and the floor, analytically
    t_wall = WALL_Z / dz
    t_floor = torch.where(d[..., 1] < 0, FLOOR_Y / d[..., 1].clamp_max(-1e-12),
                          torch.full_like(dz, math.inf))
    t_env = torch.minimum(t_wall, t_floor)
    # the objects, by sphere tracing (the distance bound is safe for every SDF here)
    t = torch.zeros_like(dz)
    hit = torch.zeros_like(dz, dtype=torch.bool)
    which = torch.full_like(dz, -1, dtype=torch.long)
    if scene.shapes:
        flat_d, flat_t, env = d.reshape(-1, 3), t.reshape(-1), t_env.reshape(-1)
        flat_hit, flat_which = hit.reshape(-1), which.reshape(-1)
        live = torch.arange(flat_t.numel())  # rays still marching
        for _ in range(MAX_STEPS):
            if live.numel() == 0:
                break
            tl = flat_t[live]
            p = flat_d[live] * tl[:, None]
            best, idx = torch.stack([_sdf(s, p) for s in scene.shapes]).min(0)
            done = best < HIT_EPS
            flat_hit[live[done]] = True
            flat_which[live[done]] = idx[done]
            tl = tl + torch.where(done, 0.0, best)
            flat_t[live] = tl
            live = live[~done & (tl < env[live])]
        hit &= t < t_env
    t_final = torch.where(hit, t, t_env)
    p = d * t_final[..., None]
    depth = t_final * cam_z
    # shading: Lambert + ambient; object normals from the SDF gradient
    light = torch.tensor(LIGHT, dtype=d.dtype)
    light = light / light.norm()
    normal = torch.zeros_like(p)
    normal[..., 1] = torch.where(t_floor <= t_wall, 1.0, 0.0)
    normal[..., 2] = torch.where(t_floor <= t_wall, 0.0, -1.0)
    albedo = torch.empty_like(p)
    check = ((torch.floor(p[..., 0] * 1.5) + torch.floor(p[..., 2] * 1.5)) % 2 == 0)
    floor_rgb = torch.where(check[..., None], p.new_tensor([0.62, 0.6, 0.56]),
                            p.new_tensor([0.5, 0.48, 0.45]))
    wall_rgb = p.new_tensor([0.55, 0.62, 0.7]).expand_as(p)
    albedo[:] = torch.where((t_floor <= t_wall)[..., None], floor_rgb, wall_rgb)
    if scene.shapes and bool(hit.any()):
        e = 1e-4
        for k, s in enumerate(scene.shapes):
            m = hit & (which == k)
            if not bool(m.any()):
                continue
            q = p[m]
            grad = torch.stack([_sdf(s, q + q.new_tensor(off)) - _sdf(s, q - q.new_tensor(off))
                                for off in ((e, 0, 0), (0, e, 0), (0, 0, e))], -1)
            normal[m] = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            albedo[m] = p.new_tensor(COLORS[s.color])
    shade = 0.3 + 0.7 * (normal @ light).clamp_min(0)
    rgb = (albedo * shade[..., None]).clamp(0, 1)
    image = (rgb.permute(2, 0, 1) * 2 - 1).float()
    return image, depth[None].float()


def random_scene(generator: torch.Generator, max_shapes: int = 2) -> Scene:
    """One to ``max_shapes`` objects of distinct colours on the floor, apart from each other
    and inside the view."""
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))

    n = 1 + int(torch.randint(max_shapes, (), generator=generator))
    colors = list(COLORS)
    order = torch.randperm(len(colors), generator=generator).tolist()
    shapes: list[Shape] = []
    for k in range(n):
        for _ in range(50):  # rejection: no overlap, within the field of view
            kind = KINDS[int(torch.randint(len(KINDS), (), generator=generator))]
            size = u(0.45, 0.8)
            z = u(2.6, 5.5)
            half_view = z * math.tan(math.radians(FOV_DEG) / 2) - 1.2 * size
            x = u(-half_view, half_view)
            h = size / 3 if kind == "torus" else size
            c = (x, FLOOR_Y + h, z)
            if all(math.dist(c, o.center) > 1.15 * (size + o.size) for o in shapes):
                shapes.append(Shape(kind, colors[order[k]], c, size, u(0, math.pi)))
                break
    return Scene(tuple(shapes))


def caption(scene: Scene) -> str:
    """The scene in words (see the module docstring)."""
    names = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}"
             for s in scene.shapes]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        a, b = scene.shapes
        if a.center[2] < b.center[2] - DEPTH_GAP:
            rel = "in front of"
        elif a.center[2] > b.center[2] + DEPTH_GAP:
            rel = "behind"
        else:
            rel = "left of" if a.center[0] < b.center[0] else "right of"
        return f"{names[0]} {rel} {names[1]}"
    return ", ".join(names[:-1]) + " and " + names[-1]


class Shapes(ImageDataset):
    """``n`` rendered scenes (``split="train"``: scenes ``0 .. n-1``; ``"test"``: another
    ``n_test`` scenes from a disjoint seed stream), each item ``(image, {"caption", "depth"})``
    with ``depth (1, H, W)`` the exact camera-space depth. Rendered once, kept in memory.

    Args:
        image_size: side in pixels (default 64).
        n: number of training scenes; ``n_test``: of test scenes.
        seed: the scene stream.
        max_shapes: at most this many objects per scene (1 to 3).
    """

    name = "shapes"
    channels = 3

    def __init__(self, split: str = "train", image_size: int = 64, n: int = 2000,
                 n_test: int = 256, seed: int = 0, max_shapes: int = 2, transform=None,
                 progress: bool | None = None) -> None:
        split = check_split(split)
        for key, value, lo in (("image_size", image_size, 8), ("n", n, 1), ("n_test", n_test, 1),
                               ("max_shapes", max_shapes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise bad_value(key, value, f"an int >= {lo}")
        if max_shapes > 3:
            raise bad_value("max_shapes", max_shapes, "1, 2 or 3")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise bad_value("seed", seed, "an int >= 0")
        self.image_size, self.seed, self.max_shapes = image_size, seed, max_shapes
        self.transform = transform
        ids = {"train": range(n), "test": range(n, n + n_test), "all": range(n + n_test)}[split]
        self.ids = list(ids)
        self.scenes = [self.scene(i) for i in self.ids]
        self.captions = [s.caption() for s in self.scenes]
        self.images, self.depths = self._rendered(progress)

    def _rendered(self, progress: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and depths, rendered once per machine and cached under
        ``$DIFFLAB_CACHE/shapes`` (keyed by the renderer version, seed, size and ids)."""
        import hashlib
        import os

        from safetensors.torch import load_file, save_file
        from tqdm.auto import tqdm

        from difflab.evaluation.extractor import cache_dir

        key = hashlib.sha256(repr((RENDER_VERSION, self.seed, self.image_size, self.max_shapes,
                                   self.ids[0] if self.ids else 0, len(self.ids))).encode())
        file = cache_dir() / "shapes" / f"shapes-{key.hexdigest()[:16]}.safetensors"
        if file.is_file():
            try:
                t = load_file(str(file))
                return t["images"], t["depths"]
            except Exception:  # noqa: BLE001 - a damaged cache is rendered again
                pass
        show = progress if progress is not None else len(self.ids) > 500
        images, depths = [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small tensors: one thread is several times faster
        try:
            for s in tqdm(self.scenes, desc="rendering scenes", disable=not show, leave=False):
                img, dep = render(s, self.image_size)
                images.append(img)
                depths.append(dep)
        finally:
            torch.set_num_threads(threads)
        out = torch.stack(images), torch.stack(depths)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            save_file({"images": out[0].contiguous(), "depths": out[1].contiguous()}, str(tmp))
            os.replace(tmp, file)
        except OSError:  # a read-only cache: render again next time
            pass
        return out

    def scene(self, i: int) -> Scene:
        """Scene ``i`` of the stream (a function of ``(seed, i)`` only)."""
        g = torch.Generator().manual_seed(1_000_003 * self.seed + i)
        return random_scene(g, self.max_shapes)

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def _info(self, index: int):
        return {"caption": self.captions[index], "depth": self.depths[index]}
