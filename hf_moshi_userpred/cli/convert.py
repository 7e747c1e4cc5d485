"""`hf-moshi-userpred convert`: a kyutai checkpoint to a model folder of this package, back with
--to-moshi, or quantized."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import DTYPES, add_command, check_device, torch_dtype


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "convert", run, "a kyutai Moshi checkpoint directory -> a model directory of this package",
                      "Convert a kyutai Moshi checkpoint (a local directory with moshi's model.safetensors, an optional "
                      "config.json, the tokenizer and Mimi files) into a Hugging Face model directory with the user "
                      "branch initialised; with --to-moshi, export a model directory back to kyutai's layout.")
    sub.add_argument("source", help="kyutai checkpoint directory (or, with --to-moshi, a model directory)")
    sub.add_argument("output", help="directory to write (must not exist or be empty, unless --overwrite)")
    sub.add_argument("--user-init", choices=("copy_system", "random"), default="copy_system",
                     help="initialise the user Depformer from the system one, or randomly")
    sub.add_argument("--user-dep-q", type=int, default=None, help="user codebooks to predict (default: all)")
    sub.add_argument("--user-depformer", choices=("separate", "shared"), default=None,
                     help="the user branch as a Depformer of its own (separate) or as the system Depformer's steps "
                          "after the system codebooks (shared: PersonaPlex's multistream layout); default: shared for "
                          "a multistream checkpoint (dep_q = n_q, e.g. nvidia/personaplex-7b-v1), else separate. "
                          "The notes say whether a multistream checkpoint's user steps are copies of the system's")
    sub.add_argument("--config", default=None, help="kyutai config json (default: SOURCE/config.json, else moshiko)")
    sub.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")
    sub.add_argument("--to-moshi", action="store_true", help="export SOURCE (a model directory) to kyutai's layout")
    sub.add_argument("--quantize", choices=("int8", "int4"), default=None,
                     help="write torchao weight-only quantized weights (needs the `quant` extra); SOURCE may also be "
                          "a model directory of this package (default: not quantized)")
    sub.add_argument("--device", default="cpu",
                     help="device that quantizes (int4 is packed two weights per byte only on cuda)")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from ..hub.conversion import convert_kyutai_checkpoint, export_to_moshi, quantize_model_directory
    from ..models.modeling_moshi_loading import describe_model_folder

    check_device(args.device)
    if args.to_moshi and args.quantize:
        raise ValueError(f"--quantize {args.quantize} with --to-moshi: kyutai's layout has no quantized weights; "
                         "quantize a model directory of this package instead")
    if args.to_moshi:
        result = export_to_moshi(args.source, args.output, dtype=torch_dtype(args.dtype), overwrite=args.overwrite,
                                 progress=not args.quiet)
    elif args.quantize and Path(args.source).is_dir() and describe_model_folder(args.source) is None:
        result = quantize_model_directory(args.source, args.output, args.quantize, device=args.device,
                                          overwrite=args.overwrite, progress=not args.quiet)
    else:
        overrides = {key: value for key, value in (("user_dep_q", args.user_dep_q),
                                                   ("user_depformer", args.user_depformer)) if value is not None}
        result = convert_kyutai_checkpoint(args.source, args.output, user_init=args.user_init, config_path=args.config,
                                           dtype=torch_dtype(args.dtype), overwrite=args.overwrite,
                                           progress=not args.quiet, quantize=args.quantize, device=args.device,
                                           **overrides)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output_dir}: {result.num_tensors} tensors, {result.num_parameters / 1e6:.1f} M parameters "
          f"({', '.join(result.files)})")
