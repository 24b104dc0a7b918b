"""The cost function of one workload phase, built from full-scale traces and cached on disk.

:func:`phase_cost_function` builds a :class:`~cohw_utils.spine.costfn.CostFunction` for a registry
workload or a config (traced by :func:`~cohw_utils.spine.analyze.analyze`, full scale on ``meta``)
over the variables :func:`phase_variables` gives its phase:

* decoder-LM ``prefill``: ``batch`` (degree 1, unbounded) and ``seq_len`` (degree 2, up to the
  config's ``max_position_embeddings``); ``decode``: ``batch`` and the context ``seq_len``
  (degree 2, up to ``max_position_embeddings - 1``);
* diffusion ``unet_step`` / ``vae_decode`` of a workload whose built config states its
  ``image_size_multiple``: ``batch`` and ``image_size`` (degree 4: attention over ``(H W)^2``
  latent positions; multiples of that size, up to 2048);
* any other phase: ``batch`` (degree 1).

Breakpoints from the config, where costs switch without the op sequence changing: every integer
field whose name holds ``window`` or ``chunk`` (a sliding or chunked attention) on the length,
and, for a mixture of experts of ``E`` experts and ``k`` per token, ``ceil(E / k)`` on batch (and
on length for a prefill): from there on every expert is touched (the grouped-GEMM rule of
:mod:`cohw_utils.spine.costs`). Changes of the op sequence are found by the builder itself.

**Cache.** A built function is written as JSON under ``$COHW_CACHE_DIR`` (default
``~/.cache/cohw``), ``costfn/<key>.json``, the key a hash of the model (its name, or its config
file's bytes), phase, dtype, options, the variables, the source of ``cohw_utils.spine`` and
``cohw_utils.workloads``, and the torch / transformers / diffusers versions; so a second session
starts warm and any change of the code or the libraries rebuilds. Reading the cache imports
neither torch nor transformers.

Used by the ``predict`` and ``sweep`` commands and Chapter 4.5's predictor
(:mod:`cohw_utils.studies.validation.predict`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cohw_utils.core.data import config_path
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.costfn import Box, CostFunction, Variable, build_cost_function

__all__ = ["resolve_model", "phase_variables", "phase_cost_function", "costfn_cache_dir", "load_cached", "save", "load",
           "kv_bytes_at", "cached_analysis"]

_PKG = Path(__file__).resolve().parents[1]
_LLM_PHASES = {"prefill": 0, "decode": 1}
_IMAGE_PHASES = ("unet_step", "vae_decode")
_EXPERT_NAMES = ("num_local_experts", "n_routed_experts", "num_experts")
_TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "experts_per_token")


def resolve_model(model: str) -> str:
    """A registry name, a config path, or a folder under ``cohw_utils/data/configs`` (registry
    names first); an unknown name raises the registry's own one-line error."""
    from cohw_utils import workloads
    key = str(model).strip()
    if key.lower() in workloads.WORKLOADS:
        return key.lower()
    found = config_path(key)
    if found is not None:
        return str(found)
    workloads.get_workload(key)  # raises the registry's own one-line error
    return key


def costfn_cache_dir() -> Path:
    """Where built cost functions are kept (``$COHW_CACHE_DIR`` or ``~/.cache/cohw``)."""
    return Path(os.environ.get("COHW_CACHE_DIR") or Path.home() / ".cache" / "cohw") / "costfn"


def _config_dict(model: str, scale: str) -> dict[str, Any]:
    """The (text) config ``model`` is built from at ``scale``, as a dict ({} if it has none)."""
    from cohw_utils import workloads
    built = workloads.build(model, scale=scale, device="meta")
    cfg = built.config
    cfg = getattr(cfg, "text_config", None) or cfg
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return dict(cfg) if isinstance(cfg, dict) else {}


def _first_int(cfg: dict, names: tuple[str, ...]) -> int | None:
    return next((cfg[n] for n in names if isinstance(cfg.get(n), int) and cfg[n] > 0), None)


def phase_variables(model: str, phase: str, scale: str = "full") -> tuple[Variable, ...]:
    """The variables (and config breakpoints) of ``phase`` of ``model`` (module docstring)."""
    from cohw_utils import workloads
    key = resolve_model(model)
    wl = workloads.get_workload(key)
    if phase not in wl.phases:
        raise CohwError(f"'{model}' has no phase '{phase}'; its phases: {', '.join(wl.phases)}")
    cfg = _config_dict(key, scale)
    if phase in _LLM_PHASES and wl.domain == "llm":
        top = cfg.get("max_position_embeddings")
        top = int(top) - _LLM_PHASES[phase] if isinstance(top, int) else None
        length_bp = {v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and v > 1
                     and ("window" in k or "chunk" in k)}
        batch_bp: set[int] = set()
        experts, k = _first_int(cfg, _EXPERT_NAMES), _first_int(cfg, _TOP_K_NAMES)
        if experts and k and experts > k:
            batch_bp.add(math.ceil(experts / k))
            if phase == "prefill":
                length_bp.add(math.ceil(experts / k))
        return (Variable("batch", degree=1, breakpoints=tuple(sorted(batch_bp)), check_hi=64),
                Variable("seq_len", degree=2, hi=top, breakpoints=tuple(sorted(length_bp))))
    if phase in _IMAGE_PHASES:
        built = workloads.build(key, scale=scale, device="meta")
        step = built.config.get("image_size_multiple") if isinstance(built.config, dict) else None
        if isinstance(step, int) and step > 0:
            return (Variable("batch", degree=1, check_hi=16),
                    Variable("image_size", lo=step, hi=2048 - 2048 % step, step=step, degree=4))
    return (Variable("batch", degree=1, check_hi=64),)


