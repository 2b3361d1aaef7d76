"""BSDS-style boundary matching for the edge metric: thinning to one-pixel-wide curves and the maximum matching of
predicted to true boundary pixels within a distance."""

import math

import numpy as np

# Neighbours x1..x8 of the thinning algorithm: E, NE, N, NW, W, SW, S, SE as (row, column) offsets.
_NEIGHBOURS: tuple[tuple[int, int], ...] = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of the thinning of Lam, Lee & Suen (1992, p. 879), the algorithm
    of MATLAB's `bwmorph(bw, 'thin', Inf)` that the BSDS benchmark applies to thresholded boundary maps."""
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]  # x[0] is x1 ... x[7] is x8
        crossings = sum(1 for i in range(4) if not x[2 * i] and (x[2 * i + 1] or x[(2 * i + 2) % 8]))
        n1 = sum(x[2 * k] | x[2 * k + 1] for k in range(4))
        n2 = sum(x[2 * k + 1] | x[(2 * k + 2) % 8] for k in range(4))
        if crossings != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = ((x[1] | x[2] | (1 - x[7])) & x[0]) == 0
        second[code] = ((x[5] | x[6] | (1 - x[3])) & x[4]) == 0
    return first, second


_THIN_TABLES = _thinning_tables()


def thin_boundaries(mask: np.ndarray) -> np.ndarray:
    """Thins a boolean map to one-pixel-wide curves (MATLAB `bwmorph(mask, 'thin', Inf)`), keeping 8-connectivity.
    One-pixel-wide curves, such as the output of this function, are left unchanged."""
    out = np.asarray(mask, dtype=bool).copy()
    if out.ndim != 2:
        raise ValueError(f"edge: boundary maps must be 2-D, got shape {out.shape}.")
    height, width = out.shape
    weights = [np.uint8(1 << bit) for bit in range(8)]
    while True:
        changed = False
        for table in _THIN_TABLES:
            padded = np.pad(out, 1)
            code = np.zeros((height, width), dtype=np.uint8)
            for weight, (dy, dx) in zip(weights, _NEIGHBOURS, strict=True):
                code |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] * weight
            delete = out & table[code]
            if delete.any():
                out[delete] = False
                changed = True
        if not changed:
            return out


def _candidate_pairs(pred: np.ndarray, target: np.ndarray, max_distance: float):
    """Pairs (predicted pixel id, ground-truth pixel id) at most `max_distance` apart, nearest pairs first."""
    pred_points = np.argwhere(pred)
    num_target = int(target.sum())
    height, width = target.shape
    target_id = np.full(target.shape, -1, dtype=np.int64)
    target_id[target] = np.arange(num_target)
    reach = int(math.floor(max_distance))
    offsets = [
        (dy * dy + dx * dx, dy, dx)
        for dy in range(-reach, reach + 1)
        for dx in range(-reach, reach + 1)
        if dy * dy + dx * dx <= max_distance * max_distance
    ]
    rows, cols = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for _, dy, dx in sorted(offsets):
        y = pred_points[:, 0] + dy
        x = pred_points[:, 1] + dx
        inside = np.flatnonzero((y >= 0) & (y < height) & (x >= 0) & (x < width))
        ids = target_id[y[inside], x[inside]]
        hit = ids >= 0
        rows.append(inside[hit])
        cols.append(ids[hit])
    return len(pred_points), num_target, np.concatenate(rows), np.concatenate(cols)


def _maximum_matching(num_pred: int, num_target: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Maximum-cardinality bipartite matching of the edges (rows[i], cols[i]), listed nearest first; returns the
    ground-truth id matched to each predicted pixel (-1 if none).

    A greedy nearest-first matching, then rounds of augmenting paths (all found by one breadth-first search from
    the unmatched predicted pixels, scipy) until none is left, which makes the matching maximum (Berge's theorem).
    On boundary maps this is much faster than a Hopcroft-Karp run from scratch, whose augmenting paths run along
    the curves."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    match_pred = np.full(num_pred, -1, dtype=np.int64)
    match_target = np.full(num_target, -1, dtype=np.int64)
    while True:  # greedy: every free predicted pixel proposes to its nearest free one, which keeps the nearest
        free = (match_pred[rows] < 0) & (match_target[cols] < 0)
        if not free.any():
            break
        r, c = rows[free], cols[free]
        _, first = np.unique(r, return_index=True)
        first.sort()
        r, c = r[first], c[first]
        _, accepted = np.unique(c, return_index=True)
        match_pred[r[accepted]] = c[accepted]
        match_target[c[accepted]] = r[accepted]
    num_nodes = 1 + num_pred + num_target  # node 0 is a source linked to every free predicted pixel
    while True:
        free_pred = np.flatnonzero(match_pred < 0)
        if free_pred.size == 0:
            break
        matched = match_pred[rows] == cols
        # Alternating graph: free source -> free predicted pixels, unmatched edges predicted -> ground truth,
        # matched edges ground truth -> predicted.
        source = np.concatenate(
            [np.zeros(free_pred.size, dtype=np.int64), 1 + rows[~matched], 1 + num_pred + cols[matched]]
        )
        target = np.concatenate([1 + free_pred, 1 + num_pred + cols[~matched], 1 + rows[matched]])
        graph = csr_matrix((np.ones(source.size, dtype=np.int8), (source, target)), shape=(num_nodes, num_nodes))
        _, parent = breadth_first_order(graph, 0, directed=True, return_predecessors=True)
        ends = np.flatnonzero((parent[1 + num_pred :] >= 0) & (match_target < 0))
        if ends.size == 0:
            break
        used = np.zeros(num_nodes, dtype=bool)
        for end in ends:
            path, node = [], 1 + num_pred + int(end)
            while node != 0 and not used[node]:
                path.append(node)
                node = int(parent[node])
            if node != 0:
                continue  # shares a node with a path augmented in this round
            used[path] = True
            for i in range(0, len(path), 2):  # path = [target, pred, target, pred, ..., pred]
                target_node, pred_node = path[i] - 1 - num_pred, path[i + 1] - 1
                match_pred[pred_node] = target_node
                match_target[target_node] = pred_node
    return match_pred


def match_boundaries(pred: np.ndarray, target: np.ndarray, max_distance: float) -> int:
    """Size of a maximum one-to-one matching between predicted and ground-truth boundary pixels, where a pair may
    match when the pixels are at most `max_distance` pixels apart (Euclidean). Each pixel counts once, so two
    predicted edges beside one ground-truth edge match it once, as in the BSDS benchmark's `correspondPixels`.

    BSDS solves a min-cost assignment with outlier costs (which first maximises the number of matches); this
    finds a maximum-cardinality matching, the same count without BSDS's preference for nearer pairs among
    matchings of equal size."""
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"edge: boundary maps must be 2-D and of one shape, got {pred.shape} and {target.shape}.")
    if not pred.any() or not target.any():
        return 0
    num_pred, num_target, rows, cols = _candidate_pairs(pred, target, max_distance)
    if rows.size == 0:
        return 0
    return int((_maximum_matching(num_pred, num_target, rows, cols) >= 0).sum())


__all__ = ["thin_boundaries", "match_boundaries"]
