"""Costs as exact functions of shape: trace a phase at a few shapes, fit every op row, evaluate anywhere.

A :class:`CostFunction` maps integer shape variables (batch, sequence or context length, image
size...) to a phase's op table. It is *built from traces of the model's own code*, not from a
formula somebody wrote, and then evaluated without tracing: vectorized over arrays of shapes
(:meth:`CostFunction.values`, floats, for sweeps) or as a full op table at one shape
(:meth:`CostFunction.table_at`, exact integers, the same columns :func:`~cohw_utils.spine.trace.trace`
returns).

Semantics
---------
* **Rows.** Traces at different shapes of one phase run the same aten ops in the same order
  (the code path does not depend on the sizes inside a box, see below); row ``i`` of every trace
  is the same op of the same module. Each row's numbers -- ``flops``, ``flops_effective``,
  ``macs``, ``bytes_read``, ``bytes_written`` and every dimension of its input and output
  shapes -- are fitted as a polynomial in the variables, of degree ``Variable.degree`` in each
  (a transformer's FLOPs and bytes in batch ``B`` and length ``T``: the monomials
  ``1, B, T, BT, T^2, BT^2``).
* **Exact fit.** The coefficients are solved in rational arithmetic (:class:`fractions.Fraction`)
  on a tensor grid of ``degree + 1`` values per variable, so there is no least-squares error;
  rows that are identical at every traced shape (the 80 layers of a 70B model) share one *kind*.
* **Piecewise.** Where the code has a cap or a switch the domain is cut into boxes at
  ``Variable.breakpoints`` (a new box starts at each): a sliding window ``min(T, W)``, a chunked
  attention, the experts a batch touches (``min(E, tokens x k)``, the grouped-GEMM cost rule of
  :mod:`cohw_utils.spine.costs`). Each box has its own polynomials. A box with at most
  ``table_points`` shapes is traced at every one of them (the interpolation then reproduces each).
* **Verification.** Every box is traced again at its corners and at ``random_checks`` random
  shapes inside it, and compared row by row, exactly. A box is **exact** when every check agrees;
  a failing check on a box's lower edge (code that branches at batch 1 or length 1) splits that
  edge off as its own box and refits; otherwise the box's top value (a fit point) is split off
  once per variable (a decode cache reaches a window one token before the attention does); a
  failure after that leaves the box marked not exact, with its largest relative difference in
  total FLOPs and bytes (``Box.max_rel_diff``).
* **Scalars.** Numbers of a trace that are not op rows (``table.attrs["scalars"]``: the tokens a
  phase processes, its measured cache at the shape) are fitted and checked like a row; the
  cached ``analyze`` reads them (:func:`~cohw_utils.spine.phase_costs.cached_analysis`).
* **Known non-polynomial rows.** A comparison sort or top-k counts ``log2(min(k, n))`` per element
  and a binary search ``ceil(log2 n)`` per query (:mod:`cohw_utils.core.counting`): not
  polynomials, and a mixture of experts sorts its ``tokens x k`` routed pairs. For those ops the
  fit finds which dimension is sorted (the one the rule's formula reproduces at every fit point)
  and evaluates the same formula on the row's fitted shapes, so the FLOPs stay exact.
* **What "exact" claims.** Equal to a direct trace at every shape the build traced (fit and check
  points); between them it rests on each row's costs being polynomials of the stated degrees
  inside a box -- true of dense, latent, windowed and MoE attention and of convolutions on a
  fixed stride grid -- which the random checks test but cannot prove. Outside ``[lo, hi]`` of a
  variable the function refuses to evaluate. A box's unbounded upper edge (``hi=None``, batch) is
  checked at ``check_hi``.

The builder takes any ``trace_at(point) -> op table`` callable; :func:`phase_cost_function` is
the one for a registry workload or config (through :func:`~cohw_utils.spine.analyze.analyze`,
full scale on ``meta``), cached on disk (:mod:`cohw_utils.spine.phase_costs`).

Used by the ``predict`` and ``sweep`` commands, Chapter 4.5's predictor and the benchmarks'
sweeps (``benchmarks/bench_sweep.py``).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cohw_utils.core.counting import (search_comparisons, search_comparisons_array, sort_comparisons,
                                      sort_comparisons_array)
from cohw_utils.core.errors import CohwError

__all__ = ["Variable", "Box", "CostFunction", "build_cost_function", "QUANTITIES"]

#: The numeric columns of an op table a cost function reproduces (shape dimensions come on top).
QUANTITIES = ("flops", "flops_effective", "macs", "bytes_read", "bytes_written")
#: Op-table columns that are the same at every shape (per row); ``module`` and ``phase`` stay in
#: the template only, the rest also key a row's kind.
_ATTRS = ("op", "module_class", "pass", "op_class", "dtype", "costed")
_TEMPLATE = ("op", "module", "module_class", "phase", "pass", "op_class", "dtype", "costed")

Point = tuple[int, ...]


@dataclass(frozen=True)
class Variable:
    """One integer shape variable of a cost function.

    ``name`` is the keyword the trace callable takes (``batch``, ``seq_len``, ``image_size``);
    values run over ``lo, lo + step, ...`` up to ``hi`` (``None``: unbounded, checked up to
    ``check_hi``); ``degree`` is the polynomial degree the costs have in it; ``breakpoints``
    are values where a new box starts (each a multiple of ``step`` inside the range).
    """

    name: str
    lo: int = 1
    hi: int | None = None
    degree: int = 1
    step: int = 1
    breakpoints: tuple[int, ...] = ()
    check_hi: int = 256

    def __post_init__(self) -> None:
        if self.lo < 1 or self.step < 1 or self.lo % self.step:
            raise CohwError(f"variable {self.name}: lo ({self.lo}) must be a positive multiple of step ({self.step})")
        if self.hi is not None and self.hi < self.lo:
            raise CohwError(f"variable {self.name}: hi ({self.hi}) is below lo ({self.lo})")
        if self.degree < 0:
            raise CohwError(f"variable {self.name}: degree must be >= 0, got {self.degree}")

    def edges(self) -> list[tuple[int, int | None]]:
        """The ``[lo, hi]`` intervals the breakpoints cut the range into."""
        top = self.hi if self.hi is not None else math.inf
        cuts = sorted({b for b in self.breakpoints if self.lo < b <= top and b % self.step == 0})
        starts = [self.lo, *cuts]
        ends: list[int | None] = [c - self.step for c in cuts] + [self.hi]
        return list(zip(starts, ends))


# Rows whose FLOPs follow a known non-polynomial formula of their shapes (module docstring). Each
# formula: candidates(ins, outs) -> specs, and value(ins, outs, spec, exact) with ``ins``/``outs``
# the row's input/output shapes (ints when exact, float arrays for a vectorized sweep).
def _sort_candidates(ins: list, outs: list) -> list[tuple[int, ...]]:
    if not ins or not outs or len(ins[0]) != len(outs[0]):
        return []
    return [(d,) for d in range(len(ins[0]))]


def _sort_value(ins: list, outs: list, spec: tuple[int, ...], exact: bool):
    (d,) = spec
    numel = math.prod(ins[0]) if exact else np.prod(np.stack(ins[0]), axis=0)
    if exact:
        return sort_comparisons(numel, ins[0][d], outs[0][d])
    return sort_comparisons_array(numel, ins[0][d], outs[0][d])


def _search_candidates(ins: list, outs: list) -> list[tuple[int, ...]]:
    return [()] if ins and outs and ins[0] else []


def _search_value(ins: list, outs: list, spec: tuple[int, ...], exact: bool):
    if exact:
        return search_comparisons(math.prod(outs[0]), ins[0][-1])
    return search_comparisons_array(np.prod(np.stack(outs[0]), axis=0) if outs[0] else 1.0, ins[0][-1])


_FORMULAS: dict[str, tuple[Callable, Callable]] = {
    "sort": (_sort_candidates, _sort_value),
    "search": (_search_candidates, _search_value),
}
#: aten op (without overload) -> the formula its cost rule uses.
_DERIVED_OPS = {"aten.sort": "sort", "aten.argsort": "sort", "aten.msort": "sort", "aten.topk": "sort",
                "aten.searchsorted": "search"}


def _split_dims(struct: tuple, dims: Sequence) -> tuple[list, list]:
    """A row's flat dimensions back into its input and output shapes."""
    it = iter(dims)
    ins = [tuple(next(it) for _ in range(r)) for r in struct[0]]
    outs = [tuple(next(it) for _ in range(r)) for r in struct[1]]
    return ins, outs


