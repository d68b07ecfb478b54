"""The `gptrain` command line: one subcommand per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from gptrain.errors import CheckpointWriteError, Interrupted, TrainingHalted, UserError
from gptrain.runtime.files import check_output_file, kind_of, require_dir, write_atomically
from gptrain.runtime.signals import interruptible, signal_received, stop_if_signalled, stopped_within


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints usage and its own prefix; gptrain reports every bad input as one `error:` line."""

    epilog_factory = None  # makes the epilog only when help is shown (it may import torch)

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def path_arg(text: str) -> Path:
    """A path option: an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def finite_float(text: str) -> float:
    """A float option: nan and inf are refused (argparse's float() would take them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gptrain", description="Train small GPT language models and sample from them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add_command in (_add_train, _add_sample, _add_grads, _add_diagnose_and_plot, _add_bench, _add_compare,
                        _add_explain, _add_eval, _add_hf, _add_chat, _add_merge_lora):
        add_command(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config", description=(
        "Train from CONFIG; any config key can be overridden as --name=value."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (keys it leaves out take their defaults)")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an out_dir that holds another run, replacing its checkpoints")
    train.epilog_factory = _config_keys_help
    train.set_defaults(handler=_train)


def _config_keys_help() -> str:
    from gptrain.config import keys_help

    return keys_help()


def _add_sample(commands) -> None:
    # Options left out are absent here: their defaults are SampleOptions', said once in gptrain/sample.py.
    sample = commands.add_parser("sample", help="generate text from a checkpoint", argument_default=argparse.SUPPRESS)
    sample.add_argument("--ckpt", type=path_arg, required=True,
                        help="run folder (uses ckpt_best.pt, else ckpt_last.pt) or .pt file")
    sample.add_argument("--start", help="prompt text, or FILE:path to read it from a file")
    sample.add_argument("--num_samples", type=int, help="samples to draw")
    sample.add_argument("--max_new_tokens", type=int, help="tokens per sample")
    _add_decoding_options(sample)
    sample.add_argument("--interactive", action="store_true", help="a prompt loop (Ctrl-D quits)")
    sample.epilog_factory = _sample_defaults_help
    sample.set_defaults(handler=_sample)


def _add_decoding_options(parser) -> None:
    """How `sample` and `chat` pick each next token, and where they run."""
    parser.add_argument("--temperature", type=finite_float, help="0 is greedy decoding")
    parser.add_argument("--top_k", type=int, help="keep the k likeliest tokens")
    parser.add_argument("--top_p", type=finite_float, help="nucleus sampling mass, e.g. 0.9")
    parser.add_argument("--seed", type=int, help="seeds the sampling")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")


def _sample_defaults_help() -> str:
    from gptrain.sample import SampleOptions

    defaults = {f.name: f.default for f in dataclasses.fields(SampleOptions) if f.default is not dataclasses.MISSING}
    return "defaults: " + ", ".join(f"--{name} {value!r}" for name, value in defaults.items()
                                    if name not in ("dtype", "interactive"))


def _add_chat(commands) -> None:
    # Options left out are absent here: their defaults are ChatOptions', said once in gptrain/chat.py.
    chat = commands.add_parser("chat", help="a multi-turn chat with a chat model in the terminal",
                               argument_default=argparse.SUPPRESS, description=(
        "Talk to a model fine-tuned on conversations (README: Chat fine-tuning). Answers stream as they are "
        "sampled; the oldest turns are dropped when the conversation outgrows the model's context. Ctrl-C stops "
        "an answer, Ctrl-D quits."))
    chat.add_argument("--ckpt", type=path_arg, required=True,
                      help="run folder (uses ckpt_best.pt, else ckpt_last.pt) or .pt file")
    chat.add_argument("--system", help="a system message that opens the conversation and is never dropped")
    chat.add_argument("--max_new_tokens", type=int, help="the longest answer, in tokens")
    _add_decoding_options(chat)
    chat.set_defaults(handler=_chat)


def _chat(args, extra: list[str]) -> None:
    from gptrain.chat import ChatOptions, chat

    _refuse_extra(extra)
    chat(ChatOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "handler")}))


def _add_grads(commands) -> None:
    grads = commands.add_parser("grads", help="per-parameter gradient statistics from one forward/backward pass",
                                description="One forward/backward pass on a real batch (or random tokens), then "
                                            "a row per parameter tensor; --name=value overrides config keys.")
    grads.add_argument("config", nargs="?", help="YAML config (a fresh model), or use --ckpt")
    grads.add_argument("--ckpt", type=path_arg, help="run folder or checkpoint file (a trained model)")
    grads.add_argument("--random", dest="random_tokens", action="store_true",
                       help="random tokens instead of a batch of the dataset")
    grads.add_argument("--json", action="store_true", help="print JSON instead of the table")
    grads.set_defaults(handler=_grads)


