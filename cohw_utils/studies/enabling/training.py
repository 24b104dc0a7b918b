"""A training step on the inference runtime, tried for real: joint forward+backward graph -> ONNX -> onnxruntime.

An inference capture of a training step fails (:mod:`.export`: the ``loss.backward()`` inside
it leaks gradients into the graph). That failure says nothing about whether the *stack* can
train, so :func:`try_training` takes the path that could succeed and records each stage:

1. **loss capture**: ``torch.export`` of the step with ``Tensor.backward`` replaced by a
   recorder, so that the captured program returns the loss instead of back-propagating it
   (``t.backward(g)`` records ``(t * g.detach()).sum()``, whose gradient is the same).
2. **joint graph**: ``torch.export.experimental._export_forward_backward`` (torch's own
   joint-graph pass: AOT autograd on the exported program, decomposed to core ATen) gives one
   program whose outputs are the loss and the gradient of every trainable parameter.
3. **ONNX, as exported**: the joint program converted as it is. The exporter keeps only
   *user* outputs, so the loss and gradient outputs of a joint program are dropped: the stage
   fails when the ONNX graph has fewer outputs than the program (a tooling finding).
4. **workaround**: the joint graph module re-exported as a plain function of (parameters,
   inputs) returning (loss, gradients); every random draw inside it (``rand``, ``randn``,
   ``bernoulli``... : a NeRF's stratified-sampling jitter, a diffusion step's noise) becomes an
   extra input fed with the values torch drew under the same seed, since onnxruntime's RNG is
   not torch's. Converted with :data:`~cohw_utils.studies.enabling.decompose.DECOMPOSITIONS`.
5. **onnxruntime** session and run; **parity** of the loss and every gradient against eager
   PyTorch's ``loss.backward()`` (:mod:`.parity`'s max-norm test, per output).

``status`` is ``"runs"`` (parity passed: forward and backward run on the target), ``"mismatch"``
or ``"failed"`` (``failure`` names the stage). Not covered: the optimizer update (the proxy
phases stop at the gradients) and training-only runtime features (in-place parameter update,
gradient accumulation, mixed-precision loss scaling).

Used by Chapter 3 (SW enabling), section "the SW gap list" (training rows of
:func:`cohw_utils.studies.enabling.gap_report.gap_report`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from cohw_utils.core.errors import CohwError
from cohw_utils.studies.enabling.decompose import DECOMPOSITIONS
from cohw_utils.studies.enabling.export import _quiet, _to_onnx, build_phase, ort_session
from cohw_utils.studies.enabling.failures import OTHER, Failure, classify_failure
from cohw_utils.studies.enabling.flatten import _interface, flatten
from cohw_utils.studies.enabling.parity import TOLERANCES, Parity, _compare

__all__ = ["TrainingAttempt", "try_training", "training_table", "training_requirements", "RANDOM_OPS"]

#: aten random ops whose draws become graph inputs (overload packets).
RANDOM_OPS = ("rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "bernoulli", "uniform",
              "normal", "multinomial", "randperm", "native_dropout")


@dataclass
class TrainingAttempt:
    """One training phase through the joint-graph path (see the module docstring)."""

    workload: str
    phase: str
    dtype: str = "fp32"
    status: str = "failed"
    failure: Failure | None = None
    failures: list[Failure] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    joint_nodes: int = 0
    onnx_nodes: int = 0
    gradients: int = 0
    random_inputs: list[str] = field(default_factory=list)
    parity: Parity | None = None

    @property
    def runs(self) -> bool:
        return self.status == "runs"


@contextlib.contextmanager
def _record_backward(store: list):
    """``Tensor.backward`` records the loss in ``store`` instead of back-propagating."""
    original = torch.Tensor.backward

    def backward(self, gradient=None, *args, **kwargs):
        store.append(self if gradient is None else (self * gradient.detach()).sum())

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


class _LossModule(nn.Module):
    """A training phase as ``forward(*flat inputs) -> (loss,)``, its backward recorded, not run."""

    def __init__(self, model: nn.Module, run, rebuild):
        super().__init__()
        self.model = model
        self._run, self._rebuild = run, rebuild

    def forward(self, *ts):
        args, kwargs = self._rebuild(list(ts))
        store: list = []
        with _record_backward(store):
            self._run(*args, **kwargs)
        if len(store) != 1:
            raise CohwError(f"the training step called backward() {len(store)} times; one loss is needed")
        return (store[0],)


def _is_random(node) -> bool:
    t = node.target
    return node.op == "call_function" and getattr(t, "namespace", "") == "aten" and \
        t.name().split("::")[-1].split(".")[0] in RANDOM_OPS


def _draws_as_inputs(gm: torch.fx.GraphModule, inputs: list[torch.Tensor], seed: int):
    """Run ``gm`` under ``seed`` recording each random node's value, then make those nodes
    placeholders. Returns (outputs of the recorded run, new inputs, names of the draws)."""
    draws: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if _is_random(n):
                draws[n.name] = out.detach().clone()
            return out

    torch.manual_seed(seed)
    with torch.no_grad():
        ran = Recorder(gm).run(*inputs)
    g = gm.graph
    last_ph = [n for n in g.nodes if n.op == "placeholder"][-1]
    names = []
    for n in [n for n in g.nodes if _is_random(n)]:
        with g.inserting_after(last_ph):
            ph = g.placeholder(f"draw_{n.name}")
        ph.meta = dict(n.meta)
        n.replace_all_uses_with(ph)
        g.erase_node(n)
        last_ph = ph
        names.append(n.name)
    g.lint()
    gm.recompile()
    return ran, list(inputs) + [draws[n] for n in names], names


def try_training(workload: str, phase: str, seed: int = 0, **options: Any) -> TrainingAttempt:
    """Take a training phase through the joint-graph path and report each stage (module docstring).

    Never raises for a failing stage; a phase that is not a training step raises CohwError."""
    built, ph = build_phase(workload, phase, "fp32", **options)
    if not ph.backward:
        raise CohwError(f"{workload}:{phase} is not a training phase (Phase.backward is False); "
                        "convert it with export.convert")
    att = TrainingAttempt(built.workload.name, phase)

    def fail(stage: str, exc: BaseException | None = None, line: str = "") -> TrainingAttempt:
        f = classify_failure(exc, stage) if exc is not None else Failure(stage, OTHER, line)
        att.failures.append(f)
        att.failure, att.status = f, "failed"
        return att

    # the reference first: eager loss.backward() under the seed; parameters it leaves without a gradient
    params = dict(built.model.named_parameters())
    built.model.zero_grad(set_to_none=True)
    a0, k0 = ph.make_inputs()
    torch.manual_seed(seed)
    loss = ph.run(*a0, **k0)
    grads = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    built.model.zero_grad(set_to_none=True)
    unused = [p for name, p in params.items() if p.requires_grad and name not in grads]

    args, kwargs = ph.make_inputs()
    ts, rebuild = flatten((args, kwargs))
    ts = _interface(ts)
    module = _LossModule(built.model, ph.run, rebuild)
    frozen: list[nn.Parameter] = []
    try:
        while True:
            try:
                torch.manual_seed(seed)
                with _quiet():
                    ep = torch.export.export(module, tuple(ts), strict=False)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                return fail("loss capture", e)
            if "loss capture" not in att.stages:
                att.stages.append("loss capture")
            try:
                from torch.export.experimental import _export_forward_backward

                with _quiet():
                    joint = _export_forward_backward(ep)
                break
            except Exception as e:  # noqa: BLE001
                f = classify_failure(e, "joint graph")
                if "did not receive a gradient" in f.key_line and unused and not frozen:
                    # torch's joint pass wants a gradient for every trainable parameter: freeze
                    # the ones eager backward leaves without one, and capture again
                    att.failures.append(Failure("joint graph", f.klass, f"{f.key_line} ({len(unused)} parameter "
                                                "tensors get none in eager either: frozen, captured again)"))
                    frozen = unused
                    for p in frozen:
                        p.requires_grad_(False)
                    continue
                return fail("joint graph", e)
        return _finish(att, joint, ts, seed, loss, grads)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _finish(att: TrainingAttempt, joint, ts: list[torch.Tensor], seed: int, loss: torch.Tensor,
            grads: dict[str, torch.Tensor]) -> TrainingAttempt:
    """Stages 3-5 of :func:`try_training` on a joint program."""
    def fail(stage: str, exc: BaseException | None = None, line: str = "") -> TrainingAttempt:
        f = classify_failure(exc, stage) if exc is not None else Failure(stage, OTHER, line)
        att.failures.append(f)
        att.failure, att.status = f, "failed"
        return att

    att.stages.append("joint graph")
    sig = joint.graph_signature
    att.joint_nodes = sum(n.op == "call_function" for n in joint.graph.nodes)
    outs = [s.target for s in sig.output_specs]  # None for the loss, the parameter for a gradient
    att.gradients = len(outs) - 1
    try:
        proto = _to_onnx(joint, DECOMPOSITIONS)
        kept = len(proto.graph.output)
        if kept < len(outs):
            att.failures.append(Failure("onnx conversion (joint program)", OTHER,
                                        f"the exporter kept {kept} of the joint program's {len(outs)} outputs "
                                        "(loss and gradients are not user outputs)"))
        else:
            att.stages.append("onnx conversion (joint program)")
    except Exception as e:  # noqa: BLE001
        att.failures.append(classify_failure(e, "onnx conversion (joint program)"))

    # the workaround: parameters and random draws as inputs of a plain program
    state = {**dict(joint.named_parameters()), **dict(joint.named_buffers()), **joint.constants}
    user = iter(ts)
    inputs = [state[s.target].detach() if s.target is not None else next(user) for s in sig.input_specs]
    try:
        gm = joint.graph_module
        ran, inputs, att.random_inputs = _draws_as_inputs(gm, inputs, seed)
        with _quiet():
            plain = torch.export.export(gm, tuple(inputs), strict=False)
        proto = _to_onnx(plain, DECOMPOSITIONS)
    except Exception as e:  # noqa: BLE001
        return fail("onnx conversion (parameters as inputs)", e)
    att.stages.append("onnx conversion (parameters as inputs)")
    att.onnx_nodes = len(proto.graph.node)
    names = [n.name for n in plain.graph.nodes if n.op == "placeholder"]
    by_name = dict(zip(names, inputs))
    try:
        sess = ort_session(proto)
        feeds = {i.name: by_name[i.name].numpy() for i in sess.get_inputs()}
        got = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        return fail("onnxruntime", e)
    att.stages.append("onnxruntime")
    ref = [loss.detach().reshape(())] + [grads.get(t.removeprefix("model.")) for t in outs[1:]]
    if any(r is None for r in ref):
        return fail("parity", line="a gradient of the joint graph has no eager counterpart")
    att.parity = _compare(got, ref, TOLERANCES["fp32"])
    att.stages.append("parity")
    att.status = "runs" if att.parity.passed else "mismatch"
    if not att.parity.passed:
        same = math.isclose(float(ran[0]), float(loss), rel_tol=1e-5)
        fail("parity", line=f"max rel error {att.parity.max_rel:.3g} (output {att.parity.worst_output}); "
             + ("the graph's own run matches eager" if same else "torch's random draws differ from eager's"))
        att.status = "mismatch"
    return att


def training_table(attempts: Iterable[TrainingAttempt]) -> pd.DataFrame:
    """One row per attempt: status, stages passed, what broke, gradients compared and their error."""
    rows = []
    for a in attempts:
        rows.append({"workload": a.workload, "phase": a.phase, "status": a.status,
                     "stages_passed": " -> ".join(a.stages),
                     "broke": "; ".join(f"{f.stage}: {f.key_line}" for f in a.failures),
                     "joint_ops": a.joint_nodes, "onnx_nodes": a.onnx_nodes, "gradients": a.gradients,
                     "random_draws_as_inputs": len(a.random_inputs),
                     "max_rel_err": a.parity.max_rel if a.parity else math.nan})
    return pd.DataFrame(rows)


_STAGE_FIX = {
    "joint graph": "freeze the parameters that get no gradient (applied), or give them one",
    "onnx conversion (joint program)": "re-export the joint graph with parameters as inputs (applied)",
}


def training_requirements(attempt: TrainingAttempt | None, table: pd.DataFrame | None) -> list[dict]:
    """Gap-list rows (``kind="training"``) of one training phase from its attempt: one per thing
    that broke on the joint-graph path (share 1.0 for the one that stopped it, 0.0 for one
    worked around), then either "runs" (share 0.0) or the backward kernels the target lacks
    (the backward pass's share of ``table``'s FLOPs and bytes). No attempt: a "not tried" row."""
    def row(requirement, f, b, evidence, fix, sources="training attempt"):
        return {"kind": "training", "requirement": requirement, "op": "", "flops_share": f, "bytes_share": b,
                "sources": sources, "evidence": evidence, "dirty_fix": fix}

    if attempt is None:
        return [row("training path not tried", math.nan, math.nan, "no try_training result passed",
                    "gap_report(..., training=[training.try_training(workload, phase)])", "")]
    rows = []
    for f in attempt.failures:
        stops = attempt.status == "failed" and f is attempt.failure
        rows.append(row(f"joint-graph path: {f.stage} ({f.klass})", 1.0 if stops else 0.0, 1.0 if stops else 0.0,
                        f.key_line, _STAGE_FIX.get(f.stage, "") if not stops else "keep the step in PyTorch; "
                        "offload its no-grad parts (offload.offload)"))
    if attempt.runs:
        p = attempt.parity
        rows.append(row(f"forward + backward run on the target as one joint graph: loss and {attempt.gradients} "
                        f"gradients match eager (max rel err {p.max_rel:.1e}); the optimizer update is not covered",
                        0.0, 0.0, " -> ".join(attempt.stages),
                        f"parameters and {len(attempt.random_inputs)} random draws fed as graph inputs"))
    elif table is not None:
        bw = table[(table["pass"] == "backward") & table["costed"]]
        tot = table[table["costed"]]
        moved = (tot["bytes_read"] + tot["bytes_written"]).sum()
        fb = float(bw["flops"].sum()) / float(tot["flops"].sum()) if float(tot["flops"].sum()) else 0.0
        bb = float((bw["bytes_read"] + bw["bytes_written"]).sum()) / float(moved) if moved else 0.0
        rows.append(row("backward pass kernels (gradients of every op in the step)", fb, bb,
                        f"{int(len(bw))} backward ops; the joint-graph path stopped at "
                        f"{attempt.failure.stage if attempt.failure else attempt.status}", "training runtime",
                        "op table; training attempt"))
    return rows