def _derive(kind: dict[str, Any], nums_at: list[list]) -> list | None:
    """``[formula, *spec]`` when ``kind``'s FLOPs (and effective FLOPs) at every fit point are its
    op's formula of its shapes; None otherwise."""
    name = _DERIVED_OPS.get(kind["op"].rsplit(".", 1)[0])
    if name is None:
        return None
    candidates, value = _FORMULAS[name]
    shapes = [_split_dims(kind["struct"], nums[len(QUANTITIES):]) for nums in nums_at]
    for spec in candidates(*shapes[0]):
        try:
            ok = all(nums[0] == nums[1] == value(ins, outs, spec, True) if nums[1] is not None
                     else nums[0] == value(ins, outs, spec, True)
                     for nums, (ins, outs) in zip(nums_at, shapes))
        except (IndexError, ValueError):
            ok = False
        if ok:
            return [name, *spec]
    return None


@dataclass
class Box:
    """One box of the domain with its own op sequence and polynomials.

    ``lo``/``hi`` per variable (``hi`` None: unbounded); ``template`` one row per op (the columns
    that do not depend on shape, and ``kind``); ``kinds`` one dict per kind (its attributes and
    ``struct``, the ranks of its input and output shapes); ``exponents`` (m, n_vars) the monomials;
    ``numer`` [kind][quantity][monomial] integer numerators over ``denom`` (quantities:
    :data:`QUANTITIES`, then the kind's shape dimensions, zero-padded); ``exact`` whether every
    check agreed; ``fitted`` / ``checked`` the shapes it was solved on / compared at;
    ``scalar_numer`` the numerators of the trace's integer *scalars* (``table.attrs["scalars"]``:
    tokens processed, cache bytes at the context...), ``scalar_const`` its other scalars, equal at
    every traced shape of the box, ``scalar_varying`` the names of those that are neither (a text
    that quotes the shape): not reproduced, so a caller that needs them traces; ``scalar_names``
    all of them in the trace's order.
    """

    lo: Point
    hi: tuple[int | None, ...]
    exponents: np.ndarray
    template: pd.DataFrame | None = None
    kinds: list[dict[str, Any]] = field(default_factory=list)
    numer: list = field(default_factory=list)
    denom: int = 1
    exact: bool = True
    fitted: list[Point] = field(default_factory=list)
    checked: list[Point] = field(default_factory=list)
    max_rel_diff: float = 0.0
    note: str = ""
    scalar_numer: dict[str, list[int]] = field(default_factory=dict)
    scalar_const: dict[str, Any] = field(default_factory=dict)
    scalar_varying: list[str] = field(default_factory=list)
    scalar_names: list[str] = field(default_factory=list)
    _float: np.ndarray | None = field(default=None, repr=False)

    def contains(self, pts: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of ``pts`` (n, n_vars) inside this box."""
        ok = np.ones(len(pts), dtype=bool)
        for j, (a, b) in enumerate(zip(self.lo, self.hi)):
            ok &= pts[:, j] >= a
            if b is not None:
                ok &= pts[:, j] <= b
        return ok

    def coefficients(self) -> np.ndarray:
        """(kinds, quantities, m) float64 coefficients (for vectorized evaluation)."""
        if self._float is None:
            self._float = np.array(self.numer, dtype=float) / self.denom
        return self._float

    @property
    def multiplicity(self) -> np.ndarray:
        """How many template rows each kind stands for."""
        return np.bincount(self.template["kind"].to_numpy(), minlength=len(self.kinds))

    def kind_table(self) -> pd.DataFrame:
        """One row per kind: its attributes and ``count`` (template rows it stands for)."""
        out = pd.DataFrame([{c: k[c] for c in _ATTRS} for k in self.kinds])
        out["count"] = self.multiplicity
        return out

    def _monomials(self, point: Point) -> list[int]:
        """The box's monomials at ``point``, exact integers."""
        return [math.prod(x ** int(e) for x, e in zip(point, ex)) for ex in self.exponents]

    def exact_values(self, point: Point) -> list[list[int | Fraction]]:
        mono = self._monomials(point)
        out = []
        for spec, kind in zip(self.kinds, self.numer):
            row = []
            for coeffs in kind:
                q, r = divmod(sum(c * m for c, m in zip(coeffs, mono)), self.denom)
                row.append(q if r == 0 else Fraction(q * self.denom + r, self.denom))
            if spec.get("derived"):
                name, *args = spec["derived"]
                ins, outs = _split_dims(spec["struct"], [int(x) for x in row[len(QUANTITIES):]])
                row[0] = row[1] = _FORMULAS[name][1](ins, outs, tuple(args), True)
            out.append(row)
        return out

    def scalars_at(self, point: Point) -> dict[str, Any]:
        """The trace's scalars at ``point``: the integer ones from their polynomials, exactly."""
        mono = self._monomials(point)
        out = dict(self.scalar_const)
        for name, coeffs in self.scalar_numer.items():
            q, r = divmod(sum(c * m for c, m in zip(coeffs, mono)), self.denom)
            out[name] = q if r == 0 else Fraction(q * self.denom + r, self.denom)
        return {n: out[n] for n in self.scalar_names if n in out}  # in the trace's order

    def derived_values(self, mono: np.ndarray, values: np.ndarray, quantities: Sequence[str]) -> np.ndarray:
        """``values`` (n, kinds, len(quantities)) with the FLOPs of derived kinds (sorts, searches)
        evaluated by their formula on the fitted shapes at the monomials ``mono`` (n, m)."""
        targets = [i for i, q in enumerate(quantities) if q in ("flops", "flops_effective")]
        for k, spec in enumerate(self.kinds):
            if not spec.get("derived") or not targets:
                continue
            name, *args = spec["derived"]
            dims = np.rint(mono @ self.coefficients()[k, len(QUANTITIES):, :].T)  # (n, dims)
            ins, outs = _split_dims(spec["struct"], list(dims.T))
            v = _FORMULAS[name][1](ins, outs, tuple(args), False)
            for i in targets:
                values[:, k, i] = v
        return values


@dataclass
class CostFunction:
    """A phase's op table as exact functions of its shape variables (module docstring):
    ``boxes`` partition the domain, each with its op sequence and polynomials; ``meta`` holds what
    the build recorded (model, phase, dtype, traces...)."""

    variables: tuple[Variable, ...]
    boxes: list[Box]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    @property
    def exact(self) -> bool:
        """True when every box passed its checks."""
        return all(b.exact for b in self.boxes)

    def _points(self, points: Any) -> np.ndarray:
        pts = np.atleast_2d(np.asarray(points, dtype=np.int64))
        if pts.ndim != 2 or pts.shape[1] != len(self.variables):
            raise CohwError(f"points need {len(self.variables)} columns ({', '.join(self.names)}), got shape {pts.shape}")
        for j, v in enumerate(self.variables):
            col = pts[:, j]
            bad = (col < v.lo) | ((col - v.lo) % v.step != 0)
            if v.hi is not None:
                bad |= col > v.hi
            if bad.any():
                top = "" if v.hi is None else f" to {v.hi}"
                raise CohwError(f"{v.name} = {int(col[bad][0])} is outside this cost function's range ({v.lo}{top}, "
                                f"step {v.step}); rebuild it with a wider Variable range")
        return pts

    def box_index(self, points: Any) -> np.ndarray:
        """For each point, the index of the box holding it."""
        pts = self._points(points)
        out = np.full(len(pts), -1)
        for i, b in enumerate(self.boxes):
            out[b.contains(pts) & (out < 0)] = i
        return out

    def exact_at(self, points: Any) -> np.ndarray:
        """For each point, whether its box passed every check."""
        return np.array([self.boxes[i].exact for i in self.box_index(points)], dtype=bool)

    def per_box(self, points: Any, quantities: Sequence[str] = ("flops", "bytes_read", "bytes_written")):
        """Yield ``(box, selection mask, values)`` per box holding any of ``points``; ``values`` is
        float64 (n_selected, n_kinds, len(quantities)), one row of each kind (rounding ~1e-16
        relative; :meth:`table_at` and :meth:`totals_exact` give integers)."""
        pts = self._points(points)
        qi = [QUANTITIES.index(q) for q in quantities]
        idx = self.box_index(pts)
        for i, b in enumerate(self.boxes):
            sel = idx == i
            if sel.any():
                mono = np.prod(pts[sel][:, None, :].astype(float) ** b.exponents[None, :, :], axis=2)  # (n, m)
                vals = np.einsum("nm,kqm->nkq", mono, b.coefficients()[:, qi, :])
                yield b, sel, b.derived_values(mono, vals, quantities)

    def totals(self, points: Any, quantities: Sequence[str] = ("flops", "bytes_read", "bytes_written")) -> np.ndarray:
        """(n_points, len(quantities)) whole-table sums over costed rows, float64."""
        pts = self._points(points)
        out = np.zeros((len(pts), len(quantities)))
        for b, sel, vals in self.per_box(pts, quantities):
            costed = np.array([k["costed"] for k in b.kinds], dtype=float)
            out[sel] = np.einsum("nkq,k->nq", vals, b.multiplicity * costed)
        return out

    def _box_at(self, point: Sequence[int] | dict[str, int]) -> tuple[Box, Point]:
        if isinstance(point, dict):
            point = [point[n] for n in self.names]
        pt = tuple(int(x) for x in self._points([point])[0])
        return self.boxes[int(self.box_index([pt])[0])], pt

    def totals_exact(self, point: Sequence[int] | dict[str, int]) -> dict[str, int | Fraction]:
        """Exact whole-table sums of :data:`QUANTITIES` over costed rows at one point."""
        b, pt = self._box_at(point)
        vals, mult = b.exact_values(pt), b.multiplicity
        return {q: sum(vals[k][j] * int(mult[k]) for k in range(len(b.kinds)) if b.kinds[k]["costed"])
                for j, q in enumerate(QUANTITIES)}

    def table_at(self, point: Sequence[int] | dict[str, int]) -> pd.DataFrame:
        """The op table at one shape, exact (integers; NaN costs where the trace had no rule)."""
        b, pt = self._box_at(point)
        vals = b.exact_values(pt)
        per_kind = []
        for spec, v in zip(b.kinds, vals):
            nums = [float(x) if isinstance(x, Fraction) else x for x in v[:len(QUANTITIES)]]
            if not spec["costed"]:
                nums = [math.nan] * len(QUANTITIES)
            ins, outs = (tuple(x) for x in _split_dims(spec["struct"], [int(x) for x in v[len(QUANTITIES):]]))
            per_kind.append((nums, ins, outs))
        kinds = b.template["kind"].tolist()
        t = b.template.drop(columns="kind").copy()
        t["input_shapes"] = [per_kind[k][1] for k in kinds]
        t["output_shapes"] = [per_kind[k][2] for k in kinds]
        for j, q in enumerate(QUANTITIES):
            t[q] = pd.to_numeric(pd.Series([per_kind[k][0][j] for k in kinds], index=t.index))
        moved = t["bytes_read"] + t["bytes_written"]
        t["intensity"] = t["flops"] / moved.where(moved > 0)
        t["costed"] = t["costed"].astype(bool)
        order = [c for c in self.meta.get("columns", []) if c in t.columns] or list(t.columns)
        out = t[order]
        out.attrs.update(b.template.attrs)
        if b.scalar_numer or b.scalar_const:
            out.attrs["scalars"] = b.scalars_at(pt)
        return out

    def formula(self, quantity: str = "flops", point: Sequence[int] | dict[str, int] | None = None,
                rows: Callable[[pd.DataFrame], Any] | None = None, symbols: dict[str, str] | None = None):
        """The sum of ``quantity`` over the costed rows as a polynomial a reader can read (a sympy
        expression with exact rational coefficients), in the box holding ``point`` (default: the
        last box, the general case). ``rows(template) -> boolean mask`` keeps some rows (one layer's
        module prefix, one operator class); ``symbols`` names the variables (default ``B`` for
        batch, ``T`` for seq_len, ``S`` for image_size). A derived row (a sort) has no polynomial:
        asking for its FLOPs raises."""
        import sympy

        if quantity not in QUANTITIES:
            raise CohwError(f"quantity must be one of {', '.join(QUANTITIES)}, got {quantity!r}")
        b = self.boxes[-1] if point is None else self._box_at(point)[0]
        names = {"batch": "B", "seq_len": "T", "image_size": "S", **(symbols or {})}
        syms = [sympy.Symbol(names.get(n, n), positive=True, integer=True) for n in self.names]
        keep = np.ones(len(b.template), dtype=bool) if rows is None else np.asarray(rows(b.template), dtype=bool)
        counts = np.bincount(b.template["kind"].to_numpy()[keep], minlength=len(b.kinds))
        q = QUANTITIES.index(quantity)
        expr = sympy.Integer(0)
        for k, spec in enumerate(b.kinds):
            if not counts[k] or not spec["costed"]:
                continue
            if spec.get("derived") and quantity in ("flops", "flops_effective"):
                raise CohwError(f"{spec['op']} counts {spec['derived'][0]} comparisons (not a polynomial): "
                                "leave its rows out of the formula")
            poly = sum(sympy.Rational(c, b.denom) * sympy.Mul(*[x ** int(e) for x, e in zip(syms, ex)])
                       for c, ex in zip(b.numer[k][q], b.exponents) if c)
            expr += int(counts[k]) * poly
        return sympy.expand(expr)

    def map_tables(self, fn: Callable[[pd.DataFrame], pd.DataFrame], label: str) -> "CostFunction":
        """The cost function of ``fn(table)``: ``fn`` applied to the exact tables at every box's fit
        points and refitted, then checked at the box's check points against ``fn`` of the exact
        table there (a transform that is not polynomial in the basis is caught). ``fn`` must keep
        the rows (a weight-format rewrite does)."""
        boxes = []
        for b in self.boxes:
            nb = _fit_box(replace(b, template=None, kinds=[], numer=[], _float=None),
                          {p: fn(self.table_at(p)) for p in b.fitted})
            _check_box(nb, {p: fn(self.table_at(p)) for p in b.checked}, inherited=b)
            boxes.append(nb)
        return CostFunction(self.variables, boxes, {**self.meta, "transform": [*self.meta.get("transform", []), label]})


# ============================================================================================
# Building: trace, align, dedupe, solve exactly, check.
# ============================================================================================
def _grid(lo: int, hi: int | None, degree: int, step: int) -> tuple[list[int], int]:
    """Fit values of one variable inside [lo, hi] and the degree they support."""
    if hi is not None:
        n = (hi - lo) // step + 1
        if n <= degree + 1:
            return [lo + i * step for i in range(n)], n - 1
        # spread over the box, off its lower edge where there is room (the edge is checked)
        span = hi - lo
        vals = sorted({lo + step * round(span * f / step) for f in np.linspace(0.15, 1.0, degree + 1)})
        vals = [v for v in vals if v != lo] if len(vals) > degree + 1 else vals
        while len(vals) < degree + 1:  # rounding collapsed two values: fill from the top down
            cand = next(v for v in range(hi, lo - 1, -step) if v not in vals)
            vals = sorted({*vals, cand})
        return vals[: degree + 1], degree
    return [lo + step * (i + 1) for i in range(degree + 1)], degree


def _flat(row: pd.Series) -> tuple[tuple, tuple, list]:
    """(attrs, struct, numbers) of one op-table row."""
    attrs = tuple(row[c] if c != "costed" else bool(row[c]) for c in _ATTRS)
    ins, outs = row["input_shapes"], row["output_shapes"]
    struct = (tuple(len(s) for s in ins), tuple(len(s) for s in outs))
    nums: list[Any] = []
    for q in QUANTITIES:
        x = row[q]
        if x is None or (isinstance(x, float) and math.isnan(x)):
            nums.append(None)
        else:
            nums.append(int(x) if float(x).is_integer() else Fraction(x))
    nums += [int(d) for s in ins for d in s] + [int(d) for s in outs for d in s]
    return attrs, struct, nums


def _table_rows(table: pd.DataFrame) -> list[tuple[tuple, tuple, list]]:
    cols = {c: table[c].tolist() for c in (*_ATTRS, "input_shapes", "output_shapes", *QUANTITIES)}
    return [_flat({c: cols[c][i] for c in cols}) for i in range(len(table))]


def _solve_matrix(exps: np.ndarray, pts: list[Point]) -> tuple[list[list[int]], int]:
    """Integer matrix ``A`` and ``d`` with ``coeffs = A @ values / d`` on the tensor grid ``pts``."""
    m = len(exps)
    rows = [[Fraction(math.prod(x ** int(e) for x, e in zip(p, ex))) for ex in exps] for p in pts]
    aug = [r + [Fraction(int(i == j)) for j in range(m)] for i, r in enumerate(rows)]
    for c in range(m):  # Gauss-Jordan in exact arithmetic (a 6 x 6 to 20 x 20 Vandermonde)
        piv = next(r for r in range(c, m) if aug[r][c] != 0)
        aug[c], aug[piv] = aug[piv], aug[c]
        inv = 1 / aug[c][c]
        aug[c] = [x * inv for x in aug[c]]
        for r in range(m):
            if r != c and aug[r][c] != 0:
                f = aug[r][c]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[c])]
    vinv = [row[m:] for row in aug]
    d = math.lcm(*(x.denominator for row in vinv for x in row))
    return [[int(x * d) for x in row] for row in vinv], d


