"""Planar polygon helpers for Push-T: the T's shape, exact overlap area, and collision-free paths.

Polygons are ``(N, 2)`` float arrays of vertices in counter-clockwise order. A pose is
``(x, y, theta)``: the block frame's origin (the T's centre of mass) and its rotation.

Coverage is measured exactly: the T is the union of two disjoint convex rectangles (bar and stem),
so the area of T_a ∩ T_b is the sum over the four pairs of the areas of convex intersections, each
computed by Sutherland–Hodgman clipping (Sutherland & Hodgman, "Reentrant polygon clipping",
CACM 1974) and the shoelace formula.
"""
from __future__ import annotations

import numpy as np

# The T in units of its stem width ``u``: a bar 4u x 1u on top of a stem 1u x 3u (Chi et al.'s
# Push-T block has the same proportions: 120 x 30 bar, 30 x 90 stem).
_BAR = np.array([[-2.0, 3.0], [2.0, 3.0], [2.0, 4.0], [-2.0, 4.0]])
_STEM = np.array([[-0.5, 0.0], [0.5, 0.0], [0.5, 3.0], [-0.5, 3.0]])
# Centre of mass (area-weighted): bar area 4 at y=3.5, stem area 3 at y=1.5.
_COM = np.array([0.0, (4.0 * 3.5 + 3.0 * 1.5) / 7.0])


def t_pieces(unit: float) -> list[np.ndarray]:
    """The T's two rectangles (bar, stem) in the block frame, origin at the centre of mass."""
    return [(_BAR - _COM) * unit, (_STEM - _COM) * unit]


def t_outline(unit: float) -> np.ndarray:
    """The T's 8 outline corners in the block frame, counter-clockwise from the stem's bottom
    left corner."""
    pts = np.array([[-0.5, 0.0], [0.5, 0.0], [0.5, 3.0], [2.0, 3.0],
                    [2.0, 4.0], [-2.0, 4.0], [-2.0, 3.0], [-0.5, 3.0]])
    return (pts - _COM) * unit


def t_area(unit: float) -> float:
    return 7.0 * unit * unit


def rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def transform(points: np.ndarray, pose) -> np.ndarray:
    """Block-frame points ``(N, 2)`` -> world frame for ``pose = (x, y, theta)``."""
    return points @ rot(pose[2]).T + np.asarray(pose[:2], dtype=float)


def to_local(points: np.ndarray, pose) -> np.ndarray:
    """World points ``(N, 2)`` -> block frame of ``pose``."""
    return (np.asarray(points, dtype=float) - np.asarray(pose[:2], dtype=float)) @ rot(pose[2])


def polygon_area(poly: np.ndarray) -> float:
    """Signed area (shoelace formula), positive for counter-clockwise vertices."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman: the part of ``subject`` inside the convex CCW polygon ``clip``."""
    out = subject
    for i in range(len(clip)):
        if len(out) == 0:
            break
        a, b = clip[i], clip[(i + 1) % len(clip)]
        edge = b - a
        # Signed distance-like value: > 0 on the inner (left) side of the edge a->b.
        side = edge[0] * (out[:, 1] - a[1]) - edge[1] * (out[:, 0] - a[0])
        inp = out
        res = []
        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            sp, sq = side[j], side[(j + 1) % len(inp)]
            if sp >= 0:
                res.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                res.append(p + t * (q - p))
        out = np.array(res) if res else np.zeros((0, 2))
    return out


def t_overlap(pose_a, pose_b, unit: float) -> float:
    """Area of T(pose_a) ∩ T(pose_b): the sum of the four convex piece-pair intersections (the
    pieces of one T are disjoint, so no area is counted twice)."""
    pa = [transform(p, pose_a) for p in t_pieces(unit)]
    pb = [transform(p, pose_b) for p in t_pieces(unit)]
    return sum(polygon_area(clip_convex(a, b)) for a in pa for b in pb)


def t_coverage(pose_block, pose_target, unit: float) -> float:
    """Fraction of the target T's area covered by the block T, in [0, 1]."""
    # A cheap reject: two T's whose centres are further apart than twice the circumradius.
    if np.hypot(pose_block[0] - pose_target[0], pose_block[1] - pose_target[1]) > 5.0 * unit:
        return 0.0
    return float(np.clip(t_overlap(pose_block, pose_target, unit) / t_area(unit), 0.0, 1.0))


