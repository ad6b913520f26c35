"""One pre-training step (forward, backward, AdamW update): maejax vs. the PyTorch reference.

    python benchmarks/train_step.py                                   # this CPU: ViT-B/16, batch 8, float32
    python benchmarks/train_step.py --variant=L/16 --batch=256         # a GPU: bfloat16
    python benchmarks/train_step.py --variant=L/16 --batch=256 --models=mae,diffmae
    python benchmarks/train_step.py --tiny                            # every code path, tiny sizes

Both sides run on the device JAX runs on, in one process. The reference is
HuggingFace `ViTMAEForPreTraining` (PyTorch; the official MAE model, sdpa
attention) with torch.optim.AdamW: on a GPU under bfloat16 autocast, eager and
with `torch.compile`; on CPU in float32, eager. maejax runs its own jitted
train step (`maejax.train_step`, the official AdamW recipe) with the same sizes,
`--dtype` (bfloat16 on GPU, float32 on CPU by default). Implementations are
timed in alternating rounds so machine noise hits all alike; the table shows
medians.

FLOPs are counted analytically, not by XLA's cost analysis (which misses
cuBLAS calls on GPU): every matmul of the model's forward pass (its traced
dot_generals, attention included), backward = 2x forward. ViT-L/16 MAE at
224 px, mask 0.75, decoder 512x8: 1.24e11 per image; ViT-B/16: 5.87e10.
MFU is against the chip's dense bf16 peak (PEAK_TFLOPS) on a GPU and against
the measured large matmul on CPU. DiffMAE has no reference implementation: its
rows compare maejax's time per FLOP with maejax's MAE step.

It imports neither ml_collections nor TensorFlow, so it runs on a machine that
has only jax, flax, optax, torch and transformers.
"""

import argparse
import importlib
import os
import resource
import statistics
import sys
import time
import traceback
import types

# JAX must not grab 75% of the GPU up front: the reference shares the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bfloat16 peaks (TFLOP/s, no sparsity) by device kind, matched as substrings in order.
PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
TINY = dict(variant="mu/4", image_size=32, batch=4, decoder_width=32, decoder_depth=1, decoder_heads=2)


def import_models():
    """maejax.models' modules, without the package __init__ when ml_collections is missing.

    `maejax.models/__init__` imports the config resolver, which needs
    ml_collections; the model modules themselves do not. A machine without it
    (the GPU machine) gets a bare `maejax.models` package holding them.
    """
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        import maejax

        package = types.ModuleType("maejax.models")
        package.__path__ = [os.path.join(os.path.dirname(maejax.__file__), "models")]
        sys.modules["maejax.models"] = package
    return (
        importlib.import_module("maejax.models.vit"),
        importlib.import_module("maejax.models.mae"),
        importlib.import_module("maejax.models.diffmae"),
    )


vit, mae_lib, diffmae_lib = import_models()
from maejax import host_memory, optim, train_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        default="mae",
        help="comma-separated mae, diffmae, each optionally :xla or :cudnn (else --attention_impl)",
    )
    p.add_argument("--variant", default="B/16")
    p.add_argument("--depth", type=int, help="override the variant's encoder depth (quick proxies)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--decoder_width", type=int, default=512)
    p.add_argument("--decoder_depth", type=int, default=8)
    p.add_argument("--decoder_heads", type=int, default=16)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument("--attention_impl", default="xla", help="maejax attention, comma-separated: xla, cudnn")
    p.add_argument(
        "--reference",
        choices=["auto", "eager", "compiled", "both", "none"],
        default="auto",
        help="auto: eager and torch.compile on CUDA, eager on CPU",
    )
    p.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend ('eager' tests the path)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--rounds", type=int, default=1, help="alternating timing rounds")
    p.add_argument(
        "--round_warmup",
        type=int,
        default=1,
        help="untimed steps at the start of each round: the first step after the other "
        "implementation ran is slower than any in a training run (on CPU: maejax +0.4-0.6 s)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and implementation")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks every code path in seconds")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    platform = jax.devices()[0].platform
    args.dtype = args.dtype or ("bfloat16" if platform == "gpu" else "float32")
    if args.reference == "auto":
        args.reference = "both" if platform == "gpu" else "eager"
    return args


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks.