def _source_hash() -> str:
    h = hashlib.sha256()
    for sub in ("spine", "workloads"):
        for f in sorted((_PKG / sub).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "transformers", "diffusers"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def _ident(model: str) -> str:
    """What names a model in a cache key: its config file's bytes (hashed), else its registry name."""
    found = config_path(str(model).strip())
    if found is not None:
        return hashlib.sha256((found / "config.json" if found.is_dir() else found).read_bytes()).hexdigest()
    return str(model).strip().lower()


def _key(model: str, phase: str, dtype: str, scale: str, options: dict[str, Any],
         variables: tuple[Variable, ...] | None) -> str:
    ident = _ident(model)
    blob = json.dumps({"model": ident, "phase": phase, "dtype": dtype, "scale": scale, "options": options,
                       "variables": [vars(v) for v in variables] if variables else None,
                       "code": _source_hash(), "versions": _versions()}, sort_keys=True, default=str)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(str(model)).name.replace("config.json", "") or str(model))
    return f"{name}-{phase}-{dtype}-{scale}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _kv_layers(cache: Any) -> list[list[int | None]] | None:
    """The measured cache as ``[serving bytes per token, window, constant bytes, layers]`` groups."""
    if cache is None:
        return None
    groups: dict[tuple, int] = {}
    for la in cache.per_layer:
        k = (int(la.serving_bytes_per_token), la.window, int(la.constant_bytes))
        groups[k] = groups.get(k, 0) + 1
    return [[*k, n] for k, n in groups.items()]


def kv_bytes_at(cf: CostFunction, context: int, batch: int = 1) -> int | None:
    """Serving bytes of the cache the phase returned, for ``batch`` sequences of ``context`` tokens
    (sliding layers capped at their window; :meth:`~cohw_utils.workloads.caches.CacheReport.bytes_at`);
    None when the phase returned no cache."""
    layers = cf.meta.get("kv_layers")
    if layers is None:
        return None
    return sum((per * (context if w is None else min(context, w)) + const) * batch * n for per, w, const, n in layers)


# ---------------------------------------------------------------------------------- JSON
def _box_json(b: Box) -> dict[str, Any]:
    t = b.template
    return {"lo": list(b.lo), "hi": list(b.hi), "exponents": b.exponents.tolist(),
            "template": {c: t[c].tolist() for c in t.columns}, "attrs": t.attrs,
            "kinds": [{**k, "costed": bool(k["costed"]), "struct": [list(s) for s in k["struct"]]} for k in b.kinds],
            "numer": b.numer, "denom": b.denom, "exact": b.exact, "fitted": [list(p) for p in b.fitted],
            "checked": [list(p) for p in b.checked], "max_rel_diff": b.max_rel_diff, "note": b.note,
            "scalar_numer": b.scalar_numer, "scalar_const": b.scalar_const, "scalar_varying": b.scalar_varying,
            "scalar_names": b.scalar_names}


def _box_from(d: dict[str, Any]) -> Box:
    t = pd.DataFrame(d["template"])
    t.attrs = d.get("attrs", {})
    kinds = [{**k, "struct": tuple(tuple(s) for s in k["struct"])} for k in d["kinds"]]
    return Box(tuple(d["lo"]), tuple(d["hi"]), np.array(d["exponents"], dtype=np.int64).reshape(-1, len(d["lo"])),
               t, kinds, d["numer"], int(d["denom"]), bool(d["exact"]), [tuple(p) for p in d["fitted"]],
               [tuple(p) for p in d["checked"]], float(d["max_rel_diff"]), d.get("note", ""),
               d.get("scalar_numer", {}), d.get("scalar_const", {}), d.get("scalar_varying", []),
               d.get("scalar_names", []))


