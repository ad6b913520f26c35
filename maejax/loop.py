"""The step loop every training task shares: resume, step, log, hooks, checkpoint, preempt.

Pre-training (train.py) and fine-tuning / linear probing (finetune.py) start
through task.py (validation, workdir, state), build their step function and
input, then hand them to `run`.
"""

import dataclasses
import math
import signal
from collections.abc import Callable

import jax

from maejax import input_pipeline, paths, sharding, writers
from maejax.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


class PreemptionWatcher:
    """Turns SIGTERM (and a first Ctrl-C) into a flag the loop checks once per step.

    The loop then saves a checkpoint at the current step and exits cleanly; a
    second Ctrl-C interrupts at once. With several processes JAX's own
    preemption service takes SIGTERM instead and makes every process agree on
    the step to save at (`reached_preemption`), so no Python handler is set.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer, single_process: bool):
        self.requested = False
        self._checkpointer = checkpointer
        self._single_process = single_process
        self._previous = {}

    def reached(self, step: int) -> bool:
        return self.requested or self._checkpointer.manager.reached_preemption(step)

    def __enter__(self):
        for sig in self.SIGNALS if self._single_process else ():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some notebook runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def check_finite(metrics: dict, step: int, last_checkpoint) -> None:
    if not all(math.isfinite(float(v)) for v in metrics.values()):
        kept = (
            f"the last good checkpoint (step {last_checkpoint}) is kept"
            if last_checkpoint
            else "no checkpoint"
        )
        raise TrainingDiverged(
            f"non-finite loss/gradients at step {step} ({metrics}); {kept}. Try a lower optimizer.blr, "
            "optimizer.grad_clip=1.0, more optimizer.warmup_steps, or model.dtype='float32'"
        )


@dataclasses.dataclass
class Hook:
    """Runs `fn(step, state)` every `every` steps and at the end; scalars it returns are logged."""

    every: int | None
    fn: Callable

    def due(self, step: int, final: bool) -> bool:
        return final or (self.every is not None and step % self.every == 0)


def run(task, run, *, step_fn, loader, make_batch: Callable, total_steps: int, hooks: list) -> dict:
    """Train `run.state` from `run.start_step` to `total_steps`; returns the last logged metrics.

    task: the task.Task (config, workdir, lease); run: the task.Run (state,
    checkpointer, writer). make_batch: host-local loader output -> dict of host
    arrays for step_fn.
    """
    config, workdir, ckpt, writer = task.config, task.workdir, run.ckpt, run.writer
    state, start_step = run.state, run.start_step
    progress = writers.Progress(total_steps, config.batch_size, start_step, enabled=task.is_main)
    resumed = (
        f"resuming at step {start_step} (input batch {loader.position})" if run.restored else "from scratch"
    )
    progress.print(f"training {total_steps} steps, {resumed}; workdir {paths.absolute(workdir)}")
    last_saved = ckpt.all_steps()[-1] if ckpt.all_steps() else None
    last, step = {}, start_step
    with PreemptionWatcher(ckpt, jax.process_count() == 1) as preemption:
        try:
            while step < total_steps:
                batch = input_pipeline.to_global(make_batch(next(loader)), run.batch_sharding)
                state, metrics = step_fn(state, batch)
                step += 1
                final = step == total_steps
                if step % config.log_every_steps == 0 or final:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(metrics, step, last_saved)
                    metrics["img_per_s"] = progress.images_per_second(step)
                    writer.write_scalars(step, metrics)
                    progress.print(progress.line(step, metrics, metrics["img_per_s"]))
                    last = {"step": step, **metrics}
                for hook in hooks:
                    if hook.due(step, final):
                        extra = hook.fn(step, state)
                        if extra:
                            writer.write_scalars(step, extra)
                            progress.print(
                                f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in extra.items())
                            )
                            last.update(extra)
                preempted = preemption.reached(step)
                if step % config.checkpoint_every_steps == 0 or final or preempted:
                    check_finite(
                        {"param_norm": float(jax.device_get(metrics["param_norm"]))}, step, last_saved
                    )
                    task.lease.check()  # another run took the workdir: write nothing more
                    ckpt.save(step, state, {"next_batch": loader.position})
                    last_saved = step
                if preempted and not final:
                    progress.print(f"preemption requested: saved step {step}; run the same command to resume")
                    break
        finally:
            loader.close()
            ckpt.close()
            writer.close()
    if step == total_steps:
        progress.print(
            f"done: {step} steps. metrics {writer.metrics_path}; images "
            f"{paths.join(workdir, writers.IMAGES_DIR)}; checkpoints {ckpt.directory}"
        )
    return last


def compile_step(step_fn, state_shardings, batch_sharding, mesh):
    """jit a (state, batch) -> (state, metrics) step with explicit shardings, donating the state."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def train_loader(config, source, transform, position: dict):
    """This process's training batches from the checkpointed input position on."""
    return input_pipeline.TrainLoader(
        source,
        transform,
        seed=config.seed,
        batch_size=config.batch_size,
        start_batch=int(position["next_batch"]),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=config.dataset.prefetch,
        num_threads=config.dataset.num_threads,
        num_workers=config.dataset.num_workers,
    )


def knn_hook(config, features_apply, batch_sharding, train_source, eval_source, transform, every=None):
    """A Hook logging `knn_top1` of the frozen features on config.knn's labelled subsets.

    features_apply: (params, images) -> (B, D) features; the hook's fn takes the
    train state and reads state["params"] (plus state["frozen"] when present).
    every: steps between runs (None: only at the end).
    """
    from maejax import evaluate

    replicated = sharding.replicated(batch_sharding.mesh)
    num_classes = train_source.num_classes
    micro = config.batch_size // config.grad_accum_steps

    @jax.jit
    def features_fn(params, batch):
        out = {
            "feature": features_apply(params, batch["image"]),
            "label": batch["label"],
            "valid": batch["valid"],
        }
        return jax.lax.with_sharding_constraint(out, replicated)

    def batches(source, limit):
        return input_pipeline.eval_batches(
            source, transform, micro, jax.process_index(), jax.process_count(), limit=limit
        )

    def to_global(batch):
        return input_pipeline.to_global(batch, batch_sharding)

    def run_knn(step, state):
        del step
        params = {**state.get("frozen", {}), **state["params"]}
        train = evaluate.extract_features(
            features_fn, params, batches(train_source, config.knn.num_train), to_global
        )
        test = evaluate.extract_features(
            features_fn, params, batches(eval_source, config.knn.num_eval), to_global
        )
        return {
            "knn_top1": evaluate.knn_top1(*train, *test, num_classes, config.knn.k, config.knn.temperature)
        }

    return Hook(every, run_knn)
