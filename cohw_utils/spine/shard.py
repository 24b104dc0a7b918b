"""Sharded models and their per-rank op tables, from torch.distributed's own APIs (Chapter 4.7).

A full-scale model on ``meta`` is split the way users split it, and traced as *one rank* sees it:

* **Tensor parallelism** (``tp``): the model's own published plan (transformers'
  ``config.base_model_tp_plan`` plus the causal-LM class's ``_tp_plan``: ``q/k/v/gate/up``
  column-wise, ``o/down`` row-wise, the LM head column-wise with its output gathered) is
  applied with ``torch.distributed.tensor.parallel.parallelize_module`` on a device mesh over
  torch's *fake* process group (one process stands for every rank; collectives move nothing).
  Each style maps to torch's ``ColwiseParallel``/``RowwiseParallel`` (:data:`TP_STYLES`).
* **Pipeline parallelism** (``pp``, ``stage``): the stage's contiguous slice of decoder layers
  (layers split evenly, the first stages taking one more where ``pp`` does not divide them), as
  torch.distributed.pipelining's manual split builds a stage: the first stage embeds tokens, the
  last one normalizes and runs the LM head, the others receive hidden states. The stage's
  receive and send are added as ``c10d.recv_``/``c10d.send`` rows of one microbatch's hidden
  state (batch x tokens x hidden x dtype bytes).
* **Expert parallelism** (``ep``, mixture-of-experts models): the model's own expert plan
  (transformers' ``config.base_model_ep_plan``: the routed experts' weights ``grouped_gemm``,
  sharded on the expert dimension, and the experts module ``ep_dispatch_experts``) is applied
  with transformers' ``apply_expert_parallelism`` on an ``ep``-rank mesh. Each rank holds
  ``batch / ep`` sequences for attention and the dense layers ("data-parallel attention") and
  ``E / ep`` experts; transformers' all-to-all implementation sends each (token, expert) pair to
  its expert's rank and the results back: per MoE layer one all-to-all of the per-expert counts,
  one of the tokens (dispatch) and one of the outputs (combine). transformers reads the split
  sizes back from the device; a ``meta`` tensor has no values, so :class:`_BalancedAllToAll`
  (registered in transformers' ``EPImplementationInterface``) takes them from *balanced routing*:
  every rank sends ``tokens x k / ep`` pairs to every rank, spread evenly over its experts. That
  is the stated assumption; skewed routing makes the busiest rank slower.

What the trace records (:mod:`cohw_utils.spine.trace`): an op on DTensors is left to DTensor,
so the table holds the *local* op each rank runs (per-rank shapes, so per-rank FLOPs and bytes)
and every collective the sharding issues (all-reduce after a row-wise layer, all-gather of the
LM head's logits) as a row of class ``communication``. Two columns are added to the op table:
``group_size`` (ranks in the collective's group) and ``comm_bytes`` (the message its cost
formula takes, :mod:`cohw_utils.views.collectives`); both are NaN on compute rows.

The per-rank config: after sharding, ``config.num_attention_heads`` and
``config.num_key_value_heads`` are the rank's share, so a decode cache is allocated per rank,
as an engine does. A model whose heads (or KV heads) ``tp`` does not divide raises
:class:`ShardError` (engines replicate KV heads there; that is not modelled).

Used by Chapter 4.7 (parallelism) and ``python -m cohw_utils predict --tp/--pp``.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
from typing import Any, Iterator

import pandas as pd
import torch
from torch import nn

from cohw_utils.core.errors import ConfigError
from cohw_utils.core.opclasses import COMMUNICATION
from cohw_utils.spine.trace import trace
from cohw_utils.workloads import build

__all__ = ["ShardError", "TP_STYLES", "fake_world", "model_tp_plan", "apply_tp", "model_ep_plan", "apply_ep", "stage_layers",
           "per_rank_table", "collective_rows", "comm_debug_counts", "MESSAGE_ARG"]


class ShardError(ConfigError):
    """A model or plan that cannot be sharded as asked."""


def _styles() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        # a fused [gate; up] or [q; k; v] Linear split by rows: the same FLOPs and bytes per rank
        # as transformers' interleaved split
        "packed_colwise": ColwiseParallel,
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
        "replicated_with_grad_allreduce": None,  # a small norm kept whole on every rank
        "local": None,
    }


#: transformers' plan style names -> a torch ParallelStyle factory (None: left replicated).
TP_STYLES: tuple[str, ...] = ("colwise", "rowwise", "packed_colwise", "colwise_gather_output",
                              "rowwise_split_input", "replicated_with_grad_allreduce", "local")


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """torch's fake process group of ``world_size`` ranks (this process is ``rank``) for the
    block; a process group already running (under torchrun) is used as it is."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() < world_size:
            raise ShardError(f"the running process group has {dist.get_world_size()} ranks; "
                             f"this plan needs {world_size}")
        yield
        return
    hook = sys.excepthook  # init_process_group chains a '[rank0]:' prefix onto it: put it back after
    if not 0 <= rank < world_size:
        raise ShardError(f"rank {rank} of a {world_size}-rank world: pick rank in 0..{world_size - 1}")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's own tensor-parallel plan: module pattern -> style name (transformers'
    ``base_model_tp_plan`` under the base model's prefix, plus the head's ``_tp_plan``)."""
    config = getattr(model, "config", None)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not base:
        raise ShardError(f"{type(model).__name__} publishes no tensor-parallel plan "
                         "(config.base_model_tp_plan is empty): pass plan={pattern: style} yourself")
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_prefix = prefix and isinstance(getattr(model, prefix, None), nn.Module)
    plan = {(f"{prefix}.{k}" if has_prefix else k): v for k, v in base.items()}
    plan.update(dict(getattr(type(model), "_tp_plan", None) or {}))
    return plan


def _check_heads(config: Any, tp: int) -> None:
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    for what, n in (("attention heads", heads), ("KV heads", kv)):
        if n is not None and n % tp:
            raise ShardError(f"tp={tp} does not divide the model's {n} {what}: column-wise sharding "
                             f"would split a head; pick tp among the divisors of {n}")


def apply_tp(model: nn.Module, tp: int, plan: dict[str, str] | None = None) -> nn.Module:
    """Shard ``model`` in place over a ``tp``-rank mesh of the running (fake or real) process
    group with ``parallelize_module``; returns it, its config set to the rank's share of heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    if tp == 1:
        return model
    plan = model_tp_plan(model) if plan is None else plan
    styles = _styles()
    unknown = sorted({s for s in plan.values() if s not in styles})
    if unknown:
        raise ShardError(f"plan style(s) {unknown} have no torch ParallelStyle here (known: "
                         f"{', '.join(TP_STYLES)}); a mixture of experts' expert styles are applied by apply_ep (ep > 1)")
    config = getattr(model, "config", None)
    _check_heads(config, tp)
    mesh = init_device_mesh("cpu", (tp,))
    parallelize_module(model, mesh, {k: styles[v]() for k, v in plan.items()
                                     if styles[v] is not None and _targets(model, k)})
    for key in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, key, None):
            setattr(config, key, getattr(config, key) // tp)
    return model


def model_ep_plan(model: nn.Module) -> dict[str, str]:
    """The model's own expert-parallel plan, expanded to module and parameter names: name ->
    style (transformers' ``base_model_ep_plan`` under the base model's prefix)."""
    config = getattr(model, "config", None)
    base = dict(getattr(type(config), "base_model_ep_plan", None) or getattr(config, "base_model_ep_plan", None) or {})
    if not base:
        raise ShardError(f"{type(model).__name__} publishes no expert-parallel plan (config.base_model_ep_plan is "
                         "empty): expert parallelism needs a mixture-of-experts model whose transformers class has one")
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_prefix = prefix and isinstance(getattr(model, prefix, None), nn.Module)
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    plan: dict[str, str] = {}
    for pattern, style in base.items():
        rx = _plan_regex(f"{prefix}.{pattern}" if has_prefix else pattern)
        plan.update({n: style for n in names if rx.fullmatch(n)})
    if not plan:
        raise ShardError(f"{type(model).__name__}'s expert plan names no module of this model ({sorted(base)})")
    return plan


def _balanced_all_to_all() -> type:
    """transformers' ``AllToAllEP`` with its one host sync (the split sizes, read from the
    routing's values) replaced by balanced routing's sizes, so it runs on ``meta`` (module
    docstring). The rest (sort by expert, gather, the counts', tokens' and outputs' all-to-alls,
    the combine) is the library's."""
    from torch.distributed import all_to_all_single
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    from transformers.distributed.expert_parallel import AllToAllEP, _AllToAllState, _WaitTensor

    class _BalancedAllToAll(AllToAllEP):
        # Written here because transformers' _dispatch_tokens calls .tolist() on the routing counts,
        # which a meta tensor cannot answer; the structure follows the library's line for line.
        def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
            if self.tp_mesh.size() > 1:
                raise ShardError("balanced expert parallelism with tensor parallelism is not modelled: give ep alone")
            group, ep = self.ep_mesh.get_group(), self.ep_mesh.size()
            k = top_k_index.size(-1)
            expert_ids = top_k_index.reshape(-1)
            order = torch.argsort(expert_ids)
            send_tokens = hidden_states[order // k]                  # (tokens k, hidden), sorted by expert
            dev = hidden_states.device
            send_counts = torch.zeros(ep, self.num_local_experts, dtype=torch.long, device=dev)
            recv_counts = torch.empty_like(send_counts)
            all_to_all_single(recv_counts, send_counts, group=group)  # the per-expert counts, as the library sends them
            pairs = expert_ids.numel()
            sizes = [pairs // ep + (1 if r < pairs % ep else 0) for r in range(ep)]  # balanced: even to every rank
            recv = _WaitTensor.apply(all_to_all_single_autograd(send_tokens, sizes, sizes, group))
            n = sum(sizes)
            local_ids = (torch.arange(n, device=dev) * self.num_local_experts // max(n, 1)).unsqueeze(-1)
            weights = torch.ones_like(local_ids, dtype=recv.dtype)
            return recv, local_ids, weights, _AllToAllState(top_k_weights, order, sizes, sizes, hidden_states.size(0))

    return _BalancedAllToAll


def apply_ep(model: nn.Module, ep: int) -> nn.Module:
    """Shard ``model``'s routed experts in place over an ``ep``-rank mesh of the running (fake or
    real) process group with transformers' ``apply_expert_parallelism`` and the model's own plan,
    dispatching tokens by balanced all-to-alls (module docstring); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import EPImplementationInterface, apply_expert_parallelism

    if ep == 1:
        return model
    plan = model_ep_plan(model)
    experts = {getattr(m, "num_experts", None) for n, m in model.named_modules() if plan.get(n) == "ep_dispatch_experts"}
    bad = sorted(e for e in experts if not isinstance(e, int) or e % ep)
    if bad:
        raise ShardError(f"ep={ep} does not divide the model's {bad[0]} routed experts; pick ep among its divisors")
    EPImplementationInterface.register("cohw_balanced", _balanced_all_to_all())
    mesh = init_device_mesh("cpu", (ep, 1), mesh_dim_names=("ep", "tp"))
    return apply_expert_parallelism(model, mesh["ep"], mesh["tp"], plan, ep_implementation="cohw_balanced")


def _plan_regex(pattern: str) -> re.Pattern:
    """A plan's module pattern as a regex: ``*`` stands for one path component."""
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def _targets(model: nn.Module, pattern: str) -> bool:
    """Whether a plan pattern (``*`` = one path component) names a Linear or Embedding of this
    model: a pipeline stage without the LM head, say, drops the head's entry."""
    rx = _plan_regex(pattern)
    return any(rx.fullmatch(name) and isinstance(m, (nn.Linear, nn.Embedding))
               for name, m in model.named_modules())


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The decoder layers of pipeline ``stage`` (0-based) of ``pp``: contiguous, even, the first
    ``n_layers % pp`` stages one layer more."""
    if not (isinstance(pp, int) and pp >= 1 and isinstance(stage, int) and 0 <= stage < pp):
        raise ShardError(f"pipeline stage {stage!r} of pp={pp!r}: pp must be a whole number >= 1 and stage in 0..pp-1")
    if pp > n_layers:
        raise ShardError(f"pp={pp} is more stages than the model's {n_layers} layers")
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class _Received(nn.Module):
    """Stands for a pipeline stage's input: the hidden states the previous stage sent."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.hidden, self.dtype = hidden, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.empty(*input_ids.shape, self.hidden, dtype=self.dtype, device=input_ids.device)


def _keep_stage(model: nn.Module, pp: int, stage: int) -> tuple[int, int]:
    """Cut ``model`` to one pipeline stage; returns (first layer index, layers kept)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ShardError(f"{type(model).__name__}: a pipeline split needs a decoder whose layers are "
                         "model.<base>.layers (a ModuleList)")
    keep = stage_layers(len(layers), pp, stage)
    base.layers = nn.ModuleList(layers[i] for i in keep)
    config = model.config
    for i, layer in enumerate(base.layers):  # the stage's cache holds only its layers
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    if stage > 0:
        base.embed_tokens = _Received(config.hidden_size, model.dtype)
    if stage < pp - 1:
        base.norm = nn.Identity()
        model.lm_head = nn.Identity()
    return keep.start, len(keep)


#: c10d ops whose first argument is the output buffer: the message is argument ``MESSAGE_ARG[op]``
#: (``_allgather_base_(output, input)``: the gathered output; ``_reduce_scatter_base_(output,
#: input)``: the input; ``alltoall_base_(output, input, ...)``: the input, each rank's buffer;
#: ``send``/``recv_(tensors)``: the buffer), as its cost formula takes it.
MESSAGE_ARG: dict[str, int] = {"c10d._allgather_base_": 0, "c10d.alltoall_base_": 1, "c10d.allgather_into_tensor_coalesced_": 0,
                               "c10d._reduce_scatter_base_": 1, "c10d.reduce_scatter_tensor_coalesced_": 1,
                               "c10d.send": 0, "c10d.recv_": 0}


def collective_rows(table: pd.DataFrame, group_size: int | None = None) -> pd.DataFrame:
    """The op table with ``group_size`` and ``comm_bytes`` filled from the trace's record of each
    collective (NaN on every other row).

    torch's ``c10d`` ops (FSDP2's all-gathers and reduce-scatters, pipelining's sends) take an
    output buffer as an argument and name their group by a script object the tracer does not
    read: their message is taken from the argument :data:`MESSAGE_ARG` names, and their group
    size is ``group_size`` (the mesh the caller sharded over; 2 for a send or receive)."""
    out = table.copy()
    out["group_size"] = math.nan
    out["comm_bytes"] = math.nan
    gs, cb = out.columns.get_loc("group_size"), out.columns.get_loc("comm_bytes")
    for pos, c in table.attrs.get("collectives", {}).items():
        n, nbytes = c["group_size"], c["nbytes"]
        arg = MESSAGE_ARG.get(c["op"])
        if arg is not None:
            shapes, dtype = table.iat[pos, table.columns.get_loc("input_shapes")], table.iat[pos, table.columns.get_loc("dtype")]
            nbytes = math.prod(shapes[arg]) * getattr(torch, dtype).itemsize
            if c["op"] in ("c10d.send", "c10d.recv_"):
                n = 2
            elif n == 1 and group_size is not None:
                n = group_size
        out.iat[pos, gs] = n
        out.iat[pos, cb] = nbytes
    out.attrs = dict(table.attrs)
    return out


def comm_debug_counts(table: pd.DataFrame) -> pd.DataFrame:
    """The tracer's collective rows against ``torch.distributed.tensor.debug.CommDebugMode``'s
    counts of the same run (``per_rank_table(..., comm_debug=True)``): one row per scope (each
    decoder layer ``model.layers.i``, and ``total``), pass and collective (the op's name without
    namespace, e.g. ``all_reduce``), with ``traced`` and ``comm_debug`` counts and ``match``."""
    debug = table.attrs.get("comm_debug")
    if debug is None:
        raise ShardError("this table was traced without CommDebugMode: pass comm_debug=True to per_rank_table")
    comm = table[table["op_class"] == COMMUNICATION]
    names = [op.split(".")[1] for op in comm["op"]]
    traced: dict[tuple[str, str, str], int] = {}
    for module, npass, name in zip(comm["module"], comm["pass"], names):
        m = re.match(r"(.*\blayers\.\d+)(\.|$)", module)
        for scope in ([m.group(1)] if m else []) + ["total"]:
            traced[(scope, npass, name)] = traced.get((scope, npass, name), 0) + 1
    keys = set(traced) | set(debug)
    rows = [{"scope": k[0], "pass": k[1], "collective": k[2], "traced": traced.get(k, 0),
             "comm_debug": debug.get(k, 0)} for k in keys]
    out = pd.DataFrame(rows, columns=["scope", "pass", "collective", "traced", "comm_debug"])
    out["match"] = out["traced"] == out["comm_debug"]
    layer = out["scope"].str.extract(r"layers\.(\d+)$")[0].astype(float).fillna(math.inf)
    return out.assign(_o=layer).sort_values(["_o", "scope", "pass", "collective"]).drop(columns="_o").reset_index(drop=True)


def _comm_debug_scopes(mode: Any) -> dict[tuple[str, str, str], int]:
    """CommDebugMode's per-module counts as {(scope, pass, collective): count}: each decoder
    layer (its FQN without the root class) and the run's ``total``."""
    out: dict[tuple[str, str, str], int] = {}
    for fqn, by_pass in mode.comm_module_counts.items():
        scope = fqn.split(".", 1)[1] if "." in fqn else fqn
        if not re.search(r"\blayers\.\d+$", scope) and fqn != "Global":
            continue
        for npass, counts in by_pass.items():
            for op, n in counts.items():
                if n:
                    out[("total" if fqn == "Global" else scope, npass, op.__name__.split(".")[-1])] = n
    return out


def _p2p_rows(table: pd.DataFrame, stage: int, pp: int, tokens: int, hidden: int, dtype: torch.dtype,
              phase: str) -> pd.DataFrame:
    nbytes = tokens * hidden * torch.empty((), dtype=dtype).element_size()
    rows = []
    for op, needed, read, written in (("c10d.recv_.default", stage > 0, 0, nbytes),
                                      ("c10d.send.default", stage < pp - 1, nbytes, 0)):
        if needed:
            rows.append({**{c: None for c in table.columns}, "op": op, "module": "<pipeline>",
                         "module_class": "", "phase": phase, "pass": "forward", "op_class": COMMUNICATION,
                         "input_shapes": (), "output_shapes": (), "dtype": str(dtype).replace("torch.", ""),
                         "flops": 0, "flops_effective": 0, "macs": 0, "bytes_read": read,
                         "bytes_written": written, "intensity": math.nan, "costed": True,
                         "group_size": 2, "comm_bytes": nbytes})
    if not rows:
        return table
    out = pd.concat([table, pd.DataFrame(rows, columns=table.columns)], ignore_index=True)
    out.attrs = dict(table.attrs)
    return out


def per_rank_table(workload: Any, phase: str = "prefill", *, tp: int = 1, pp: int = 1, stage: int = 0,
                   ep: int = 1, batch: int = 1, seq_len: int | None = None, dtype: Any = None,
                   plan: dict[str, str] | None = None, comm_debug: bool = False, **options: Any) -> pd.DataFrame:
    """The op table of one rank of ``workload`` (a registry name or config path) under
    ``tp``-way tensor, ``pp``-way pipeline and ``ep``-way expert parallelism, pipeline ``stage``,
    for ``phase`` at the global ``batch`` and ``seq_len`` (one microbatch: the whole batch; under
    expert parallelism each rank holds ``batch / ep`` of it).

    Rows as :func:`cohw_utils.spine.trace.trace`, plus ``group_size`` and ``comm_bytes``;
    ``table.attrs`` gains ``parallel`` = {tp, pp, stage, ep, first_layer, layers}. ``comm_debug=True``
    runs torch's ``CommDebugMode`` around the same traced run and keeps its counts in
    ``table.attrs["comm_debug"]`` (compare them with :func:`comm_debug_counts`).
    """
    for name, v in (("tp", tp), ("pp", pp), ("ep", ep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShardError(f"{name}={v!r}: must be a whole number of devices >= 1")
    if ep > 1 and tp > 1:
        raise ShardError("tp and ep together are not modelled: give a mixture-of-experts model ep (with pp), or tp alone")
    if batch % ep:
        raise ShardError(f"ep={ep} ranks split the batch of {batch} sequences for attention: give a batch that ep divides")
    batch //= ep
    built = build(workload, scale="full", device="meta", dtype=dtype, batch=batch, seq_len=seq_len, **options)
    if phase not in built.phases:
        raise ShardError(f"{built.workload.name} has no phase {phase!r}; phases: {', '.join(built.phases)}")
    model = built.model
    first, n = 0, getattr(model.config, "num_hidden_layers", 0)
    if pp > 1:
        first, n = _keep_stage(model, pp, stage)
    elif stage != 0:
        raise ShardError(f"stage={stage} needs pp > 1")
    with fake_world(tp * ep):
        apply_tp(model, tp, plan)
        apply_ep(model, ep)
        args, kwargs = built.phases[phase].make_inputs()
        with _comm_debug() if comm_debug else contextlib.nullcontext() as mode:
            table = trace(built.phases[phase].run, *args, model=model, phase=phase, **kwargs)
    table = collective_rows(table, tp * ep)
    if comm_debug:
        table.attrs["comm_debug"] = _comm_debug_scopes(mode)
    tokens = batch * (1 if phase == "decode" else (seq_len or _seq_len_of(kwargs)))
    table = _p2p_rows(table, stage, pp, tokens, model.config.hidden_size, built.dtype, phase)
    table.attrs["parallel"] = {"tp": tp, "pp": pp, "stage": stage, "ep": ep, "first_layer": first, "layers": n}
    return table


def _comm_debug() -> Any:
    from torch.distributed.tensor.debug import CommDebugMode

    return CommDebugMode()


def _seq_len_of(kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 1