def save(cf: CostFunction, path: Path) -> None:
    """Write ``cf`` as JSON (atomically: a half-written file is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"variables": [vars(v) for v in cf.variables], "boxes": [_box_json(b) for b in cf.boxes], "meta": cf.meta}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, default=str))
    tmp.replace(path)


def load(path: Path) -> CostFunction:
    """Read a cost function written by :func:`save`."""
    doc = json.loads(Path(path).read_text())
    variables = tuple(Variable(**{**v, "breakpoints": tuple(v.get("breakpoints", ()))}) for v in doc["variables"])
    return CostFunction(variables, [_box_from(b) for b in doc["boxes"]], doc.get("meta", {}))


def load_cached(model: str, phase: str, dtype: str = "fp16", scale: str = "full", **options: Any) -> CostFunction | None:
    """The cached cost function of these arguments with the default variables, None if none is
    cached (torch-free: what a warm ``predict`` or ``sweep`` reads)."""
    path = costfn_cache_dir() / f"{_key(model, phase, dtype, scale, options, None)}.json"
    if not path.is_file():
        return None
    try:
        return load(path)
    except (ValueError, KeyError, TypeError):
        return None  # a file from another version of the format: rebuilt by the caller


def phase_cost_function(model: str, phase: str, dtype: str = "fp16", *, scale: str = "full",
                        variables: tuple[Variable, ...] | None = None, use_cache: bool = True,
                        **options: Any) -> CostFunction:
    """The cost function of ``phase`` of ``model`` in ``dtype`` (module docstring); ``options`` go to
    :func:`~cohw_utils.spine.analyze.analyze` (e.g. ``prefill_logits='last'``). Cached on disk
    unless ``use_cache=False``."""
    path = costfn_cache_dir() / f"{_key(model, phase, dtype, scale, options, variables)}.json"
    if use_cache and path.is_file():
        try:
            return load(path)
        except (ValueError, KeyError, TypeError):
            pass
    from cohw_utils.spine.analyze import analyze  # torch and the model libraries: only to build
    key = resolve_model(model)
    var = variables or phase_variables(key, phase, scale)

    def trace_at(point: dict[str, int]) -> pd.DataFrame:
        kw = dict(options)
        batch = point.get("batch", 1)
        if "image_size" in point:
            kw["image_size"] = point["image_size"]
        a = analyze(key, phase, batch=batch, seq_len=point.get("seq_len"), dtype=dtype, scale=scale, **kw)
        a.table.attrs["scalars"] = _flatten(a.header())  # units, the measured cache at this shape...
        if not info:
            info.update(parameters=a.parameters, active_parameters=a.active_parameters, weight_bytes=a.weight_bytes,
                        kv_bytes_per_token=a.kv_bytes_per_token, kv_layers=_kv_layers(a.cache))
        return a.table

    info: dict[str, Any] = {}
    cf = build_cost_function(trace_at, var, meta={"model": str(model), "phase": phase, "dtype": dtype,
                                                  "scale": scale, "options": options})
    cf.meta.update(info)
    if use_cache:
        save(cf, path)
        _save_defaults(model, key, scale)
    return cf


# ------------------------------------------------------------------- analyze from the cache
def _flatten(d: dict[str, Any], prefix: tuple = ()) -> dict[str, Any]:
    """A nested dict as ``{json path: leaf}`` (the scalars a cost function fits)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[json.dumps([*prefix, str(k)])] = list(v) if isinstance(v, tuple) else v
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        *path, last = json.loads(key)
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = v
    return out


def _defaults_path(model: str, scale: str) -> Path:
    return costfn_cache_dir() / f"defaults-{hashlib.sha256(f'{_ident(model)}|{scale}'.encode()).hexdigest()[:16]}.json"


def _save_defaults(model: str, key: str, scale: str) -> None:
    """Record the workload's phases and default dtype, so a warm ``analyze`` with neither given
    finds its cost function without importing the registry (torch)."""
    from cohw_utils import workloads
    from cohw_utils.core.dtypes import dtype_name
    wl = workloads.get_workload(key)
    path = _defaults_path(model, scale)
    path.write_text(json.dumps({"phases": list(wl.phases), "dtype": dtype_name(wl.default_dtype)}))


def cached_analysis(model: str, phase: str | None = None, *, batch: int = 1, seq_len: int | None = None,
                    dtype: str | None = None, scale: str = "full") -> dict[str, Any] | None:
    """What :meth:`Analysis.totals() <cohw_utils.spine.analyze.Analysis.totals>` of
    ``analyze(model, phase, batch=..., seq_len=..., dtype=..., scale=...)`` returns, from a cached
    cost function (its exact table and fitted scalars at that shape) -- torch-free; None when no
    function is cached, the phase or dtype default is unknown here, or the shape is outside the
    function's range or in a box that is not exact (the caller then traces)."""
    if phase is None or dtype is None:
        path = _defaults_path(model, scale)
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        phase, dtype = phase or d["phases"][0], dtype or d["dtype"]
    cf = load_cached(model, phase, dtype, scale)
    if cf is None:
        return None
    point = {"batch": batch, "seq_len": seq_len}
    if any(point.get(n) is None for n in cf.names) or seq_len is not None and "seq_len" not in cf.names:
        return None
    try:
        pt = [point[n] for n in cf.names]
        box = cf.boxes[int(cf.box_index([pt])[0])]
        if not box.exact or box.scalar_varying:
            return None
        table = cf.table_at(pt)
    except CohwError:
        return None
    header = _unflatten(table.attrs.get("scalars", {}))
    if not header:
        return None
    from cohw_utils.spine.optable import analysis_totals
    return analysis_totals(header, table)