def _add_diagnose_and_plot(commands) -> None:
    diagnose = commands.add_parser("diagnose", help="explain a run: loss flat, diverged, overfitting, slow, healthy")
    diagnose.add_argument("run_dir", type=path_arg, help="the run's out_dir (config.yaml and metrics.jsonl)")
    diagnose.add_argument("--json", action="store_true", help="print JSON instead of the report")
    diagnose.set_defaults(handler=_diagnose)

    plot = commands.add_parser("plot", help="draw RUN_DIR/training.png (needs gptrain[plot])")
    plot.add_argument("run_dir", type=path_arg, help="the run's out_dir")
    plot.add_argument("--log", action="store_true", help="log-scale loss axis")
    plot.set_defaults(handler=_plot)


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="measure training and sampling speed, MFU and the loop overhead",
                                description="Time the training step as gptrain train runs it against the bare "
                                            "step; --name=value overrides config keys.")
    bench.add_argument("config", help="YAML config file")
    bench.add_argument("--iters", type=int, default=50, help="timed iterations of each kind (default 50)")
    bench.add_argument("--json", dest="json_path", type=path_arg, help="also write every figure to this JSON file")
    bench.add_argument("--profile", action="store_true", help="add torch.profiler's top operators")
    bench.add_argument("--peak_tflops", type=finite_float,
                       help="the device's peak, overriding the table or CPU probe")
    bench.add_argument("--sample_tokens", type=int, default=500, help="new tokens for the sampling figures")
    bench.set_defaults(handler=_bench)


def _add_compare(commands) -> None:
    compare = commands.add_parser("compare", help="several runs' losses in one picture, and a table of how they "
                                                  "differ (needs gptrain[plot])")
    compare.add_argument("runs", nargs="+", type=path_arg, metavar="RUN", help="a run's out_dir")
    compare.add_argument("--out", type=path_arg, default=Path("compare.png"),
                         help="the picture to write (default compare.png; replaces only a PNG)")
    compare.add_argument("--x", choices=("tokens", "time", "iter"), default="tokens",
                         help="the x axis: tokens seen (default), training time or iteration")
    compare.add_argument("--json", action="store_true", help="print JSON instead of the table")
    compare.set_defaults(handler=_compare)


def _compare(args, extra: list[str]) -> None:
    from gptrain.tools.compare import compare, render, to_json

    _refuse_extra(extra)
    rows, _ = compare(args.runs, args.x, args.out)
    print(to_json(rows) if args.json else render(rows))
    print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)  # stdout stays pure JSON


def _add_explain(commands) -> None:
    explain = commands.add_parser("explain", help="run one training iteration of CONFIG and explain each stage with "
                                                  "its real numbers", description=(
        "One training iteration of CONFIG, executed and narrated stage by stage (batch, forward, loss division, "
        "backward, clipping, learning rate, update, zero_grad), each beside the gptrain function doing it; "
        "--name=value overrides config keys. Writes nothing."))
    explain.add_argument("config", help="YAML config file")
    explain.add_argument("--json", action="store_true", help="print every stage's figures as one JSON object")
    explain.set_defaults(handler=_explain)


