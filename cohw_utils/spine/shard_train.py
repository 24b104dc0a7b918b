"""FSDP2 training steps and pipeline stages traced per rank, with torch's own APIs (Chapter 4.7).

Two splits :mod:`cohw_utils.spine.shard` does not trace on ``meta``, run here on a *small* model
on the CPU under torch's fake process group (one process stands for every rank, collectives move
nothing; the model's weights are random):

* **FSDP2** (:func:`fsdp_step_table`): ``torch.distributed.fsdp.fully_shard`` on every decoder
  layer and on the root (the usual wrapping), built on ``meta`` and materialized with
  ``to_empty`` so that a rank allocates only its shards; then one training step (forward with
  the LM loss, backward; no optimizer step) traced on rank 0. Its table holds FSDP2's own
  collectives: one **all-gather** per unit before its forward, again before its backward (units
  resharded after forward, the default; the root is not), and one **reduce-scatter** of each
  unit's gradients. The message of an all-gather is the unit's gathered parameters (each
  parameter's dim 0 padded to a multiple of ``dp``, as FSDP2 pads), of a reduce-scatter the
  unit's unsharded gradients; a ring sends ``(dp - 1) / dp`` of it per rank
  (:mod:`cohw_utils.views.collectives`). ``table.attrs["fsdp"]`` holds each unit's gathered
  bytes. FSDP2's copy-in/copy-out ops (``fsdp.all_gather_copy_in``, ``split_with_sizes_copy``,
  ``chunk_cat``) are costed as data movement (bytes of the shards they copy).
  *Why not on meta*: FSDP2's lazy init refuses meta parameters (torch 2.13:
  ``RuntimeError: FSDP parameters should be materialized from meta device before training``, from
  ``FSDPParamGroup._validate_no_meta_params``). A full-scale model is therefore traced at full
  width with its first ``layers`` decoder layers (``layers=1``: Llama-2-70B's embedding, one
  layer and LM head, 2.8 GB in bf16, of which a rank holds ``1/dp``): every decoder layer is the
  same unit, so the whole model's collectives are the root's plus ``num_hidden_layers`` times the
  one layer's (``table.attrs["fsdp"]["full_layers"]``), and the per-unit formula
  (:func:`cohw_utils.views.parallel.fsdp_comm`) is checked against it.
* **Pipelining** (:func:`pipeline_stage_table`, at full width with ``layers`` of the stage's
  decoder layers kept, as for FSDP2): one stage of ``torch.distributed.pipelining``
  (a manual ``PipelineStage`` around the stage's slice of layers, as
  :func:`cohw_utils.spine.shard.stage_layers` cuts them) run by ``ScheduleGPipe`` over
  ``microbatches`` microbatches, forward only (inference), traced as rank ``stage``: each
  microbatch is a ``c10d.recv_`` of the previous stage's hidden states and a ``c10d.send`` of its
  own (``microbatch x tokens x hidden x dtype`` bytes). The schedule's first step normally runs a
  warm-up vote over the P2P links and reads it with ``.item()``; under the fake process group
  nothing is received, so the vote is garbage (on the CPU the stage then asks its neighbour for
  shapes and fails: ``EOFError: Ran out of input`` in ``recv_object_list``; on ``meta``
  ``Tensor.item() cannot be called on meta tensors``). Every stage is therefore given its
  shapes (``input_args``/``output_args``) and set to the static mode the vote reaches when all
  stages have them.

Used by Chapter 4.7 (the FSDP2 per-rank table, the pipeline stage's sends).
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn

from cohw_utils.core.dtypes import parse_dtype
from cohw_utils.core.opclasses import DATA_MOVEMENT
from cohw_utils.spine import costs
from cohw_utils.spine.shard import ShardError, _keep_stage, collective_rows, fake_world
from cohw_utils.spine.trace import trace
from cohw_utils.workloads import build

__all__ = ["fsdp_step_table", "pipeline_stage_table", "fsdp_unit_bytes"]


def _tensor_bytes(ts: Any) -> int:
    return sum(costs.tensor_bytes(t) for t in costs.tensors(ts))


def _copy_in(args, kwargs, out):  # all_gather_copy_in(inputs[], output, sizes, numel, rank): copies the shards in
    return DATA_MOVEMENT, 0, 0, _tensor_bytes(args[0]), _tensor_bytes(args[0])


def _copy_out(args, kwargs, out):  # split_with_sizes_copy(gathered, sizes, dim, *, out[]): the gathered buffer out
    return DATA_MOVEMENT, 0, 0, _tensor_bytes(args[0]), _tensor_bytes(kwargs.get("out", args[3:]))


def _chunk_cat(args, kwargs, out):  # chunk_cat(grads[], dim, chunks, *, out): gradients into the reduce-scatter input
    return DATA_MOVEMENT, 0, 0, _tensor_bytes(args[0]), _tensor_bytes(kwargs.get("out", args[3:]))


def _register_fsdp_costs() -> None:
    import torch.distributed.fsdp  # noqa: F401  (registers the torch.ops.fsdp namespace)

    ns = torch.ops.fsdp
    for name, rule in (("all_gather_copy_in", _copy_in), ("split_with_sizes_copy", _copy_out),
                       ("chunk_cat", _chunk_cat)):
        if hasattr(ns, name):
            costs.register_cost(getattr(ns, name), rule)


def _layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ShardError(f"{type(model).__name__}: FSDP units and pipeline stages need a decoder whose layers "
                         "are model.<base>.layers (a ModuleList)")
    return layers


def _keep_first_layers(model: nn.Module, n: int, whose: str) -> int:
    """Cut ``model`` (already on ``meta``) to its first ``n`` decoder layers, config and layer
    types with them, and return ``n``: a full-width stand-in whose layers are all the same unit."""
    layers = _layers(model)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(layers):
        raise ShardError(f"layers={n!r}: keep 1..{len(layers)} of {whose} decoder layers")
    getattr(model, model.base_model_prefix).layers = nn.ModuleList(list(layers)[:n])
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return n


def fsdp_unit_bytes(module: nn.Module, dp: int, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Bytes one all-gather of an FSDP2 unit gathers: each parameter (those of ``exclude`` left
    out) with dim 0 padded up to a multiple of ``dp``, as FSDP2 shards it."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    total = 0
    for p in module.parameters():
        if id(p) in skip:
            continue
        shape = tuple(p.shape)
        rows = -(-shape[0] // dp) * dp if shape else 1
        total += rows * math.prod(shape[1:]) * p.element_size()
    return total


def fsdp_step_table(workload: Any, dp: int, *, batch: int = 1, seq_len: int = 16, dtype: Any = "fp32",
                    reshard_after_forward: bool = True, layers: int | None = None) -> pd.DataFrame:
    """One rank's op table of an FSDP2 training step (forward with the LM loss, backward) of
    ``workload`` (a registry name or config path of a decoder LM small enough for this CPU)
    fully sharded over ``dp`` ranks; ``layers`` keeps only the first decoder layers (a full-scale
    model at full width, module docstring); ``table.attrs["fsdp"]`` = {dp, units: {name: gathered
    bytes}, param_bytes, reshard_after_forward, layers (traced), full_layers (the model's)}."""
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 2:
        raise ShardError(f"dp={dp!r}: FSDP shards over a whole number >= 2 of ranks")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _register_fsdp_costs()
    torch_dtype = parse_dtype(dtype)
    built = build(workload, scale="full", device="meta", dtype=torch_dtype, batch=batch, seq_len=seq_len)
    model = built.model
    full_layers = len(_layers(model))
    if layers is not None:
        _keep_first_layers(model, layers, "the model's")
    layers = _layers(model)
    units = {f"{getattr(model, 'base_model_prefix', 'model')}.layers.{i}": fsdp_unit_bytes(l, dp)
             for i, l in enumerate(layers)}
    units["<root>"] = fsdp_unit_bytes(model, dp, exclude=tuple(layers))
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    with fake_world(dp):
        mesh = init_device_mesh("cpu", (dp,))
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh)  # the root: FSDP2 keeps it gathered for backward
        model.to_empty(device="cpu")  # only this rank's shards are allocated

        def step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

        table = collective_rows(trace(step, model=model, phase="train"), dp)
    table.attrs["fsdp"] = {"dp": dp, "units": units, "param_bytes": sum(units.values()),
                           "reshard_after_forward": reshard_after_forward, "layers": len(layers),
                           "full_layers": full_layers}
    return table


class _StageModule(nn.Module):
    """A pipeline stage of a causal LM cut by ``shard._keep_stage``: token ids (first stage) or
    the received hidden states in, hidden states (or the last stage's logits) out."""

    def __init__(self, lm: nn.Module, first: bool):
        super().__init__()
        self.lm, self.first = lm, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = getattr(self.lm, self.lm.base_model_prefix)
        out = base(input_ids=x, use_cache=False) if self.first else base(inputs_embeds=x, use_cache=False)
        return self.lm.lm_head(out.last_hidden_state)


def _static_warmup(stages, has_backward, p2p_done) -> None:
    """Stands for the schedule's P2P warm-up vote (module docstring): every stage was given its
    shapes, so the vote's outcome is the static mode."""
    from torch.distributed.pipelining.stage import InferenceMode

    for s in stages:
        s._inference_mode = InferenceMode.STATIC


def pipeline_stage_table(workload: Any, pp: int, stage: int, *, microbatches: int = 2, batch: int = 2,
                         seq_len: int = 16, dtype: Any = "fp32", layers: int | None = None) -> pd.DataFrame:
    """Op table of pipeline ``stage`` of ``pp`` running ``ScheduleGPipe`` forward over
    ``microbatches`` microbatches of a ``batch`` of ``seq_len``-token prompts (module docstring);
    ``layers`` keeps only the stage's first decoder layers (a full-scale model at full width: its
    sends and receives, one hidden state each, do not depend on how many layers it runs);
    ``table.attrs["pipeline"]`` = {pp, stage, microbatches, first_layer, layers (the stage's),
    traced_layers, message_bytes}."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 2:
        raise ShardError(f"pp={pp!r}: a pipeline has a whole number >= 2 of stages")
    if microbatches < 1 or batch % microbatches:
        raise ShardError(f"microbatches={microbatches} must be >= 1 and divide batch={batch}")
    torch_dtype = parse_dtype(dtype)
    built = build(workload, scale="full", device="meta", dtype=torch_dtype, batch=batch, seq_len=seq_len)
    lm = built.model
    _layers(lm)
    first, n = _keep_stage(lm, pp, stage)
    traced = n if layers is None else _keep_first_layers(lm, layers, f"stage {stage}'s")
    lm.to_empty(device="cpu")
    mb, hidden = batch // microbatches, lm.config.hidden_size
    hid = torch.empty(mb, seq_len, hidden, dtype=torch_dtype)
    x = torch.zeros(mb, seq_len, dtype=torch.long) if stage == 0 else hid
    y = torch.empty(mb, seq_len, lm.config.vocab_size, dtype=torch_dtype) if stage == pp - 1 else hid
    with fake_world(pp, rank=stage), torch.no_grad():
        module = _StageModule(lm, stage == 0)
        st = PipelineStage(module, stage, pp, torch.device("cpu"), input_args=(x,), output_args=(y,))
        schedule = ScheduleGPipe(st, n_microbatches=microbatches)
        if not hasattr(schedule, "_warmup_p2p"):
            raise ShardError("this torch's pipelining schedule has no _warmup_p2p to stand in for under the fake "
                             "process group (cohw_utils.spine.shard_train was written for torch 2.13): use "
                             "per_rank_table(pp=, stage=), whose send/recv rows are modelled")
        schedule._warmup_p2p = _static_warmup

        def run() -> None:
            schedule.step(torch.zeros(batch, seq_len, dtype=torch.long)) if stage == 0 else schedule.step()

        table = collective_rows(trace(run, model=lm, phase="prefill"))
    table.attrs["pipeline"] = {"pp": pp, "stage": stage, "microbatches": microbatches, "first_layer": first,
                               "layers": n, "traced_layers": traced, "message_bytes": mb * seq_len * hidden * torch_dtype.itemsize}
    return table