def _signature(table: pd.DataFrame) -> int:
    """The op sequence of a table (a change means the code took another path)."""
    return hash(tuple(table["op"].tolist()))


def _fit_box(box: Box, tables: dict[Point, pd.DataFrame]) -> Box:
    """``box`` solved on ``tables`` (one per fit point, same op sequence): rows grouped into kinds
    (identical attributes, ranks and values at every fit point), exact rational coefficients."""
    pts = list(tables)
    template = tables[pts[0]]
    flat = {p: _table_rows(t) for p, t in tables.items()}
    for p, t in tables.items():
        if _signature(t) != _signature(template):
            raise CohwError(f"the op sequence changes inside a box ({len(template)} ops at {pts[0]}, {len(t)} at {p}): "
                            "add a breakpoint where the code branches")
    kind_of: dict[tuple, int] = {}
    kind_ids = np.empty(len(template), dtype=np.int64)
    kinds: list[dict[str, Any]] = []
    first: list[int] = []
    for r in range(len(template)):
        attrs, struct, _ = flat[pts[0]][r]
        for p in pts[1:]:
            a2, s2, _ = flat[p][r]
            if a2 != attrs or s2 != struct:
                raise CohwError(f"op {r} ({attrs[0]}) changes its dtype, cost rule or tensor ranks between {pts[0]} "
                                f"and {p}: add a breakpoint there")
        sig = (attrs, struct, tuple(tuple(flat[p][r][2]) for p in pts))
        if sig not in kind_of:
            kind_of[sig] = len(kinds)
            kinds.append({**dict(zip(_ATTRS, attrs)), "struct": struct})
            first.append(r)
        kind_ids[r] = kind_of[sig]
    for spec, r in zip(kinds, first):
        derived = _derive(spec, [flat[p][r][2] for p in pts])
        if derived is not None:
            spec["derived"] = derived
    n_q = max(len(QUANTITIES) + sum(k["struct"][0]) + sum(k["struct"][1]) for k in kinds)
    a, d = _solve_matrix(box.exponents, pts)
    numer = []
    for r in first:
        cols = []
        for q in range(n_q):
            ys = [(v[q] if q < len(v) and v[q] is not None else 0) for v in (flat[p][r][2] for p in pts)]
            cols.append([sum(ai * y for ai, y in zip(arow, ys)) for arow in a])
        numer.append(cols)
    ints, const, varying = _fit_scalars(tables, pts)
    scal = {n: [sum(ai * y for ai, y in zip(arow, ys)) for arow in a] for n, ys in ints.items()}
    extra = math.lcm(1, *(x.denominator for kind in numer for col in kind for x in col if isinstance(x, Fraction)),
                     *(x.denominator for col in scal.values() for x in col if isinstance(x, Fraction)))
    numer = [[[int(x * extra) for x in col] for col in kind] for kind in numer]
    scal = {n: [int(x * extra) for x in col] for n, col in scal.items()}
    tmpl = template[[c for c in _TEMPLATE if c in template.columns]].copy().reset_index(drop=True)
    tmpl["kind"] = kind_ids
    tmpl.attrs = _plain_attrs(template.attrs)
    return replace(box, template=tmpl, kinds=kinds, numer=numer, denom=d * extra, fitted=pts, exact=True,
                   checked=[], max_rel_diff=0.0, note="", scalar_numer=scal, scalar_const=const,
                   scalar_varying=varying, scalar_names=list(tables[pts[0]].attrs.get("scalars", {})), _float=None)