# ------------------------------------------------------------------------- paths around a polygon
def convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (Andrew's monotone chain)."""
    pts = sorted(map(tuple, np.asarray(points, dtype=float)))
    if len(pts) < 3:
        return np.array(pts)

    def half(seq):
        h = []
        for p in seq:
            while len(h) >= 2:
                (ax, ay), (bx, by) = np.subtract(h[-1], h[-2]), np.subtract(p, h[-2])
                if ax * by - ay * bx > 0:
                    break
                h.pop()
            h.append(p)
        return h

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def inflate_convex(poly: np.ndarray, margin: float, arc_points: int = 3) -> np.ndarray:
    """A convex polygon containing the Minkowski sum of ``poly`` and a disc of radius ``margin``
    (each corner replaced by an outer polygonal arc), counter-clockwise."""
    out = []
    n = len(poly)
    for i in range(n):
        prev, cur, nxt = poly[i - 1], poly[i], poly[(i + 1) % n]
        e0, e1 = cur - prev, nxt - cur
        a0 = np.arctan2(-e0[0], e0[1])  # outward normal angle of the incoming edge (CCW polygon)
        a1 = np.arctan2(-e1[0], e1[1])
        da = (a1 - a0) % (2 * np.pi)
        # Outer arc: points at radius margin / cos(half step) so the chords stay outside the disc.
        step = da / arc_points
        r = margin / np.cos(step / 2) if arc_points > 0 else margin
        for k in range(arc_points + 1):
            a = a0 + k * step
            out.append(cur + r * np.array([np.cos(a), np.sin(a)]))
    return np.array(out)


def segment_hits_convex(p: np.ndarray, q: np.ndarray, poly: np.ndarray) -> bool:
    """Whether the open segment p-q passes through the interior of the convex CCW ``poly``
    (Cyrus–Beck clipping of the segment against each edge's half-plane)."""
    e = np.roll(poly, -1, axis=0) - poly
    d = q - p
    num = e[:, 0] * (p[1] - poly[:, 1]) - e[:, 1] * (p[0] - poly[:, 0])  # > 0: p inside edge i
    den = e[:, 0] * d[1] - e[:, 1] * d[0]
    par = np.abs(den) < 1e-12
    if np.any(par & (num <= 0)):
        return False
    t = -num[~par] / den[~par]
    dn = den[~par]
    t0 = max(0.0, float(t[dn > 0].max(initial=0.0)))
    t1 = min(1.0, float(t[dn < 0].min(initial=1.0)))
    return t1 - t0 > 1e-9


def path_around(p: np.ndarray, q: np.ndarray, poly: np.ndarray) -> list[np.ndarray]:
    """Shortest polyline from p to q that avoids the interior of the convex CCW ``poly``: the
    waypoints after p (ending with q). Both ends must lie outside ``poly``.

    The path leaves p at one of its two tangent vertices, follows the boundary and reaches q from
    one of q's tangent vertices; both ways round are tried and the shorter is kept."""
    if not segment_hits_convex(p, q, poly):
        return [q]
    n = len(poly)
    e = np.roll(poly, -1, axis=0) - poly

    def visible(x):  # edge i (poly[i] -> poly[i+1]) faces x
        return e[:, 0] * (x[1] - poly[:, 1]) - e[:, 1] * (x[0] - poly[:, 0]) < 0

    vis_p, vis_q = visible(p), visible(q)
    if not vis_p.any() or not vis_q.any():
        return [q]  # an end inside the polygon: no detour helps
    vq_vertex = vis_q | np.roll(vis_q, 1)  # vertex k is seen from q through edge k or k-1
    best, best_len = [q], np.inf
    for step in (1, -1):
        # CCW: leave at the end of p's visible chain; CW: at its start.
        prev = np.roll(vis_p, 1)
        tangents = np.flatnonzero(prev & ~vis_p) if step == 1 else np.flatnonzero(~prev & vis_p)
        if len(tangents) == 0:
            continue
        k = int(tangents[0])
        path = [poly[k]]
        for _ in range(n):
            if vq_vertex[k]:
                break
            k = (k + step) % n
            path.append(poly[k])
        pts = [p] + path + [q]
        length = polyline_length(pts)
        if length < best_len:
            best, best_len = path + [q], length
    return best


def polyline_length(points: list[np.ndarray]) -> float:
    return float(np.linalg.norm(np.diff(np.asarray(points), axis=0), axis=1).sum())


def point_polygon_distance(point: np.ndarray, poly: np.ndarray) -> float:
    """Distance from a point to the boundary of a polygon (0 inside for convex polygons is not
    implied: callers test insidence separately)."""
    best = np.inf
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        ab = b - a
        t = np.clip(np.dot(point - a, ab) / max(np.dot(ab, ab), 1e-18), 0.0, 1.0)
        best = min(best, float(np.linalg.norm(point - (a + t * ab))))
    return best


def inside_convex(point: np.ndarray, poly: np.ndarray) -> bool:
    e = np.roll(poly, -1, axis=0) - poly
    return bool(np.all(e[:, 0] * (point[1] - poly[:, 1]) - e[:, 1] * (point[0] - poly[:, 0]) >= 0))
