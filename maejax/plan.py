"""A pod dry run: will a config's train step fit on the devices you are about to rent?

    python -m maejax.plan --config=configs/mae_vitb.py --devices=32 [--target=v4-64] \
        [--config.FIELD=VALUE ...] [--json]

Runs on any machine, without the pod and without allocating the model. It
validates the config, lays out the config's mesh over `--devices` forced CPU
devices, builds the train state abstractly (`jax.eval_shape` over the
trainer's own init), and compiles the real train step ahead of time with the
real shardings and donation. It then prints, per device:

- from the CPU compile: the parameter and optimizer-state bytes the shardings
  give, and XLA's `memory_analysis()` of the compiled step (arguments,
  outputs, donated aliases, temporaries, generated code). This proves that the
  step compiles with these shardings; the temp size is what XLA's CPU backend
  would allocate, which fuses and schedules differently from the TPU and GPU
  compilers.
- an ANALYTIC ESTIMATE for the target: parameters and optimizer state (from
  the same shardings), float32 gradients, the input batch, the compute-dtype
  weight copies and the activations the backward pass keeps, from the
  formula below; then the memory of each device kind and whether the
  estimate fits it.

The analytic estimate and its formula: maejax/plan_memory.py.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from maejax import loop, models, optim, plan_memory, sharding, train_step, validate
from maejax.errors import ConfigError, UserError
from maejax.finetune_step import make_step, new_state, split_trainable
from maejax.pretrained import RANDOM_INIT

GiB = 2**30
TRAIN_TASKS = ("pretrain", "finetune", "linprobe")
# Above this share of a device's memory the estimate is called 'tight': it leaves out XLA's scratch.
TIGHT_FRACTION = 0.8
# JAX preallocates this fraction of a GPU's memory for XLA (XLA_PYTHON_CLIENT_MEM_FRACTION overrides it).
GPU_MEM_FRACTION = 0.75
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- targets: device kinds and their memory ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    label: str
    memory_gib: float  # HBM per JAX device
    platform: str  # 'tpu' | 'gpu'
    cores_per_device: int = 1  # TPU names count TensorCores; v4 and v5p have 2 per chip (one device)


DEVICE_KINDS = {
    "v4": DeviceKind("TPU v4", 32, "tpu", cores_per_device=2),
    "v5e": DeviceKind("TPU v5e", 16, "tpu"),
    "v5p": DeviceKind("TPU v5p", 95, "tpu", cores_per_device=2),
    "v6e": DeviceKind("TPU v6e", 32, "tpu"),
    "A100-40GB": DeviceKind("A100 40GB", 40, "gpu"),
    "A100-80GB": DeviceKind("A100 80GB", 80, "gpu"),
    "H100-80GB": DeviceKind("H100 80GB", 80, "gpu"),
    "H200-141GB": DeviceKind("H200 141GB", 141, "gpu"),
}
TPU_ALIASES = {"v5litepod": "v5e"}  # the Cloud TPU accelerator-type name of v5e slices
TARGET_FORMS = (
    "v4-N or v5p-N (N TensorCores, 2 per chip), v5e-N, v5litepod-N or v6e-N (N chips), "
    f"or Gx<GPU> with GPU one of {[k for k, v in DEVICE_KINDS.items() if v.platform == 'gpu']}; "
    "e.g. v4-64, v5p-128, 8xH100-80GB"
)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    kind: str  # a key of DEVICE_KINDS
    devices: int


def parse_target(name: str) -> Target:
    """'v4-64' -> 32 TPU v4 devices; '8xH100-80GB' -> 8 H100s.

    Raises:
      UserError: an unknown name or a size that does not make whole devices.
    """
    tpu = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    gpu = re.fullmatch(r"(\d+)x(.+)", name)
    if tpu and TPU_ALIASES.get(tpu.group(1), tpu.group(1)) in DEVICE_KINDS:
        kind = TPU_ALIASES.get(tpu.group(1), tpu.group(1))
        cores, per_device = int(tpu.group(2)), DEVICE_KINDS[kind].cores_per_device
        if cores > 0 and cores % per_device == 0:
            return Target(name, kind, cores // per_device)
    elif gpu and gpu.group(2) in DEVICE_KINDS and DEVICE_KINDS[gpu.group(2)].platform == "gpu":
        if int(gpu.group(1)) > 0:
            return Target(name, gpu.group(2), int(gpu.group(1)))
    raise UserError(f"--target={name!r} is unknown; valid: {TARGET_FORMS}")


def usable_bytes(kind: str) -> int:
    """What XLA may use of one device: all of a TPU's HBM, JAX's preallocated fraction of a GPU's."""
    spec = DEVICE_KINDS[kind]
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    return int(spec.memory_gib * GiB * (fraction if spec.platform == "gpu" else 1.0))


