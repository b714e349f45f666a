"""The `tpserve` command."""

from __future__ import annotations

import argparse
import re
import sys

CONVERT_USAGE = """\
tpserve convert --from {hf,gguf,megatron} SRC DST [options]
       tpserve convert export-hf SRC DST [--dtype DTYPE]"""

CONVERT_DESCRIPTION = """\
Write a tpserve checkpoint (DST, a new folder) from a model in another format, or a tpserve
checkpoint back to a Hugging Face folder. DST is written to a temporary folder beside it and
renamed at the end: a failed conversion leaves nothing behind.

sources (--from):
  hf        a Hugging Face model folder (config.json, model.safetensors or sharded
            model-*.safetensors with an index, tokenizer files): GPT-2, Llama (SmolLM2 ...),
            Mistral, Qwen2, StableLM
  gguf      a GGUF file (llama architecture), dequantized; its tokenizer is rebuilt from the
            file's metadata
  megatron  a Megatron-LM save folder or one iteration folder: Megatron-Core torch_dist
            checkpoints, or legacy mp_rank_XX/model_optim_rng.pt files merged across TP ranks
  export-hf write the tpserve checkpoint SRC as a Hugging Face folder DST (to check our numbers
            with your own tools)

examples:
  tpserve convert --from hf ./SmolLM2-135M-Instruct ./ckpt
  tpserve convert --from gguf ./model.Q4_K_M.gguf ./ckpt --dtype bfloat16
  tpserve convert --from megatron ./megatron-save ./ckpt --allow-pickle --tokenizer ./gpt2-tokenizer
  tpserve convert export-hf ./ckpt ./hf-folder"""

PICKLE_HELP = (
    "allow reading pickle files (pytorch_model.bin, Megatron's model_optim_rng.pt and the training "
    "args stored in a checkpoint). Unpickling runs whatever code the file contains, so a checkpoint "
    "from an untrusted source could take over this machine: pass this only for files you trust. "
    "Without it such files are refused; safetensors, GGUF and torch_dist tensors never need it"
)


def _size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB or 500MB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B").rstrip("I")
    return int(number * 1024 ** " KMGT".index(unit or " "))


def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", usage=CONVERT_USAGE, description=CONVERT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, help="convert a model into a tpserve checkpoint",
    )
    p.add_argument("paths", nargs="+", metavar="SRC DST", help="source and destination (a new folder)")
    p.add_argument("--from", dest="source", choices=["hf", "gguf", "megatron"], help="the format of SRC")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
        help="dtype the tensors are stored in; auto keeps the source's (float32 for a dequantized GGUF)",
    )
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument(
        "--megatron-args", metavar="FILE",
        help="megatron: a JSON object of Megatron-LM arguments (num_layers, hidden_size, num_attention_heads, "
             "swiglu, normalization, ...) describing the model, instead of the pickled args in the checkpoint",
    )
    p.add_argument(
        "--vocab-size", type=int,
        help="megatron: the tokenizer's real vocabulary size; Megatron stores only the padded size, "
             "whose extra rows are dropped when this is given",
    )
    p.add_argument(
        "--tokenizer", metavar="DIR",
        help="megatron: a Hugging Face tokenizer folder to bundle (Megatron checkpoints carry none)",
    )
    p.add_argument(
        "--max-shard-size", type=_size, default=2**30, metavar="SIZE",
        help="largest safetensors file to write, e.g. 2GB or 500MB (default 1GiB); a larger tensor gets a file of its own",
    )


def _run_convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tpserve.model.checkpoint import CheckpointError
    from tpserve.model.checkpoint.format import parse_dtype

    paths = list(args.paths)
    export = paths[0] == "export-hf" and args.source is None
    if export:
        paths = paths[1:]
    if not export and args.source is None:
        parser.error("say what SRC is with --from {hf,gguf,megatron}, or use `tpserve convert export-hf SRC DST`")
    if len(paths) != 2:
        parser.error(f"expected SRC and DST, got {paths}")
    src, dst = paths
    megatron_only = {"--megatron-args": args.megatron_args, "--vocab-size": args.vocab_size, "--tokenizer": args.tokenizer}
    for flag, value in megatron_only.items():
        if value is not None and args.source != "megatron":
            parser.error(f"{flag} applies to --from megatron only")
    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    try:
        if export:
            from tpserve.model.checkpoint.export_hf import export_hf

            out = export_hf(src, dst, dtype=dtype, max_shard_bytes=args.max_shard_size)
        elif args.source == "hf":
            from tpserve.model.checkpoint.convert_hf import convert_hf

            out = convert_hf(src, dst, dtype=dtype, allow_pickle=args.allow_pickle, max_shard_bytes=args.max_shard_size)
        elif args.source == "gguf":
            from tpserve.model.checkpoint.convert_gguf import convert_gguf

            out = convert_gguf(src, dst, dtype=dtype, max_shard_bytes=args.max_shard_size)
        else:
            from tpserve.model.checkpoint.convert_megatron import convert_megatron

            out = convert_megatron(
                src, dst, dtype=dtype, allow_pickle=args.allow_pickle, megatron_args=args.megatron_args,
                vocab_size=args.vocab_size, tokenizer_dir=args.tokenizer, max_shard_bytes=args.max_shard_size,
            )
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"tpserve convert: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    args = parser.parse_args(argv)
    if args.command == "convert":
        _run_convert(subparsers.choices["convert"], args)
