"""`gptrain eval`: a checkpoint scored on text files, a dataset split, or multiple-choice questions
(gptrain/scoring.py does the scoring)."""

from __future__ import annotations

from gptrain.commands.args import add_checkpoint_option, path_arg, refuse_extra


def add_to(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte on text or a dataset split; "
                                               "HellaSwag-style multiple choice", description=(
        "Score a checkpoint: loss, perplexity and bits per byte over whole inputs, in sliding windows of "
        "block_size tokens; accuracy on multiple-choice questions in HellaSwag's .jsonl format."))
    add_checkpoint_option(evaluate)
    evaluate.add_argument("--text", dest="texts", type=path_arg, nargs="+", default=[], metavar="FILE",
                          help="UTF-8 text files, each scored on its own")
    evaluate.add_argument("--dataset", help="a prepared dataset folder (or its name under ./data)")
    evaluate.add_argument("--split", choices=("val", "train"), help="the split of --dataset to score (default val)")
    evaluate.add_argument("--hellaswag", type=path_arg, metavar="FILE",
                          help="a .jsonl of questions in HellaSwag's format (ctx, endings, label)")
    evaluate.add_argument("--stride", type=int, help="tokens between window starts, 1 to block_size (default "
                                                     "block_size // 2; block_size: windows do not overlap)")
    evaluate.add_argument("--block_size", type=int, help="the window's length in tokens, up to the model's context "
                          "(default: the model's context, at most 2,048)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    from gptrain.scoring import EvalOptions, render, run_eval, to_json

    refuse_extra(extra)
    report = run_eval(EvalOptions(args.ckpt, args.texts, args.dataset, args.split, args.hellaswag, args.stride,
                                  args.device, args.block_size))
    print(to_json(report) if args.json else render(report))