def _explain(args, extra: list[str]) -> None:
    from gptrain.config import load_config
    from gptrain.tools.explain import explain, render, to_json

    report = explain(load_config(args.config, extra))
    print(to_json(report) if args.json else render(report))


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte on text or a dataset split; "
                                               "HellaSwag-style multiple choice", description=(
        "Score a checkpoint: loss, perplexity and bits per byte over whole inputs, in sliding windows of "
        "block_size tokens; accuracy on multiple-choice questions in HellaSwag's .jsonl format."))
    evaluate.add_argument("--ckpt", type=path_arg, required=True,
                          help="run folder (uses ckpt_best.pt, else ckpt_last.pt) or .pt file")
    evaluate.add_argument("--text", dest="texts", type=path_arg, nargs="+", default=[], metavar="FILE",
                          help="UTF-8 text files, each scored on its own")
    evaluate.add_argument("--dataset", help="a prepared dataset folder (or its name under ./data)")
    evaluate.add_argument("--split", choices=("val", "train"), help="the split of --dataset to score (default val)")
    evaluate.add_argument("--hellaswag", type=path_arg, metavar="FILE",
                          help="a .jsonl of questions in HellaSwag's format (ctx, endings, label)")
    evaluate.add_argument("--stride", type=int, help="tokens between window starts, 1 to block_size (default "
                                                     "block_size // 2; block_size: windows do not overlap)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate.set_defaults(handler=_eval)


def _eval(args, extra: list[str]) -> None:
    from gptrain.tools.scoring import EvalOptions, render, run_eval, to_json

    _refuse_extra(extra)
    report = run_eval(EvalOptions(args.ckpt, args.texts, args.dataset, args.split, args.hellaswag, args.stride,
                                  args.device))
    print(to_json(report) if args.json else render(report))


def _add_hf(commands) -> None:
    import_hf = commands.add_parser("import-hf", help="a local Hugging Face GPT-2 or Llama folder -> a gptrain "
                                    "checkpoint")
    import_hf.add_argument("hf_dir", type=path_arg,
                           help="folder with config.json and model.safetensors (or pytorch_model.bin)")
    import_hf.add_argument("--out", type=path_arg, required=True, help="folder for the checkpoint (OUT/ckpt_last.pt)")
    import_hf.add_argument("--overwrite", action="store_true",
                           help="replace what OUT holds (another run, dataset or export)")
    import_hf.set_defaults(handler=_import_hf)

    export_hf = commands.add_parser("export-hf", help="a gptrain checkpoint -> a Hugging Face folder: GPT-2 or Llama "
                                    "(chosen by the model's options), with its tokenizer")
    export_hf.add_argument("--ckpt", type=path_arg, required=True,
                           help="run folder (ckpt_best.pt, else ckpt_last.pt) or .pt file")
    export_hf.add_argument("--out", type=path_arg, required=True,
                           help="folder for config.json, model.safetensors, tokenizer.json and tokenizer_config.json")
    export_hf.add_argument("--overwrite", action="store_true",
                           help="replace what OUT holds (another export, run or dataset)")
    export_hf.add_argument("--no_tokenizer", dest="with_tokenizer", action="store_false",
                           help="write the model alone (for a checkpoint whose tokenizer cannot be written)")
    export_hf.set_defaults(handler=_export_hf)


def _add_merge_lora(commands) -> None:
    merge = commands.add_parser("merge-lora", help="a LoRA run's adapters merged into its base -> a plain checkpoint")
    merge.add_argument("--ckpt", type=path_arg, required=True,
                       help="the LoRA run folder (ckpt_best.pt, else ckpt_last.pt) or .pt file")
    merge.add_argument("--out", type=path_arg, required=True,
                       help="a .pt file, or a folder (for OUT/ckpt_last.pt)")
    merge.add_argument("--overwrite", action="store_true", help="replace the file, or what the folder holds")
    merge.set_defaults(handler=_merge_lora)


def _merge_lora(args, extra: list[str]) -> None:
    from gptrain.tools.lora_merge import merge_lora

    _refuse_extra(extra)
    path = merge_lora(args.ckpt, Path(args.out), args.overwrite)
    print(f"wrote {path}: a plain checkpoint for sample, eval, chat, export-hf and init_from: from:{path}")


def _train(args, extra: list[str]) -> None:
    from gptrain.config import load_config
    from gptrain.tools.hf import load_pretrained
    from gptrain.train import train

    if args.config is None:
        raise UserError("gptrain train needs a CONFIG file, e.g. gptrain train configs/shakespeare_char_cpu.yaml "
                        "(any key can then be overridden with --name=value)")
    train(load_config(args.config, extra), overwrite=args.overwrite, pretrained=load_pretrained)


def _sample(args, extra: list[str]) -> None:
    from gptrain.sample import SampleOptions, sample

    _refuse_extra(extra)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    sample(SampleOptions(**options))


def _grads(args, extra: list[str]) -> None:
    from gptrain.tools.grads import run_grads

    if (args.config is None) == (args.ckpt is None):
        raise UserError("gptrain grads takes a CONFIG file or --ckpt DIR (one of them)")
    run_grads(args.config, args.ckpt, extra, args.random_tokens, args.json)


def _diagnose(args, extra: list[str]) -> None:
    from gptrain.tools.diagnose import diagnose, render, to_json

    _refuse_extra(extra)
    require_dir(Path(args.run_dir), "run folder", "give the out_dir of a gptrain run")
    findings = diagnose(Path(args.run_dir))
    print(to_json(findings) if args.json else render(findings, Path(args.run_dir)))


def _plot(args, extra: list[str]) -> None:
    from gptrain.tools.plot import plot_run

    _refuse_extra(extra)
    require_dir(Path(args.run_dir), "run folder", "give the out_dir of a gptrain run")
    plot_run(Path(args.run_dir), log_scale=args.log)
    print(f"wrote {Path(args.run_dir) / 'training.png'}")


def _bench(args, extra: list[str]) -> None:
    from gptrain.config import load_config
    from gptrain.tools.bench import ROUNDS, render, run_bench, to_json

    if args.iters < ROUNDS or args.sample_tokens < 1:  # full and bare steps alternate in ROUNDS rounds
        raise UserError(f"--iters must be >= {ROUNDS} and --sample_tokens >= 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak_tflops must be a positive number, got {args.peak_tflops:g}")
    if args.json_path is not None:
        check_output_file(args.json_path, "--json")
        refuse_foreign_json(args.json_path)
    result = run_bench(load_config(args.config, extra), args.iters, args.peak_tflops, args.profile,
                       args.sample_tokens)
    print(render(result))
    if args.json_path is not None:
        write_atomically(args.json_path, (to_json(result) + "\n").encode("utf-8"))


def refuse_foreign_json(path: Path) -> None:
    """bench --json replaces an earlier bench result, never another file."""
    kind = kind_of(path)
    if kind is None:
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")) if kind == "file" and not path.is_symlink() else None
    except (OSError, ValueError, RecursionError):
        earlier = None
    if not (isinstance(earlier, dict) and "full_step_ms" in earlier):
        raise UserError(f"--json {path} already exists and is not an earlier bench result; choose another path")


def _import_hf(args, extra: list[str]) -> None:
    from gptrain.tools.hf import import_hf

    _refuse_extra(extra)
    path = import_hf(Path(args.hf_dir), Path(args.out), args.overwrite)
    print(f"wrote {path}; sample with: gptrain sample --ckpt {args.out}; fine-tune with init_from: from:{args.out}")


def _export_hf(args, extra: list[str]) -> None:
    from gptrain.tools.hf_export import export_hf

    _refuse_extra(extra)
    export = export_hf(args.ckpt, Path(args.out), args.overwrite, args.with_tokenizer)
    done = "already held this export: left unchanged" if export.unchanged else f"wrote {', '.join(export.files)}"
    print(f"{export.architecture} in {export.out_dir} ({done}); load it with transformers' "
          "AutoModelForCausalLM.from_pretrained or pipeline('text-generation', model=...)")


def check_utf8_arguments(argv: list[str]) -> None:
    """Bytes the locale cannot decode reach Python as lone surrogates: name the argument instead of failing later
    with a confusing message (an unknown character, a file not found)."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"the argument {arg.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text") \
                from None


def _refuse_extra(extra: list[str]) -> None:
    if extra:
        raise UserError(f"unrecognized arguments: {' '.join(extra)}")


def main(argv: list[str] | None = None) -> None:
    check_utf8_arguments(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    args.handler(args, extra)


# How long a rank other than 0 that met an error waits for torchrun to stop it before it reports the error itself.
PEER_REPORT_GRACE_S = 15.0


def _rank() -> str:
    """This process's rank under torchrun, "0" when alone. Read from the environment rather than through a
    DistContext, which refuses a malformed RANK: this is also how that very error gets reported."""
    return os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"


def report_once(message: str) -> None:
    """Print a failure once per job. Under torchrun every rank usually meets the same error, and rank 0 reports
    it. The others wait for torchrun to stop them (it does once rank 0 exits): exiting first would make torchrun
    stop rank 0 before it had printed. An error that only this rank met is printed after the grace period."""
    rank = _rank()
    if rank == "0":
        print(message, file=sys.stderr)
    elif not stopped_within(PEER_REPORT_GRACE_S):
        print(f"{message} (rank {rank})", file=sys.stderr)


def run_guarded(entry, argv: list[str] | None = None) -> int:
    """Run a command; a UserError becomes one `error:` line on stderr and exit code 2, without a traceback.
    SIGTERM is turned into an exception like Ctrl-C's, so a command stopped by it cleans up what it started."""
    with interruptible():
        try:
            entry(argv)
            stop_if_signalled()  # a signal whose exception was lost on the way still ends the command as one
        except BaseException as exc:  # every way out is sorted below; the rest propagates
            return report_failure(exc)  # inside interruptible(): what the failure leaves half-made is freed here
    return 0


def report_failure(exc: BaseException) -> int:
    """Report how a command ended and return its exit code; an unexpected error propagates (a traceback is a bug
    to report), unless a signal came first: then whatever it became on the way out is the interruption."""
    if isinstance(exc, UserError):
        report_once(f"error: {exc}")
        return exc.exit_code
    if isinstance(exc, (TrainingHalted, CheckpointWriteError)):
        report_once(str(exc))
        return exc.exit_code
    if isinstance(exc, Interrupted):  # torchrun signals every rank: rank 0 speaks for all
        if _rank() == "0":
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    signum = signal_received()
    if isinstance(exc, KeyboardInterrupt) or signum is not None:
        if _rank() == "0":
            print("terminated by SIGTERM" if signum == 15 else "interrupted", file=sys.stderr)
        return 128 + (signum or 2)
    if isinstance(exc, BrokenPipeError):  # `gptrain sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    if isinstance(exc, OSError):  # a path the system refused (too long, no permission, a full disk, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        report_once(f"error: {where}{exc.strerror or exc}; check the path and its permissions")
        return 2
    raise exc


def console_main() -> None:
    sys.exit(run_guarded(main))