def verdict(total: int, usable: int) -> str:
    share = total / usable
    word = "fits" if share <= TIGHT_FRACTION else "tight" if share <= 1.0 else "does not fit"
    return f"{word} ({share:.0%})"


# --- the device count ----------------------------------------------------------------------


def device_count(devices: int | None, target: Target | None) -> int:
    """--devices, or the target's device count; both given must agree."""
    if devices is None and target is None:
        raise UserError("give --devices=N (the devices to plan for) or --target (which implies them)")
    if target is not None and devices is not None and devices != target.devices:
        raise UserError(
            f"--devices={devices} but --target={target.name} has {target.devices} "
            f"{DEVICE_KINDS[target.kind].label} devices; drop --devices or make them agree"
        )
    return target.devices if devices is None else devices


def valid_device_counts(config) -> list:
    """Device counts the config's micro-batch splits evenly over and its mesh can be laid out on."""
    micro = config.batch_size // config.grad_accum_steps

    def mesh_fits(n):
        try:
            sharding.mesh_shape(config.mesh, n)
            return True
        except ConfigError:
            return False

    return [n for n in range(1, micro + 1) if micro % n == 0 and mesh_fits(n)]


def check_devices(config, devices: int) -> None:
    """Refuse a --devices the config cannot run on, naming the valid counts.

    Raises:
      UserError: `devices` does not divide the micro-batch or does not fit config.mesh.
    """
    valid = valid_device_counts(config)
    if devices in valid:
        return
    micro = config.batch_size // config.grad_accum_steps
    if devices < 1:
        why = "a positive number of devices"
    elif micro % devices:
        why = (
            f"the micro-batch batch_size / grad_accum_steps = {config.batch_size} / "
            f"{config.grad_accum_steps} = {micro} must split evenly over the devices"
        )
    else:
        why = f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}) cannot be laid out on them"
    listed = ", ".join(map(str, valid[:24])) + (", ..." if len(valid) > 24 else "")
    raise UserError(f"--devices={devices} is invalid: {why}; valid for this config: {listed}")


def force_cpu_devices(count: int) -> None:
    """Make JAX start `count` CPU devices (and no accelerator) in this process.

    JAX reads these settings once, when its first backend starts (importing jax
    starts none), so this runs before anything touches a device; in a process
    that already used JAX (a notebook, a test) it refuses rather than plan on
    the wrong devices. jax_num_cpu_devices is the setting behind
    XLA_FLAGS=--xla_force_host_platform_device_count, and overrides it.
    """
    try:  # the device count first: it refuses once JAX has started, before the platform is touched
        jax.config.update("jax_num_cpu_devices", count)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        pass  # the check below names the problem
    if jax.default_backend() != "cpu" or jax.device_count() != count:
        raise UserError(
            f"JAX already started {jax.device_count()} {jax.default_backend()} devices in this process; "
            "run python -m maejax.plan in a fresh process"
        )


# --- the abstract state and the step, as the trainers build them --------------------------


@dataclasses.dataclass
class Program:
    """A task's train step with its abstract state and batch (nothing allocated)."""

    step_fn: object  # (state, batch) -> (state, metrics), not jitted
    state: dict  # ShapeDtypeStructs
    batch: dict  # ShapeDtypeStructs of the global batch
    params: dict  # every parameter, trainable or frozen
    trainable: dict  # what gets gradients and optimizer state


