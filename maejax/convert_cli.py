"""What `python -m maejax.convert` does: check its flags, import weights into a workdir, export them.

The flags themselves and the entry point are in `maejax.convert`.
"""

import numpy as np

from maejax import hf_format, paths, weights_io
from maejax.convert import WeightsError, check_params_fit, params_from_torch, params_to_torch
from maejax.errors import ConfigError, UserError
from maejax.models import model_config


def _model_of_workdir(workdir: str, config):
    """The resolved model of a maejax workdir: its config.json, checked against --config if both exist."""
    from maejax import config as config_lib

    path = paths.join(workdir, "config.json")
    if not paths.isfile(path):
        if config is None:
            raise WeightsError(f"{workdir} has no config.json: pass --config=FILE naming its model")
        return model_config.resolve(config.model)
    saved = model_config.resolve(config_lib.read_config_json(workdir).model)
    if config is not None:
        given = model_config.resolve(config.model)
        for field in ("name", *hf_format.MODEL_FIELDS):
            if hf_format.model_field(given, field) != hf_format.model_field(saved, field):
                raise ConfigError(
                    f"model.{field}",
                    hf_format.model_field(given, field),
                    f"{path} has {hf_format.model_field(saved, field)!r}; drop --config",
                )
    return saved


def import_weights(flags_) -> None:
    """--torch_checkpoint or --hf -> WORKDIR/params and WORKDIR/config.json."""
    from maejax import checkpoint
    from maejax import config as config_lib

    cfg = flags_.config
    if flags_.torch_checkpoint:
        if cfg is None:
            raise UserError("--torch_checkpoint needs --config=FILE naming the model the weights are for")
        state = weights_io.with_official_names(weights_io.load_weights_file(flags_.torch_checkpoint))
    else:
        folder = weights_io.hf_folder(flags_.hf)
        state, hf_model = weights_io.read_hf_folder(folder)
        from_hf = model_config.resolve(hf_model)
        if cfg is None:
            cfg = config_lib.base_config()
            cfg.model = from_hf
        else:
            hf_format.check_same_model(model_config.resolve(cfg.model), from_hf, f"--hf={flags_.hf}")
    resolved = model_config.resolve(cfg.model)
    params = params_from_torch(state, resolved)
    checkpoint.save_params(flags_.workdir, params)
    config_lib.write_config_json(config_lib.with_resolved_model(cfg), flags_.workdir)
    n = sum(np.asarray(v).size for v in _leaves(params))
    print(f"wrote {n / 1e6:.1f}M parameters ({', '.join(sorted(params))}) to {flags_.workdir}/params")


def export_weights(flags_) -> None:
    """--from_workdir's params -> --export (official names) and/or --export_hf (a HF folder)."""
    from maejax import checkpoint

    resolved = _model_of_workdir(flags_.from_workdir, flags_.config)
    params, loaded = checkpoint.load_params(flags_.from_workdir)
    check_params_fit(params, resolved, loaded)
    state = params_to_torch(params, resolved)
    if flags_.export:
        weights_io.write_weights_file(state, flags_.export)
        print(f"wrote {len(state)} tensors from {loaded} to {flags_.export}")
    if flags_.export_hf:
        weights_io.write_hf_folder(state, resolved, flags_.export_hf)
        print(f"wrote a ViTMAEForPreTraining of {loaded} to {flags_.export_hf}")


def check_flags(flags_) -> None:
    """One source, and the outputs that go with it."""
    sources = [f"--{n}" for n in ("torch_checkpoint", "hf", "from_workdir") if getattr(flags_, n)]
    if len(sources) != 1:
        raise UserError(
            "give one of --torch_checkpoint, --hf (import) or --from_workdir (export); "
            f"got {', '.join(sources) or 'none'}"
        )
    if flags_.from_workdir:
        if not (flags_.export or flags_.export_hf):
            raise UserError("--from_workdir needs --export=FILE.pth|FILE.safetensors and/or --export_hf=DIR")
        if flags_.workdir:
            raise UserError("--workdir is where an import writes; an export reads --from_workdir")
    else:
        if not flags_.workdir:
            raise UserError(f"{sources[0]} needs --workdir=DIR to write the params to")
        if flags_.export or flags_.export_hf:
            raise UserError("--export and --export_hf read --from_workdir=DIR (run the import first)")


def main(argv) -> None:
    from absl import flags

    del argv
    check_flags(flags.FLAGS)
    if flags.FLAGS.from_workdir:
        export_weights(flags.FLAGS)
    else:
        import_weights(flags.FLAGS)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