def _dot_flops(eqn) -> int:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    return 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))


def matmul_flops(jaxpr) -> int:
    """2 * M * N * K summed over every dot_general of a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
        for value in eqn.params.values():  # pjit, cond branches, custom_vjp, remat, scan bodies
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    total += matmul_flops(sub)
    return total


def step_flops_per_image(model, image_shape) -> float:
    """Analytic FLOPs of one train step per image: 3x the forward pass's matmuls (XLA attention)."""
    model = model.clone(attention_impl=None)  # the same math; cuDNN calls hide their matmuls
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: train_step.init_params(model, key, image_shape))
    inputs = jax.eval_shape(lambda: model.random_inputs(key, image_shape[0]))
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)

    def forward(p, x, inp):
        return model.apply({"params": p}, x, **inp, train=False)["loss"]

    return 3.0 * matmul_flops(jax.make_jaxpr(forward)(params, images, inputs)) / image_shape[0]


def mae_flops_formula(width, depth, mlp, patch, image, channels, mask_ratio, dec_width, dec_depth, dec_mlp):
    """The same count in closed form for MAE (checks `step_flops_per_image`): 3x forward, per image."""
    num = (image // patch) ** 2
    kept = int(num * (1 - mask_ratio))
    pdim = patch * patch * channels

    def blocks(tokens, w, m, n):
        return n * (2 * tokens * w * (4 * w + 2 * m) + 4 * tokens * tokens * w)

    forward = (
        2 * num * pdim * width  # patch embedding (all patches, then the visible ones are kept)
        + blocks(1 + kept, width, mlp, depth)
        + 2 * (1 + kept) * width * dec_width  # decoder embedding
        + blocks(1 + num, dec_width, dec_mlp, dec_depth)
        + 2 * (1 + num) * dec_width * pdim  # prediction head
    )
    return 3.0 * forward


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)


def measure_matmul(platform: str) -> dict:
    """Achieved TFLOP/s of one large square matmul in jax and torch (bf16 on GPU, float32 on CPU)."""
    n, dtype, reps = (8192, "bfloat16", 20) if platform == "gpu" else (2048, "float32", 5)
    out = {"n": n, "dtype": dtype}
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(a)
    r.block_until_ready()
    out["jax"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
    try:
        import torch

        device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
        x = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)
        x @ x
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            x @ x
        sync()
        out["torch"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# The implementations: each a runner with run() (one step, synchronised) and peak_bytes().


class Runner:
    def __init__(self, name, run, flops, peak_bytes=lambda: None, compile_s=None):
        self.name, self.run, self.flops, self.peak_bytes, self.compile_s = (
            name,
            run,
            flops,
            peak_bytes,
            compile_s,
        )


def build_model(args, name: str, attention_impl: str = "xla"):
    """The maejax model `name` ('mae' or 'diffmae') of the benchmark's sizes (DiffMAE: defaults)."""
    enc = vit.decode_variant(args.variant)
    if args.depth:
        enc["depth"] = args.depth
    encoder = vit.ViTSpec(**enc)
    decoder = vit.ViTSpec(
        args.decoder_width, args.decoder_depth, args.decoder_heads, 4 * args.decoder_width, encoder.patch_size
    )
    common = dict(
        image_size=args.image_size,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=True,
        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
        attention_impl=None if attention_impl == "xla" else attention_impl,
    )
    cls = mae_lib.MAE if name == "mae" else diffmae_lib.DiffMAE
    return cls(encoder, decoder, **common)


def image_shape(args) -> tuple:
    return (args.batch, args.image_size, args.image_size, 3)


def build_maejax(args, name: str, attention_impl: str):
    """A jitted maejax train step of model `name` ('mae' or 'diffmae')."""
    model = build_model(args, name, attention_impl)
    shape = image_shape(args)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: train_step.init_params(model, key, shape))
    # The official pre-training optimizer, as optim.build_optimizer makes it (no grad clip).
    schedule = optim.lr_schedule(1.5e-4 * args.batch / 256, 1000, 10)
    tx = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, mask=optim.decay_mask(params))
    state = jax.jit(lambda k: train_step.init_state(model, tx, k, shape))(key)
    step = jax.jit(train_step.make_train_step(model, tx, schedule, key), donate_argnums=0)
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def peak_bytes():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    label = f"maejax {'MAE' if name == 'mae' else 'DiffMAE'} ({attention_impl})"
    return Runner(label, run, step_flops_per_image(model, shape) * args.batch, peak_bytes, compile_s)


