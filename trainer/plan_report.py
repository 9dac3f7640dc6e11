"""What a plan costs: the per-step table, totals, and the strategy comparison of tools/plan.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

from trainer.config import Config, MethodConfig, Strategy, contrastive_warning
from trainer.distributed import DistInfo
from trainer.exemplars import SELECTORS, largest_buffers
from trainer.methods import BUILTIN, build_methods
from trainer.methods.base import Method
from trainer.plan import Plan, make_plan

STRATEGIES = ["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "replay", "restart"]


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:.4g}"


def plan_for(cfg: Config, sizes: Mapping[str, int], strategy: str) -> Plan:
    return make_plan(replace(cfg, plan=replace(cfg.plan, strategy=cast(Strategy, strategy))), sizes)


def method_flops(plan: Plan, methods: Sequence[Method], model_flops: float) -> float:
    """What the methods add to a plan: per-sample extras (teacher and momentum forwards) and year-end
    passes (a Fisher), step by step (the first step has no previous model)."""
    return sum(
        s.samples * m.flops_per_sample(model_flops, s.index == 0) + m.year_end_flops(model_flops)
        for s in plan.steps
        for m in methods
    )


def selection_flops(plan: Plan, cfg: Config, model_flops: float) -> float:
    """The exemplar selection passes (plan.buffer_select herding/kmeans): one forward of every
    candidate of each year a later step replays from a memory."""
    if cfg.plan.buffer_select not in SELECTORS:
        return 0.0
    # A year's candidates: memory_pool of it (at least its largest memory), at most all of it.
    return sum(
        min(max(cfg.plan.memory_pool, m), plan.steps[i].pool[y]) * model_flops / 3
        for i in range(len(plan.steps))
        for y, m in largest_buffers(plan, i).items()
    )


def summary(
    plan: Plan,
    flops_per_sample: float,
    restart: Plan,
    methods: Sequence[Method] = (),
    model_flops: float = 0.0,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Totals of a plan (the objective's FLOPs; the methods' and exemplar selection's on top) and its
    cost relative to retraining from scratch at every step."""
    train = plan.total_samples * flops_per_sample
    extra = method_flops(plan, methods, model_flops) + (selection_flops(plan, cfg, model_flops) if cfg else 0.0)
    return {
        "strategy": plan.strategy,
        "samples": plan.total_samples,
        "optimizer_steps": sum(s.steps for s in plan.steps),
        "train_flops": train,
        "method_flops": extra,
        "total_flops": train + extra,
        "cost_vs_restart": (train + extra) / (restart.total_samples * flops_per_sample),
    }


Candidate = tuple[Config, list[Method]]


def method_candidates(cfg: Config, dist: DistInfo) -> dict[str, Candidate]:
    """Every built-in method alone at its defaults, exemplar memories (alone, iCaRL, LUCIR) and the
    run's own combination when it has one."""

    def variant(methods: list[str], select: str) -> Candidate:
        c = replace(
            cfg,
            plan=replace(cfg.plan, buffer_select=cast(Any, select)),
            methods=[MethodConfig(name=n) for n in methods],
        )
        return c, build_methods(c, dist)

    out: dict[str, Candidate] = {"none": variant([], "samples")}
    for name in BUILTIN:
        if name != "merge" or cfg.plan.strategy != "restart":
            out[name] = variant([name], "samples")
    out["herding memory"] = variant([], "herding")
    out["kmeans memory"] = variant([], "kmeans")
    out["icarl: herding+distill"] = variant(["distill"], "herding")
    out["lucir: herding+lucir"] = variant(["lucir"], "herding")
    if cfg.methods or cfg.plan.buffer_select in SELECTORS:
        name = "this run: " + "+".join([cfg.plan.buffer_select] + [m.name for m in cfg.methods])
        out[name] = (cfg, build_methods(cfg, dist))
    return out


def methods_table(plan: Plan, flops_per_sample: float, candidates: Mapping[str, Candidate], model_flops: float) -> str:
    """Each method (or combination) on one plan: its extra FLOPs, its total against the plain plan,
    and the samples per step that would give it the plain plan's compute."""
    plain = plan.total_samples * flops_per_sample
    per_step = plan.total_samples / len(plan.steps)
    lines = [
        f"{'methods (' + plan.strategy + ')':<30} {'extra FLOPs':>12} {'total FLOPs':>12} {'vs plain':>9} "
        f"{'samples/step at equal compute':>30}"
    ]
    for name, (cfg, methods) in candidates.items():
        extra = method_flops(plan, methods, model_flops) + selection_flops(plan, cfg, model_flops)
        lines.append(
            f"{name:<30} {extra:>12.3e} {plain + extra:>12.3e} {(plain + extra) / plain:>8.2f}x "
            f"{_human(per_step * plain / (plain + extra)):>30}"
        )
    return "\n".join(lines)


def step_table(plan: Plan) -> str:
    """One line per step: years with weights (buffers marked), samples, steps, warmup, peak LR, init."""
    lines = [
        f"{'step':>4}  {'tag':<6} {'samples':>9} {'steps':>8} {'warmup':>6} {'peak lr':>8} {'init':<8}  "
        "years: weight (pool)"
    ]
    for s in plan.steps:
        years = ", ".join(
            f"{y}: {s.quotas[y] / s.samples:.3f} ({_human(s.pool[y])}{' buf' if y in s.buffered else ''})"
            for y in s.quotas
        )
        lines.append(
            f"{s.index:>4}  {s.tag:<6} {_human(s.samples):>9} {s.steps:>8} {s.warmup:>6} {s.lr:>8.2e} "
            f"{s.init:<8}  {years}"
        )
    return "\n".join(lines)


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'strategy':<17} {'samples':>9} {'steps':>9} {'train FLOPs':>12} {'+ methods':>12} {'total':>12} "
        f"{'vs restart':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r['strategy']:<17} {_human(r['samples']):>9} {r['optimizer_steps']:>9} "
            f"{r['train_flops']:>12.3e} {r['method_flops']:>12.3e} {r['total_flops']:>12.3e} "
            f"{r['cost_vs_restart']:>9.2f}x"
        )
    return "\n".join(lines)