def image_shape(config, resolved) -> tuple:
    return (config.batch_size, resolved.image_size, resolved.image_size, resolved.in_channels)


def pretrain_program(config, resolved) -> Program:
    """MAE / DiffMAE: train.py's init and step."""
    model, key, shape = (
        models.build_model(resolved),
        jax.random.key(config.seed),
        image_shape(config, resolved),
    )
    params = jax.eval_shape(lambda: train_step.init_params(model, key, shape))
    # The lr schedule's length changes no buffer, so one epoch of one batch stands in for the dataset.
    tx, schedule = optim.build_optimizer(config, params, config.batch_size)
    state = jax.eval_shape(lambda: train_step.init_state(model, tx, key, shape))
    step_fn = train_step.make_train_step(model, tx, schedule, key, config.grad_accum_steps)
    return Program(step_fn, state, {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}, params, params)


def finetune_program(config, resolved) -> Program:
    """Fine-tuning / linear probing: finetune.py's state layout and finetune_step's step.

    The pre-trained encoder only fills values in, so init_from plays no part here.
    """
    probe = config.task == "linprobe"
    model = models.build_model(resolved).clone(probe=probe)
    key, shape = jax.random.key(config.seed), image_shape(config, resolved)

    def init_variables():
        variables = model.init({"params": key, "dropout": key}, jnp.zeros(shape), train=False)
        return variables["params"], variables.get("batch_stats", {})

    trainable, _ = split_trainable(jax.eval_shape(init_variables)[0], probe)
    tx, schedule = optim.build_optimizer(config, trainable, config.batch_size, depth=resolved.encoder.depth)
    state = jax.eval_shape(lambda: new_state(*init_variables(), tx, probe))
    batch = {
        "image": jax.ShapeDtypeStruct(shape, jnp.float32),
        "target": jax.ShapeDtypeStruct((config.batch_size, resolved.num_classes), jnp.float32),
    }
    step_fn = make_step(model, tx, schedule, key, probe, config.grad_accum_steps)
    return Program(step_fn, state, batch, {**state["frozen"], **state["params"]}, state["params"])


