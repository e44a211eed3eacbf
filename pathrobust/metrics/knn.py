"""Exact k-nearest neighbours by cosine similarity, chunked, CPU or CUDA, in O(chunk · n) memory.

Rows are L2-normalised (norms in float64, then cast to the compute dtype); neighbours are ordered by
cosine similarity, which on unit vectors is the order of Euclidean distance (PathoROB's
``KNeighborsClassifier`` on ``Normalizer``-ed embeddings) and of cosine distance (croma's
``NearestNeighbors(metric="cosine")``).

Memory. Query rows are processed in chunks: one ``(chunk, n)`` block of similarities
(``x[rows] @ x.T``, the GEMM), then each row's top ``K = k + pad`` by ``torch.topk``. No
``n × n`` matrix exists at any time.

Exclusions. Each query can exclude candidates: itself always, and with ``groups`` every row of
its own group (PathoROB's "neighbours from the query's own slide"). PathoROB fetches
``k + (largest slide)`` neighbours, drops those of the query's slide and keeps the first k;
setting the excluded similarities to ``-inf`` before the top-k returns exactly that list, since
the longer fetch always keeps at least k rows of other slides. :class:`TypedNeighbours`
restricts candidates further to one neighbour type (croma's CRoMa: the nearest same-class /
other-centre and other-class / same-centre neighbours).

Near-ties decided in float64. The answer is defined by the float64 similarities of the
float64-normalised rows (exact ties: lower row index first). A float32 similarity of unit
vectors differs from the exact value by at most ``b = (d + 3) · u`` (``u = 2**-24``; ``d``
products and a sum in any order, plus the rounding of the inputs to float32), and a float64
one by the same with ``u = 2**-53``. In each row's sorted top-K list, neighbours whose computed
similarities are within ``W = 2 · (b_compute + b_float64)`` of their predecessor form a
*cluster*; the order *between* clusters is certain, the order *within* a cluster is recomputed
from float64 dot products (ties by index). A cluster at rank k that runs to the end of the
fetched list is refetched with a longer list. With ``order="boundary"`` (default) only the
clusters at rank k and at the extra ``boundaries`` are recomputed: the *set* of the first b
neighbours is the float64 answer for each such b (what RI(b) and a k-NN vote depend on); with
``order="exact"`` every cluster up to rank k is, so the neighbour at every rank is the
float64 answer (what the whole RI-versus-k curve depends on). Either way this
holds whatever the compute dtype; only cluster members pay for a float64 dot product.
Rows closer than float64 rounding (~1e-13) are decided by index after those float64 dot
products; another float64 kernel may order such a pair differently.
Matmul precision is forced to ``"highest"`` during the search (TF32 would void the bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pathrobust.errors import UserError

DEFAULT_PAD = 16
CPU_BLOCK_BYTES = 256 * 2**20
CUDA_BLOCK_BYTES = 2 * 2**30


def dot_error_bound(d: int, dtype: torch.dtype) -> float:
    """Upper bound on |computed − exact| of a dot product of two unit vectors of length ``d``
    rounded to ``dtype`` and accumulated in ``dtype`` in any order: ``(d + 3) · u`` (u the unit
    roundoff), with 1% headroom."""
    u = torch.finfo(dtype).eps / 2
    m = (d + 3) * u
    return 1.01 * m / (1 - m)


@dataclass
class Neighbours:
    """k nearest eligible neighbours of each query, nearest first.

    ``indices`` ``(q, k)`` int64 row indices; ``similarities`` ``(q, k)`` float64 cosine
    similarities (float64-exact for rows of near-tie clusters, and for all when
    ``exact_values`` was asked; otherwise the compute dtype's values)."""

    indices: np.ndarray
    similarities: np.ndarray


class Exclusion:
    """Which candidates a query may not take as neighbours (itself always)."""

    def mask(self, rows: torch.Tensor, n: int) -> torch.Tensor | None:
        """Boolean ``(len(rows), n)``: True = excluded (the query itself is added by the caller)."""
        return None

    def eligible_counts(self, rows: np.ndarray) -> np.ndarray:
        """Number of eligible candidates of each query row, self excluded."""
        raise NotImplementedError


class SelfOnly(Exclusion):
    def __init__(self, n: int) -> None:
        self.n = n

    def eligible_counts(self, rows: np.ndarray) -> np.ndarray:
        return np.full(len(rows), self.n - 1, dtype=np.int64)


class SameGroup(Exclusion):
    """Excludes every row of the query's group (e.g. its slide)."""

    def __init__(self, groups: Sequence) -> None:
        codes, _ = _factorize(groups)
        self.codes = codes
        self.sizes = np.bincount(codes)
        self._device_codes: dict[torch.device, torch.Tensor] = {}

    def _codes_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_codes:
            self._device_codes[device] = torch.from_numpy(self.codes).to(device)
        return self._device_codes[device]

    def mask(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        g = self._codes_on(rows.device)
        return g[rows][:, None] == g[None, :]

    def eligible_counts(self, rows: np.ndarray) -> np.ndarray:
        return len(self.codes) - self.sizes[self.codes[rows]]


class TypedNeighbours(Exclusion):
    """Only neighbours of one type, of another group: ``"SO"`` (same label, other centre) or
    ``"OS"`` (other label, same centre)."""

    def __init__(self, labels: Sequence, centres: Sequence, groups: Sequence, kind: str) -> None:
        if kind not in ("SO", "OS"):
            raise ValueError(f"kind must be 'SO' or 'OS', not {kind!r}")
        self.kind = kind
        self.labels = _factorize(labels)[0]
        self.centres = _factorize(centres)[0]
        self.groups = SameGroup(groups)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def mask(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        dev = rows.device
        if dev not in self._dev:
            self._dev[dev] = (torch.from_numpy(self.labels).to(dev), torch.from_numpy(self.centres).to(dev))
        lab, cen = self._dev[dev]
        same_label = lab[rows][:, None] == lab[None, :]
        same_centre = cen[rows][:, None] == cen[None, :]
        wanted = (same_label & ~same_centre) if self.kind == "SO" else (~same_label & same_centre)
        return ~wanted | self.groups.mask(rows, n)

    def eligible_counts(self, rows: np.ndarray) -> np.ndarray:
        lab, cen, grp = self.labels, self.centres, self.groups.codes
        n_lab, n_cen = int(lab.max()) + 1, int(cen.max()) + 1

        def count(key: np.ndarray) -> np.ndarray:  # number of rows sharing each row's key
            inverse = np.unique(key, return_inverse=True)[1]
            return np.bincount(inverse)[inverse]

        lc = lab * n_cen + cen
        per_lc, per_l, per_c = count(lc), count(lab), count(cen)
        grp = grp.astype(np.int64)
        per_glc = count((grp * n_lab + lab) * n_cen + cen)  # a group may span cells (cases with classes)
        if self.kind == "SO":  # same label, other centre, other group
            eligible = (per_l - per_lc) - (count(grp * n_lab + lab) - per_glc)
        else:  # other label, same centre, other group
            eligible = (per_c - per_lc) - (count(grp * n_cen + cen) - per_glc)
        return eligible[rows]


def _factorize(values: Sequence) -> tuple[np.ndarray, np.ndarray]:
    uniq, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), uniq


@contextlib.contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def compute_dtype_for(x: np.ndarray | torch.Tensor) -> torch.dtype:
    """float64 input computes in float64; everything else (float32, float16, bfloat16) in float32."""
    dt = x.dtype if torch.is_tensor(x) else torch.from_numpy(np.zeros(0, dtype=np.asarray(x).dtype)).dtype
    return torch.float64 if dt == torch.float64 else torch.float32


def check_embeddings(x: np.ndarray | torch.Tensor, source: str = "embeddings") -> None:
    """One-line UserError for NaN/inf or all-zero rows (cosine order undefined)."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != 2:
        raise UserError(f"{source}: expected a 2-D (n, d) array, got shape {tuple(t.shape)}")
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise UserError(f"{source}: {len(bad)} row(s) contain NaN or inf (first: row {int(bad[0])})")
    zero = (t == 0).all(dim=1)
    if bool(zero.any()):
        bad = torch.nonzero(zero).flatten()
        raise UserError(f"{source}: {len(bad)} all-zero row(s) have no direction (first: row {int(bad[0])})")


def default_chunk(n: int, itemsize: int, device: torch.device) -> int:
    budget = CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES
    return int(max(1, min(n, budget // max(1, n * (itemsize + 1)))))


def knn(x: np.ndarray | torch.Tensor, k: int, *, groups: Sequence | None = None, exclusion: Exclusion | None = None,
        queries: np.ndarray | None = None, device: str | torch.device = "cpu", chunk: int | None = None,
        pad: int = DEFAULT_PAD, order: str = "boundary", boundaries: Sequence[int] = (),
        exact_values: bool = False, source: str = "embeddings") -> Neighbours:
    """The ``k`` nearest eligible rows of each query row, in the float64 order (see the module doc).

    Args:
        x: embeddings ``(n, d)``, any float dtype; not modified. float64 computes in float64,
            others in float32; both return the float64 answer.
        k: neighbours per query.
        groups: ``(n,)`` group of each row (slide id): rows of the query's group are excluded.
        exclusion: an :class:`Exclusion` instead of ``groups`` (e.g. :class:`TypedNeighbours`).
        queries: ``(q,)`` row indices to search for (default: all rows).
        device: ``"cpu"`` or ``"cuda"``.
        chunk: query rows per GEMM block (default: a block of ~256 MiB on CPU, 2 GiB on CUDA).
        pad: extra candidates fetched beyond k to see the near-tie cluster at the boundary.
        order: ``"boundary"``: the set of the first b neighbours is the float64 answer for b = k
            and each of ``boundaries``; ``"exact"``: the neighbour at every rank is (module doc).
        boundaries: extra ranks (<= k) whose neighbour sets must be exact in ``"boundary"`` order.
        exact_values: return float64 similarities for every neighbour (one float64 dot
            product per neighbour), not only for near-tie clusters.

    Raises:
        UserError: NaN/inf/zero rows, or a query with fewer than ``k`` eligible neighbours.
    """
    if order not in ("boundary", "exact"):
        raise ValueError(f"order must be 'boundary' or 'exact', not {order!r}")
    check_embeddings(x, source)
    device = torch.device(device)
    n, d = x.shape
    if k < 1:
        raise UserError(f"k = {k}: must be at least 1")
    ranks = np.arange(1, k + 1) if order == "exact" else np.unique([k, *[b for b in boundaries if 1 <= b <= k]])
    if exclusion is None:
        exclusion = SameGroup(groups) if groups is not None else SelfOnly(n)
    queries = np.arange(n, dtype=np.int64) if queries is None else np.asarray(queries, dtype=np.int64)
    eligible = exclusion.eligible_counts(queries)
    if len(queries) and eligible.min() < k:
        worst = int(np.argmin(eligible))
        raise UserError(f"{source}: row {int(queries[worst])} has {int(eligible[worst])} eligible neighbours "
                        f"(other groups), fewer than k = {k}; lower k or add rows from other slides")
    cdtype = compute_dtype_for(x)
    x64 = UnitRows(x, device)
    xc = x64.all(cdtype)
    window = 2 * (dot_error_bound(d, cdtype) + dot_error_bound(d, torch.float64))
    chunk = chunk or default_chunk(n, xc.element_size(), device)
    out_idx = np.empty((len(queries), k), np.int64)
    out_sim = np.empty((len(queries), k), np.float64)
    q_t = torch.from_numpy(queries).to(device)
    with _highest_matmul_precision(), torch.no_grad():
        for c0 in range(0, len(queries), chunk):
            rows = q_t[c0:c0 + chunk]
            idx, sim = _search_rows(xc, x64, rows, k, exclusion, window, pad, ranks, exact_values)
            out_idx[c0:c0 + len(rows)] = idx
            out_sim[c0:c0 + len(rows)] = sim
    return Neighbours(out_idx, out_sim)


def _block(xc: torch.Tensor, rows: torch.Tensor, exclusion: Exclusion) -> torch.Tensor:
    """Similarities ``(len(rows), n)`` with excluded candidates (and the query itself) at -inf."""
    r0 = int(rows[0])
    contiguous = bool((rows == torch.arange(r0, r0 + len(rows), device=rows.device)).all())
    sims = (xc[r0:r0 + len(rows)] if contiguous else xc[rows]) @ xc.T
    mask = exclusion.mask(rows, xc.shape[0])
    if mask is not None:
        sims.masked_fill_(mask, float("-inf"))
    sims[torch.arange(len(rows), device=sims.device), rows] = float("-inf")
    return sims


def _search_rows(xc: torch.Tensor, x64: "UnitRows", rows: torch.Tensor, k: int, exclusion: Exclusion,
                 window: float, pad: int, ranks: np.ndarray, exact_values: bool) -> tuple[np.ndarray, np.ndarray]:
    n = xc.shape[0]
    fetch = min(n, k + pad)
    sims = _block(xc, rows, exclusion)
    vals, idx = sims.topk(fetch, dim=1)
    del sims
    vals = vals.double().cpu().numpy()
    idx = idx.cpu().numpy()
    rows_np = rows.cpu().numpy()
    # rows whose boundary cluster may continue past the fetched list: fetch longer lists
    while fetch < n:
        over = _boundary_overflow(vals, k, window)
        if not over.any():
            break
        fetch = min(n, 2 * fetch)
        sub = rows[torch.from_numpy(np.nonzero(over)[0]).to(rows.device)]
        v2, i2 = _block(xc, sub, exclusion).topk(fetch, dim=1)
        vals, idx = _widen(vals, idx, fetch)
        vals[over], idx[over] = v2.double().cpu().numpy(), i2.cpu().numpy()
    vals, idx = _resolve_clusters(x64, rows_np, vals, idx, ranks, window)
    vals, idx = vals[:, :k], idx[:, :k]
    if exact_values:
        vals = _float64_dots(x64, np.repeat(rows_np, k), idx.reshape(-1)).reshape(idx.shape)
    return idx, vals


def _widen(vals: np.ndarray, idx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.full((len(vals), width), -np.inf)
    i = np.zeros((len(idx), width), np.int64)
    v[:, :vals.shape[1]], i[:, :idx.shape[1]] = vals, idx
    return v, i


def _close_gaps(vals: np.ndarray, window: float) -> np.ndarray:
    """``(q, K-1)``: True where neighbour j+1 is within ``window`` of neighbour j (finite only)."""
    with np.errstate(invalid="ignore"):
        gap = vals[:, :-1] - vals[:, 1:]
    return np.isfinite(vals[:, 1:]) & (gap <= window)


def _boundary_overflow(vals: np.ndarray, k: int, window: float) -> np.ndarray:
    """Rows whose cluster containing rank k (position k-1) reaches the last fetched position."""
    if vals.shape[1] <= k:
        return np.zeros(len(vals), bool)
    return _close_gaps(vals[:, k - 1:], window).all(axis=1)


class UnitRows:
    """The rows divided by their float64 norms (``F.normalize`` in float64), without keeping a
    float64 copy of the matrix unless float64 is the compute dtype: rows are rebuilt in
    float64 when gathered (``self[idx]``)."""

    def __init__(self, x: np.ndarray | torch.Tensor, device: torch.device, block: int = 8192) -> None:
        t = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        self.x = t.to(device)
        self.device = device
        self.block = block
        self.norms = torch.cat([self.x[s:s + block].double().norm(dim=1) for s in range(0, len(self.x), block)])
        self._full64: torch.Tensor | None = None

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self._full64 is not None:
            return self._full64[idx]
        return self.x[idx].double() / self.norms[idx, None]

    def all(self, dtype: torch.dtype) -> torch.Tensor:
        """Every unit row in ``dtype`` (float64: kept and reused for gathers)."""
        parts = [(self.x[s:s + self.block].double() / self.norms[s:s + self.block, None]).to(dtype)
                 for s in range(0, len(self.x), self.block)]
        out = torch.cat(parts)
        if dtype == torch.float64:
            self._full64 = out
        return out


def _float64_dots(x64: UnitRows, a: np.ndarray, b: np.ndarray, block: int = 2048) -> np.ndarray:
    """``x64[a_i] · x64[b_i]`` in float64, pair by pair, gathered on the device in blocks small
    enough to stay in cache (large gathers are page-fault bound on CPU)."""
    ia_all = torch.from_numpy(np.ascontiguousarray(a)).to(x64.device)
    ib_all = torch.from_numpy(np.ascontiguousarray(b)).to(x64.device)
    parts = []
    for s in range(0, len(a), block):
        qa, qb = x64[ia_all[s:s + block]], x64[ib_all[s:s + block]]
        parts.append(torch.bmm(qa[:, None, :], qb[:, :, None]).flatten())
    return torch.cat(parts).cpu().numpy() if parts else np.empty(0, np.float64)


def _resolve_clusters(x64: "UnitRows", rows: np.ndarray, vals: np.ndarray, idx: np.ndarray, ranks: np.ndarray,
                      window: float) -> tuple[np.ndarray, np.ndarray]:
    """Re-order by float64 similarity (ties by index) the near-tie clusters that contain one of
    the 1-based ``ranks``. ``vals``/``idx`` ``(q, K)`` sorted descending; returns new arrays."""
    close = _close_gaps(vals, window)  # (q, K-1)
    q, width = vals.shape
    starts = np.ones((q, width), bool)
    starts[:, 1:] = ~close
    cid = np.cumsum(starts, axis=1)  # cluster number along each row, from 1
    in_cluster = np.zeros((q, width), bool)
    in_cluster[:, :-1] |= close
    in_cluster[:, 1:] |= close
    at_ranks = cid[:, ranks - 1]  # (q, r): the clusters whose order decides a neighbour set
    wanted = np.zeros((q, width + 2), bool)
    wanted[np.arange(q)[:, None], at_ranks] = True
    in_cluster &= np.take_along_axis(wanted, cid, axis=1)
    if not in_cluster.any():
        return vals, idx
    r, p = np.nonzero(in_cluster)  # row-major: positions of each cluster are contiguous
    s64 = _float64_dots(x64, rows[r], idx[r, p])
    cand = idx[r, p]
    order = np.lexsort((cand, -s64, r * (width + 1) + cid[r, p]))
    vals, idx = vals.copy(), idx.copy()
    vals[r, p] = s64[order]
    idx[r, p] = cand[order]
    return vals, idx