def _fit_scalars(tables: dict[Point, pd.DataFrame], pts: list[Point]) -> tuple[dict[str, list], dict[str, Any], list[str]]:
    """The trace's scalars (``attrs["scalars"]``) at the fit points: integer ones as value lists
    (fitted like a row), the others as constants where equal at every point, else as varying."""
    per = [tables[p].attrs.get("scalars", {}) for p in pts]
    names = list(per[0])
    for p, sc in zip(pts, per):
        if sorted(sc) != sorted(names):
            raise CohwError(f"the trace's scalars differ between {pts[0]} and {p} "
                            f"({sorted(set(names) ^ set(sc))}): add a breakpoint there")
    ints: dict[str, list] = {}
    const: dict[str, Any] = {}
    varying: list[str] = []
    for n in names:
        vals = [sc[n] for sc in per]
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            ints[n] = [int(v) for v in vals]
        elif all(v == vals[0] for v in vals):
            const[n] = vals[0]
        else:
            varying.append(n)
    return ints, const, varying


def _plain_attrs(attrs: dict) -> dict:
    """The op table's attrs that survive JSON (``uncosted`` counts)."""
    return {k: {str(a): (int(b) if isinstance(b, (int, np.integer)) else b) for a, b in v.items()}
            for k, v in attrs.items() if isinstance(v, dict) and k != "scalars"}