def compile_on_mesh(program: Program, config) -> dict:
    """AOT-compile the step on the config's mesh over this process's devices; per-device bytes.

    Returns:
      "params", "optimizer": bytes per device the state shardings give;
      "argument", "output", "alias", "temp", "generated_code": the compiled
      step's memory_analysis(), and their "total"; "compile_seconds".
    """
    mesh = sharding.make_mesh(config.mesh)
    state_shardings = sharding.tree_shardings(program.state, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(with_sharding, program.state, state_shardings)
    batch = jax.tree.map(lambda x: with_sharding(x, batch_sharding), program.batch)
    start = time.perf_counter()
    step = loop.compile_step(program.step_fn, state_shardings, batch_sharding, mesh)
    # The plan never runs the program, so LLVM's optimisations are skipped: buffer sizes are settled
    # before them (the same memory_analysis), and small programs compile a third faster.
    stats = step.lower(state, batch).compile(compiler_options=FAST_COMPILE).memory_analysis()
    out = {
        "params": shard_bytes(state["params"]) + shard_bytes(state.get("frozen", {})),
        "optimizer": shard_bytes(state["opt"]),
        "compile_seconds": round(time.perf_counter() - start, 1),
    }
    for name in ("argument", "output", "alias", "temp", "generated_code"):
        out[name] = int(getattr(stats, f"{name}_size_in_bytes"))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def tpu_compile_note() -> str:
    if importlib.util.find_spec("libtpu") is None:
        return (
            "TPU compile: not run; libtpu is not installed here, so the compile above is XLA's CPU backend's"
        )
    return (
        "TPU compile: not run; libtpu is installed, but maejax.plan compiles for forced CPU devices only "
        "(no TPU topology compile yet)"
    )


# --- the plan and its report ---------------------------------------------------------------


def prepare(config, devices: int | None, target_name: str | None):
    """Check everything a plan needs before any compile: (config, resolved model, devices, target, notes).

    Raises:
      UserError: a bad flag or config field (ConfigError), as one line.
    """
    target = parse_target(target_name) if target_name is not None else None
    devices = device_count(devices, target)
    config = config.copy_and_resolve_references()
    if config.task not in TRAIN_TASKS:
        raise UserError(
            f"config.task={config.task!r}: maejax.plan plans the training tasks {list(TRAIN_TASKS)}"
        )
    notes = []
    if config.task in validate.TASKS_FROM_WEIGHTS and config.init_from is None:
        config.init_from = RANDOM_INIT
        notes.append("init_from is unset: planned as 'random' (the loaded weights change no shape)")
    validate.validate_batch(config, 1, 1)  # integers first, so that the device check can divide
    check_devices(config, devices)
    return config, validate.validate(config, devices, 1), devices, target, notes


def make_plan(config, resolved, devices: int, target: Target | None, config_path: str, notes=()) -> dict:
    """Build the abstract state, compile the step on this process's devices and estimate the target."""
    program = (pretrain_program if config.task == "pretrain" else finetune_program)(config, resolved)
    data, fsdp = sharding.mesh_shape(config.mesh, devices)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    estimate = plan_memory.analytic_estimate(config, resolved, program, devices)
    classifier = resolved.name == "classifier"
    plan = {
        "config": config_path,
        "task": config.task,
        "model": {
            "name": resolved.name,
            "encoder": dict(resolved.encoder),
            "decoder": None if classifier else dict(resolved.decoder),
            "dtype": resolved.dtype,
            "remat": resolved.remat,
            "mask_ratio": None if classifier else resolved.mask_ratio,
        },
        "devices": devices,
        "mesh": {"data": data, "fsdp": fsdp},
        "batch": {
            "global": config.batch_size,
            "per_device": config.batch_size // devices,
            "grad_accum_steps": config.grad_accum_steps,
            "micro_per_device": config.batch_size // config.grad_accum_steps // devices,
        },
        "params": {"count": count(program.params), "trainable": count(program.trainable)},
        "cpu_compile": compile_on_mesh(program, config),
        "analytic": estimate,
        "fits": {
            kind: {"usable": usable_bytes(kind), "verdict": verdict(estimate["total"], usable_bytes(kind))}
            for kind in DEVICE_KINDS
        },
        "target": dataclasses.asdict(target) if target else None,
        "notes": list(notes),
    }
    if target and DEVICE_KINDS[target.kind].platform == "tpu":
        plan["notes"].append(tpu_compile_note())
    return plan


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def row(label: str, n: int, note: str = "") -> str:
    return f"  {label:<17} {human(n):>11}   {note}".rstrip()


def render(plan: dict) -> str:
    """The text report: the CPU compile's numbers, then the analytic estimate, then the fit table."""
    m, b, c, a, p = plan["model"], plan["batch"], plan["cpu_compile"], plan["analytic"], plan["params"]
    enc, target, accumulate = m["encoder"], plan["target"], b["grad_accum_steps"] > 1
    model = f"encoder {enc['depth']} x {enc['width']}, patch {enc['patch_size']}"
    model += f", decoder {m['decoder']['depth']} x {m['decoder']['width']}" if m["decoder"] else ""
    micro = f", {b['grad_accum_steps']} micro-batches of {b['micro_per_device']}" if accumulate else ""
    trainable = "all trainable" if p["trainable"] == p["count"] else f"{p['trainable']:,} trainable"
    copies = "bfloat16, kept for the backward pass" if a["weight_copies"] else "none"
    copies += ": remat casts again" if m["remat"] and m["dtype"] == "bfloat16" else ""
    kept = (
        f"{b['micro_per_device']} examples x {human(a['activations_per_example'])} kept for the backward pass"
    )
    lines = [
        f"maejax plan: {plan['config']}: task {plan['task']}, model {m['name']} ({model}), "
        f"{m['dtype']}, remat {'on' if m['remat'] else 'off'}",
        f"devices: {plan['devices']}, mesh (data, fsdp) = ({plan['mesh']['data']}, {plan['mesh']['fsdp']})",
        f"batch: global {b['global']} = {plan['devices']} devices x {b['per_device']} per device{micro}",
        f"parameters: {p['count']:,} ({trainable})",
        "",
        f"Per device, from the CPU COMPILE: the train step compiled ahead of time ({c['compile_seconds']} s) "
        f"for {plan['devices']} forced CPU devices with the real shardings; XLA's memory_analysis():",
        row("parameters", c["params"], "from the shardings"),
        row("optimizer state", c["optimizer"], "from the shardings"),
        row("arguments", c["argument"], "state + batch"),
        row("outputs", c["output"], "new state + metrics"),
        row("aliased", c["alias"], "the donated state, counted once"),
        row("temp", c["temp"], "activations, gradients, XLA scratch"),
        row("generated code", c["generated_code"]),
        row("total", c["total"], "arguments + outputs - aliased + temp + code"),
        "  XLA's CPU backend fuses and schedules unlike the TPU and GPU compilers, so its temp size is",
        "  not the target's: this compile proves the step builds with these shardings."
        + (" Nor does it show remat's savings." if m["remat"] else ""),
        "",
        f"Per device, ANALYTIC ESTIMATE{' for ' + target['name'] if target else ''} "
        "(the formula: python -m pydoc maejax.plan):",
        row("parameters", a["params"], f"{p['count']:,} parameters as stored, sharded"),
        row("optimizer state", a["optimizer"], f"{a['optimizer_kind']} float32 per trainable parameter"),
        row("gradients", a["gradients"], "float32" + (", and their running sum" if accumulate else "")),
        row("weight copies", a["weight_copies"], copies),
        row("activations", a["activations"], kept),
        row("input batch", a["input_batch"]),
        row("total", a["total"], "an estimate; not counted: XLA scratch"),
    ]
    for s in a["stacks"]:
        per_token = human(s["block_bytes"] / s["tokens"])
        lines.append(
            f"    {s['name']:<8} {s['depth']:>3} blocks x {s['tokens']:>4} tokens x {per_token:>10} per token"
        )
    if a["loss_per_example"]:
        loss = human(a["loss_per_example"])
        lines.append(f"    loss: float32 patches and targets, head inputs: {loss} per example")
    if plan["task"] == "linprobe":
        lines.append("    linear probe: the frozen encoder keeps nothing; one block's forward pass is live")
    elif m["remat"]:
        lines.append(
            "    remat: each block keeps only its input, plus one block's set while it is recomputed"
        )
    lines += ["", "Fits? The analytic total against one device's memory:"]
    for kind, fit in plan["fits"].items():
        spec = DEVICE_KINDS[kind]
        memory = f"{spec.memory_gib:g} GiB" + (
            f", {human(fit['usable'])} usable" if spec.platform == "gpu" else ""
        )
        mark = "   <- target" if target and target["kind"] == kind else ""
        lines.append(f"  {spec.label:<11} {memory:<27} {fit['verdict']}{mark}")
    lines.append(
        f"  (JAX preallocates {GPU_MEM_FRACTION:.0%} of a GPU's memory for XLA; "
        "XLA_PYTHON_CLIENT_MEM_FRACTION changes it)"
    )
    return "\n".join(lines + [f"note: {n}" for n in plan["notes"]])


# --- the CLI -------------------------------------------------------------------------------


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
    flags.DEFINE_integer("devices", None, "devices to plan for (default: the --target's)")
    flags.DEFINE_string("target", None, f"hardware to estimate for: {TARGET_FORMS}")
    flags.DEFINE_bool("json", False, "print the plan as one JSON object instead of the report")
    flags.mark_flag_as_required("config")


def main(argv) -> None:
    from absl import flags, logging
    from ml_collections import config_flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    config, resolved, devices, target, notes = prepare(FLAGS.config, FLAGS.devices, FLAGS.target)
    force_cpu_devices(devices)
    path = config_flags.get_config_filename(FLAGS["config"])
    plan = make_plan(config, resolved, devices, target, path, notes)
    print(json.dumps(plan) if FLAGS.json else render(plan), flush=True)


if __name__ == "__main__":
    from absl import app

    from maejax.cli import run_cli

    _define_flags()
    sys.exit(run_cli(app, main))