def hf_config(args):
    from transformers import ViTMAEConfig

    enc = vit.decode_variant(args.variant)
    return ViTMAEConfig(
        hidden_size=enc["width"],
        num_hidden_layers=args.depth or enc["depth"],
        num_attention_heads=enc["num_heads"],
        intermediate_size=enc["mlp_dim"],
        decoder_hidden_size=args.decoder_width,
        decoder_num_hidden_layers=args.decoder_depth,
        decoder_num_attention_heads=args.decoder_heads,
        decoder_intermediate_size=4 * args.decoder_width,
        image_size=args.image_size,
        patch_size=enc.get("patch_size", 16),
        num_channels=3,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )


def build_reference(args, compiled: bool, flops: float):
    """HF ViTMAEForPreTraining + torch AdamW; bf16 autocast on CUDA; optionally torch.compile'd."""
    import torch
    from transformers import ViTMAEForPreTraining

    cuda = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(hf_config(args)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    forward = torch.compile(model, backend=args.compile_backend) if compiled else model
    shape = (args.batch, 3, args.image_size, args.image_size)
    pixels = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32)).to(device)
    autocast = args.dtype == "bfloat16"

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(pixel_values=pixels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    compile_s = None
    if compiled:  # compilation happens in the first call: time it apart from the warm-up
        start = time.perf_counter()
        run()
        compile_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def peak_bytes():
        return torch.cuda.max_memory_allocated() if cuda else None

    label = "reference HF" + (" + torch.compile" if compiled else " eager")
    return Runner(label, run, flops, peak_bytes, compile_s)


# ----------------------------------------------------------------------------------------------
# Timing and the table.


def time_rounds(runners: list, args) -> dict:
    """Median seconds per step of each runner, after warm-up, in alternating rounds.

    Each round starts with `round_warmup` untimed steps: a step that follows
    the other implementation's is not a step of a training run, where steps run
    back to back.
    """
    peaks = {}
    for r in runners:
        for _ in range(args.warmup):
            r.run()
        peaks[r.name] = r.peak_bytes()
    times = {r.name: [] for r in runners}
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(args.round_warmup):
                r.run()
            for _ in range(args.steps):
                start = time.perf_counter()
                r.run()
                times[r.name].append(time.perf_counter() - start)
    for r in runners:
        peaks[r.name] = r.peak_bytes() or peaks[r.name]
    return {name: statistics.median(t) for name, t in times.items()}, peaks


def build_runners(args) -> tuple[list, list]:
    """(runners, failures): a runner that cannot be built is reported, not fatal."""
    runners, failures = [], []

    def attempt(label, build, *build_args):
        try:
            runners.append(build(*build_args))
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc()

    names = []
    for entry in args.models.split(","):
        name, _, chosen = entry.partition(":")
        names.append(name)
        for impl in [chosen] if chosen else args.attention_impl.split(","):
            attempt(f"maejax {name} ({impl})", build_maejax, args, name, impl)
    if "mae" in names and args.reference != "none":
        flops = step_flops_per_image(build_model(args, "mae"), image_shape(args)) * args.batch
        if args.reference in ("eager", "both"):
            attempt("reference eager", build_reference, args, False, flops)
        if args.reference in ("compiled", "both"):
            attempt("reference torch.compile", build_reference, args, True, flops)
    return runners, failures


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    platform = device.platform
    runners, failures = build_runners(args)
    matmul = measure_matmul(platform)
    medians, peaks = time_rounds(runners, args)

    print(
        f"\nPre-training step (fwd + bwd + AdamW), {args.variant}"
        + (f" depth {args.depth}" if args.depth else "")
        + f" {args.image_size}px, batch {args.batch}, mask {args.mask_ratio}, decoder "
        f"{args.decoder_width}x{args.decoder_depth}, {args.dtype}; {device.device_kind} ({platform})"
        + (f", {os.cpu_count()} CPU threads, load {os.getloadavg()[0]:.1f}" if platform == "cpu" else "")
    )
    print(f"jax {jax.__version__}" + "".join(f", {m.__name__} {m.__version__}" for m in _torch_modules()))
    print(host_memory.describe())
    unit, scale = ("TFLOP/s", 1e12) if platform == "gpu" else ("GFLOP/s", 1e9)
    mm = matmul
    mm_line = f"{mm['n']}^3 {mm['dtype']} matmul: jax {mm['jax'] * 1e12 / scale:.1f} {unit}"
    if "torch" in mm:
        mm_line += f", torch {mm['torch'] * 1e12 / scale:.1f} {unit}"
    print(mm_line)
    peak = peak_tflops(device) if platform == "gpu" and args.dtype == "bfloat16" else None
    peak_flops = peak * 1e12 if peak else mm["jax"] * 1e12
    print(
        "MFU against "
        + (f"the {peak:.0f} TFLOP/s dense bf16 peak" if peak else "the measured jax matmul above")
        + "; FLOPs analytic (matmuls + attention, backward = 2x forward)"
    )
    header = f"{'implementation':<30} {'ms/step':>9} {'img/s':>9} {'FLOP/img':>9} {unit:>8} {'MFU':>6}"
    header += f" {'peak mem':>10}"
    print(header)
    print("-" * len(header))
    for r in runners:
        sec = medians[r.name]
        achieved = r.flops / sec
        print(
            f"{r.name:<30} {sec * 1e3:9.1f} {args.batch / sec:9.2f} {r.flops / args.batch:9.3g} "
            f"{achieved / scale:8.1f} {100 * achieved / peak_flops:5.1f}% {fmt_bytes(peaks[r.name]):>10}"
        )
    if platform == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"(peak memory per implementation: n/a on CPU; the whole process's max RSS: {fmt_bytes(rss)})")
    compile_times = [f"{r.name} {r.compile_s:.0f} s" for r in runners if r.compile_s is not None]
    if compile_times:
        print("compile: " + ", ".join(compile_times))
    ours = [r for r in runners if r.name.startswith("maejax MAE")]
    refs = [r for r in runners if r.name.startswith("reference")]
    for o in ours:
        for ref in refs:
            ratio = medians[ref.name] / medians[o.name]
            mem = ""
            if peaks[o.name] and peaks[ref.name]:
                mem = f", peak memory {peaks[o.name] / peaks[ref.name]:.2f}x"
            print(f"speed {o.name} / {ref.name}: {ratio:.2f}x{mem}")
    for d in (r for r in runners if r.name.startswith("maejax DiffMAE")):
        for o in ours:
            per_flop = (medians[d.name] / d.flops) / (medians[o.name] / o.flops)
            print(f"time per FLOP {d.name} / {o.name}: {per_flop:.2f}x")
    for failure in failures:
        print(f"FAILED {failure}")
    return medians


def _torch_modules():
    mods = []
    for name in ("torch", "transformers"):
        if name in sys.modules:
            mods.append(sys.modules[name])
    return mods


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as maejax.main does: both implementations share it
    main()
