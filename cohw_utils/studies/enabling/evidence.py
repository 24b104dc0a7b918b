"""Parity as evidence: a converted phase checked on inputs it was not exported with, and one
mid-size export past protobuf's 2 GB limit.

:func:`parity_evidence` re-runs a :class:`~cohw_utils.studies.enabling.export.Conversion`'s
onnxruntime session on

* **another seed**: the phase rebuilt with ``seed`` (new inputs; the converted model's weights
  loaded into it, so only the inputs differ from the export example);
* **a second size on the dynamic axis**, when export kept it symbolic: prompt length or cache
  length ``seq_len // 2 + 1`` for an LLM (17 for the tiny 32), batch 3 for the image models
  (exported at 2), rays ``rays // 2 + 3`` for a NeRF (131 of 256).

Each row is compared with eager PyTorch on the same inputs by :mod:`.parity`'s max-norm test.
A session that rejects the second size is a row with its error: the axis was recorded as kept
but does not run.

:func:`large_export` exports an LLM prefill built at full width from a config in the repo (by
default ``tinyllama-1.1b``, random weights, fp32: 4.4 GB of weights, twice protobuf's 2 GiB
limit on one serialized message), saves it with ONNX *external data* (the graph in ``.onnx``,
the weights in one ``.onnx.data`` file beside it), opens an onnxruntime session from the file
and checks parity at the export length and at a second prompt length. ``layers`` builds a
stand-in with fewer decoder layers, ``scale="tiny"`` the workloads' tiny shrink of the config
(the same code path, for CI). Files go to a temporary
directory, removed afterwards unless ``out_dir`` is given.

Used by Chapter 3 (SW enabling), section 3.1 (parity on fresh inputs, and the mid-size export),
and by ``benchmarks/bench_large_export.py``.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cohw_utils import workloads
from cohw_utils.core.data import config_path
from cohw_utils.core.errors import CohwError
from cohw_utils.studies.enabling.export import (ONNX_OPSET, TINY_SIZES, Conversion, _export, _feeds, _quiet,
                                                _registry, _serving_axes, build_phase, ort_session)
from cohw_utils.studies.enabling.flatten import PhaseModule, _interface, flatten
from cohw_utils.studies.enabling.parity import TOLERANCES, Parity, _compare, _run_reference

__all__ = ["PROTOBUF_LIMIT", "parity_evidence", "second_size", "LargeExport", "large_export"]

#: protobuf's hard limit on one serialized message (2 GiB), which an ONNX file without
#: external data must fit in.
PROTOBUF_LIMIT = 2 ** 31


def second_size(conv: Conversion) -> dict[str, Any]:
    """Build options giving a second size on ``conv``'s dynamic axis (see the module docstring)."""
    if conv.axis in ("prompt length", "cache length"):
        return {"seq_len": TINY_SIZES["seq_len"] // 2 + 1}
    if conv.axis == "batch":
        return {"batch": TINY_SIZES["batch"] + 1}
    if conv.axis == "rays":
        rays = conv.built.phases[conv.phase].units if conv.built is not None else 256
        return {"rays": rays // 2 + 3}
    raise CohwError(f"{conv.workload}:{conv.phase}: no dynamic axis recorded ({conv.axis!r})")


def _row(conv: Conversion, check: str, options: dict, seed: int) -> dict:
    row = {"workload": conv.workload, "phase": conv.phase, "dtype": conv.dtype, "check": check,
           "inputs": ", ".join(f"{k}={v}" for k, v in options.items()) or "export example",
           "max_abs_err": math.nan, "max_rel_err": math.nan, "passed": False, "error": ""}
    try:
        built, ph = build_phase(conv.workload, conv.phase, conv.dtype, seed=seed, **options)
        built.model.load_state_dict(conv.built.model.state_dict())
        ref = _run_reference(ph)
        args, kwargs = ph.make_inputs()
        got = conv.session.run(None, _feeds(conv.session, _interface(flatten((args, kwargs))[0])))
    except Exception as e:  # noqa: BLE001 - a size the session rejects is the finding
        row["error"] = " ".join(str(e).split())[:200]
        return row
    p = _compare(got, ref, TOLERANCES[conv.dtype])
    row.update(max_abs_err=p.max_abs, max_rel_err=p.max_rel, passed=p.passed)
    return row


def parity_evidence(conv: Conversion, seed: int = 1) -> pd.DataFrame:
    """Parity of a converted phase on the export example, on ``seed``'s inputs and at a second
    size on its dynamic axis (when kept): one row per check (module docstring)."""
    if not conv.ok or conv.session is None or conv.built is None:
        raise CohwError(f"{conv.workload}:{conv.phase} ({conv.dtype}) has no session with parity "
                        f"({conv.status}); run parity_evidence on a conversion that passed, made with keep=True")
    p = conv.parity
    rows = [{"workload": conv.workload, "phase": conv.phase, "dtype": conv.dtype, "check": "export example",
             "inputs": "export example", "max_abs_err": p.max_abs, "max_rel_err": p.max_rel, "passed": p.passed,
             "error": ""}]
    rows.append(_row(conv, f"another seed ({seed})", {}, seed))
    if conv.dynamic == "kept":
        rows.append(_row(conv, f"second {conv.axis}", second_size(conv), 0))
    return pd.DataFrame(rows)


@dataclass
class LargeExport:
    """What :func:`large_export` measured. Sizes in bytes, times in seconds."""

    config: str
    layers: int
    parameters: int
    weight_bytes: int
    onnx_bytes: int           # the graph file
    data_bytes: int           # the external-data file(s)
    exceeds_protobuf_limit: bool
    parity: list[tuple[int, Parity]]   # (prompt length, parity) per length tried
    seconds: dict[str, float]
    files: list[str]

    @property
    def disk_bytes(self) -> int:
        return self.onnx_bytes + self.data_bytes


def large_export(config: str = "tinyllama-1.1b", *, layers: int | None = None, scale: str = "full",
                 seq_len: int = 32, second_len: int = 17, out_dir: str | Path | None = None) -> LargeExport:
    """Export an LLM prefill at full width with ONNX external data and check it (module docstring)."""
    from torch.onnx._internal.exporter import _core

    src = config_path(config)
    if src.is_dir():
        src = src / "config.json"
    cfg = json.loads(src.read_text())
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise CohwError(f"layers must be 1..{cfg['num_hidden_layers']} for {config}, got {layers}")
        cfg["num_hidden_layers"] = layers
    secs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = Path(tmp) / "config" / Path(src).parent.name
        cfg_dir.mkdir(parents=True)
        (cfg_dir / "config.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        built = workloads.build(str(cfg_dir / "config.json"), scale=scale, device="cpu", dtype=torch.float32,
                                seq_len=seq_len)
        ph = built.phase("prefill")
        secs["build"] = time.perf_counter() - t
        n_params = sum(p.numel() for p in built.model.parameters())
        args, kwargs = ph.make_inputs()
        ts, rebuild = flatten((args, kwargs))
        module = PhaseModule(built.model, ph.run, rebuild, [x.dtype for x in ts])
        ts = _interface(ts)
        spec, _ = _serving_axes("llm", "prefill", ts)
        t = time.perf_counter()
        ep = _export(module, ts, spec)
        secs["torch.export"] = time.perf_counter() - t
        t = time.perf_counter()
        with _quiet():
            program = _core.export(ep, registry=_registry(), verbose=False, optimize=True, opset_version=ONNX_OPSET)
        secs["onnx conversion"] = time.perf_counter() - t
        out = Path(out_dir) if out_dir else Path(tmp) / "onnx"
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.onnx"
        t = time.perf_counter()
        program.save(str(path), external_data=True)
        secs["save"] = time.perf_counter() - t
        del program, ep
        files = sorted(p for p in out.iterdir() if p.is_file())
        onnx_bytes = path.stat().st_size
        data_bytes = sum(p.stat().st_size for p in files if p != path)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        t = time.perf_counter()
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        secs["session"] = time.perf_counter() - t
        parity = []
        for n in (seq_len, second_len):
            ids = torch.randint(0, built.model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            a, kw = ph.make_inputs()
            kw["input_ids"] = ids
            with torch.no_grad():
                ref = _interface(flatten(ph.run(*a, **kw))[0])
            feed_ts = _interface(flatten((a, kw))[0])
            t = time.perf_counter()
            got = sess.run(None, _feeds(sess, feed_ts))
            secs[f"onnxruntime run ({n} tokens)"] = time.perf_counter() - t
            parity.append((n, _compare(got, ref, TOLERANCES["fp32"])))
        del sess
        weight_bytes = sum(p.numel() * p.element_size() for p in built.model.parameters())
        return LargeExport(config, built.model.config.num_hidden_layers, n_params, weight_bytes, onnx_bytes, data_bytes,
                           weight_bytes > PROTOBUF_LIMIT, parity, secs,
                           [p.name for p in files] if out_dir else [])