def _compare(box: Box, point: Point, table: pd.DataFrame, columns: list[str]) -> tuple[float, set[str]] | None:
    """None when ``table`` equals the box's table at ``point`` row by row; else the largest relative
    difference of total flops / bytes and the ops of the rows that differ."""
    one = CostFunction(tuple(Variable(f"x{j}", lo=1) for j in range(len(point))), [box], {"columns": columns})
    mine = one.table_at(point)
    ops: set[str] = {"<op sequence>"}
    if len(table) == len(mine) and _signature(table) == _signature(mine):
        pairs = list(zip(_table_rows(mine), _table_rows(table)))
        ops = {a[0][0] for a, b in pairs if a != b}
        theirs = {k: v for k, v in table.attrs.get("scalars", {}).items() if k not in box.scalar_varying}
        if mine.attrs.get("scalars", {}) != theirs:
            ops.add("<scalars>")
        if not ops:
            return None
    got = one.totals_exact(point)
    ref = {q: float(table.loc[table["costed"].astype(bool), q].sum()) for q in QUANTITIES}
    diff = max(abs(float(got[q]) - ref[q]) / max(abs(ref[q]), 1.0) for q in ("flops", "bytes_read", "bytes_written"))
    return diff, ops


def _check_points(box: Box, variables: Sequence[Variable], rng: random.Random, n_random: int) -> list[Point]:
    axes = []
    for v, a, b in zip(variables, box.lo, box.hi):
        axes.append((a, b if b is not None else max(v.check_hi, a), v.step))
    corners = {tuple(c) for c in itertools.product(*[(a, t) for a, t, _ in axes])}
    rand = {tuple(a + s * rng.randint(0, (t - a) // s) for a, t, s in axes) for _ in range(n_random)}
    return sorted((corners | rand) - set(box.fitted))


def _check_box(box: Box, tables: dict[Point, pd.DataFrame], inherited: Box | None = None) -> list[Point]:
    """Compare ``box`` with the tables at its check points (in place); returns the failing points
    and notes the ops whose rows differed."""
    cols = list(next(iter(tables.values())).columns) if tables else []
    failed, ops = [], set()
    for p, t in tables.items():
        res = _compare(box, p, t, cols)
        if res is not None:
            failed.append(p)
            box.max_rel_diff = max(box.max_rel_diff, res[0])
            ops |= res[1]
    box.checked = sorted(tables)
    box.exact = not failed and (inherited is None or inherited.exact)
    if failed:
        box.note = ("not polynomial in the stated degrees here (a cap, a log or a switch with no breakpoint) in: "
                    + ", ".join(sorted(ops)))
    if inherited is not None and not inherited.exact:
        box.max_rel_diff = max(box.max_rel_diff, inherited.max_rel_diff)
        box.note = inherited.note
    return failed


def _new_box(variables: Sequence[Variable], lo: Point, hi: tuple[int | None, ...], table_points: int) -> tuple[Box, list[Point]]:
    sizes = [((b - a) // v.step + 1) if b is not None else math.inf for v, a, b in zip(variables, lo, hi)]
    small = math.prod(sizes) <= table_points
    grids, degs = [], []
    for v, a, b in zip(variables, lo, hi):
        g, d = _grid(a, b, (b - a) // v.step if small and b is not None else v.degree, v.step)
        grids.append(g)
        degs.append(d)
    exps = np.array(list(itertools.product(*[range(d + 1) for d in degs])), dtype=np.int64).reshape(-1, len(variables))
    return Box(lo, hi, exps), [tuple(p) for p in itertools.product(*grids)]


def _branch(at: Callable[[Point], pd.DataFrame], pts: list[Point]) -> tuple[int, int] | None:
    """Where the op sequence changes between two points that differ in one variable: the
    (variable, first value of the new path), found by bisection; None if it never changes."""
    sigs = {p: _signature(at(p)) for p in pts}
    for p, q in itertools.combinations(sorted(pts), 2):
        diff = [j for j in range(len(p)) if p[j] != q[j]]
        if len(diff) != 1 or sigs[p] == sigs[q]:
            continue
        j = diff[0]
        a, b = (p, q) if p[j] < q[j] else (q, p)
        while b[j] - a[j] > 1:  # a[j] on the old path, b[j] on the new: halve the gap
            mid = (a[j] + b[j]) // 2
            m = tuple(mid if k == j else a[k] for k in range(len(a)))
            a, b = (m, b) if _signature(at(m)) == sigs[a] else (a, m)
        return j, b[j]
    return None


def build_cost_function(trace_at: Callable[[dict[str, int]], pd.DataFrame], variables: Sequence[Variable], *,
                        random_checks: int = 2, table_points: int = 16, seed: int = 0,
                        meta: dict[str, Any] | None = None) -> CostFunction:
    """Build a :class:`CostFunction` from ``trace_at({name: value}) -> op table`` (module docstring).

    Per box: the fit grid (``prod(degree + 1)`` shapes), then its corners and ``random_checks``
    random shapes. Where the op sequence differs between two traced shapes of a box, the value
    where the code switches path is found by bisection and becomes a breakpoint; a lower edge
    whose check fails is split off as its own box (once per variable). Steps of 1 only for the
    bisection (a variable with ``step > 1`` bisects on multiples of its step).
    """
    variables = tuple(variables)
    if not variables:
        raise CohwError("a cost function needs at least one Variable")
    cache: dict[Point, pd.DataFrame] = {}
    names = tuple(v.name for v in variables)

    def at(p: Point) -> pd.DataFrame:
        if p not in cache:
            cache[p] = trace_at(dict(zip(names, p)))
        return cache[p]

    def at_scaled(p: Point) -> pd.DataFrame:  # bisection on multiples of each variable's step
        return at(tuple(x * v.step for x, v in zip(p, variables)))

    rng = random.Random(seed)
    todo = [(tuple(lo for lo, _ in e), tuple(hi for _, hi in e), frozenset())
            for e in itertools.product(*[v.edges() for v in variables])]
    boxes: list[Box] = []
    found: list[tuple[str, int]] = []
    while todo:
        lo, hi, split = todo.pop(0)
        box, pts = _new_box(variables, lo, hi, table_points)
        checks = _check_points(replace(box, fitted=pts), variables, rng, random_checks)
        scaled = [tuple(x // v.step for x, v in zip(p, variables)) for p in pts + checks]
        br = _branch(at_scaled, scaled)
        if br is not None:
            j, b = br[0], br[1] * variables[br[0]].step
            found.append((names[j], b))
            h1 = tuple(b - variables[j].step if k == j else hi[k] for k in range(len(hi)))
            l2 = tuple(b if k == j else lo[k] for k in range(len(lo)))
            todo[:0] = [(lo, h1, split), (l2, hi, split)]
            continue
        box = _fit_box(box, {p: at(p) for p in pts})
        failed = _check_box(box, {p: at(p) for p in checks})
        edge = next((j for j in range(len(variables)) if j not in split and any(p[j] == lo[j] for p in failed)
                     and (hi[j] is None or hi[j] > lo[j])), None)
        if failed and edge is not None:
            step = variables[edge].step
            h1 = tuple(lo[k] if k == edge else hi[k] for k in range(len(hi)))
            l2 = tuple(lo[k] + step if k == edge else lo[k] for k in range(len(lo)))
            todo[:0] = [(lo, h1, split | {edge}), (l2, hi, split | {edge})]
            continue
        # a switch at the box's top value (a decode cache reaching a window one token before the
        # attention does) spoils the fit everywhere, as the top is a fit point: split it off
        top = next((j for j in range(len(variables)) if failed and -1 - j not in split and hi[j] is not None
                    and hi[j] > lo[j]), None)
        if top is not None:
            step = variables[top].step
            h1 = tuple(hi[k] - step if k == top else hi[k] for k in range(len(hi)))
            l2 = tuple(hi[k] if k == top else lo[k] for k in range(len(lo)))
            todo[:0] = [(lo, h1, split | {-1 - top}), (l2, hi, split | {-1 - top})]
            continue
        boxes.append(box)
    boxes.sort(key=lambda b: b.lo)
    first = next(iter(cache.values()))
    return CostFunction(variables, boxes, {**(meta or {}), "traces": len(cache), "columns": list(first.columns),
                                           "found_breakpoints": found})