def assumptions(cfg: Config, sizes: Mapping[str, int], flops: int, assumed_sizes: bool) -> str:
    budget = cfg.train.samples
    notes = [
        f"- model {cfg.model.name}: {flops / 3:.3e} forward FLOPs per image-text pair, training = 3x forward",
        f"- per-step budget: {_human(budget) + ' samples' if budget else 'one pass over the step data'}, "
        f"global batch {cfg.train.global_batch}",
        "- restart retrains from scratch each step with "
        f"{'the step budget x steps so far' if cfg.plan.restart_budget == 'grow' else 'the step budget'}"
        " (TiC-CLIP's oracle)",
        "- warm-start cumulative over T steps with a fixed budget costs T budgets; restart costs "
        "T(T+1)/2, so the saving is (T+1)/2x",
    ]
    if cfg.plan.buffer_select in SELECTORS:
        notes.append(
            f"- replay buffers are exemplar memories ({cfg.plan.buffer_select} over {cfg.plan.memory_features} "
            f"embeddings of up to {_human(cfg.plan.memory_pool)} candidates per year, chosen at the year's end; "
            "'buf' sizes above are the memory each step replays)"
        )
    warning = contrastive_warning(cfg, None)
    if warning:
        notes.append(f"- warning: {warning}")
    if assumed_sizes:
        notes.append(
            "- data not readable here: every year assumed to hold "
            f"{_human(next(iter(sizes.values())))} samples (--year-size)"
        )
    return "assumptions:\n" + "\n".join(notes)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def memory_table(report: Mapping[str, Any]) -> str:
    """One preset's memory report: a header, then one line per ZeRO stage and offload (GiB per GPU)."""
    r = report
    label = f"{r['config']}: " if r.get("config") else ""
    if r["accumulation"]:
        batches = (
            f"global batch {r['global_batch']} = micro-batch {r['micro_batch']} x {r['world']} GPUs x "
            f"{r['accumulation']} accumulation step{'s' if r['accumulation'] > 1 else ''}"
        )
    else:
        batches = (
            f"note: global batch {r['global_batch']} is not a multiple of micro-batch x GPUs = "
            f"{r['micro_batch']} x {r['world']}; the trainer refuses this cluster size"
        )
    batches += f"; contrastive batch {r['contrastive_batch']} ({r['accumulation_mode']} accumulation)"
    if r["contrastive_warning"]:
        batches += f"\nwarning: {r['contrastive_warning']}"
    lines = [
        f"{label}{r['model']}, {_human(r['params'])} params (largest layer {_human(r['largest_layer_params'])}), "
        f"{r['precision']}, micro-batch {r['micro_batch']}, {r['gpus_per_node']} GPUs x {r['nodes']} nodes "
        f"= {r['world']} GPUs, {r['gpu_mem_gib']:g} GiB per GPU",
        batches,
        f"activations at micro-batch {r['micro_batch']}: {_gib(r['activations_ckpt_off'])} GiB without "
        f"checkpointing, {_gib(r['activations_ckpt_on'])} GiB with; backward working set {_gib(r['working_set'])} GiB",
        f"  {'zero':>4} {'offload':<19} {'states':>7} {'CPU/node':>8} {'total':>8} {'total':>8} "
        f"{'max micro':>9} {'max micro':>9}",
        f"  {'':>4} {'':<19} {'GiB/GPU':>7} {'GiB':>8} {'ckpt off':>8} {'ckpt on':>8} {'ckpt off':>9} {'ckpt on':>9}",
    ]
    for row in r["rows"]:
        mark = "*" if (row["stage"], row["offload"]) == (r["zero_stage"], r["config_offload"]) else " "
        lines.append(
            f"{mark} {row['stage']:>4} {row['offload']:<19} {_gib(row['states_gpu']):>7} "
            f"{_gib(row['states_cpu_node']):>8} {_gib(row['total_ckpt_off']):>8} {_gib(row['total_ckpt_on']):>8} "
            f"{row['max_micro_ckpt_off']:>9} {row['max_micro_ckpt_on']:>9}"
        )
    return "\n".join(lines)


def memory_notes(precision: str) -> str:
    """What the memory tables count and leave out."""
    notes = [
        "- * = the config's deepspeed.zero_stage and offload; totals are at the config's micro-batch",
        "- states: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs (16-bit params + fp32 master, "
        "grads, Adam); stage 0/1 derived with the same bytes per param; CPU/node includes DeepSpeed's 1.5x buffer",
        "- activations: analytic saved-for-backward bytes with memory-efficient attention (xformers / flash "
        "SDPA: no seq x seq matrices) and the loss logits over micro x world columns (the global batch with "
        "train.accumulation=features); checked against saved tensors measured on CPU (tests/test_memory.py)",
        "- total = states + activations + one block's backward working set; max micro = the largest "
        "micro-batch whose total fits the GPU",
        "- not counted: CUDA context, NCCL and DeepSpeed bucket buffers, allocator fragmentation; keep "
        "headroom by passing a smaller --gpu-mem",
    ]
    if precision == "fp32":
        notes.append("- DeepSpeed's estimators count 16-bit params and grads: fp32 training needs more than shown")
    return "assumptions:\n" + "\n".join(notes)
