"""`gptrain eval`: a checkpoint scored on text files, a dataset split, or multiple-choice questions
(gptrain/scoring.py does the scoring), or on lm-evaluation-harness tasks (gptrain/tasks.py; lm-eval is imported
only then)."""

from __future__ import annotations

from gptrain.commands.args import add_checkpoint_option, path_arg, refuse_extra
from gptrain.errors import UserError


def add_to(commands) -> None:
    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte on text or a dataset split; "
                                   "HellaSwag-style multiple choice; lm-evaluation-harness tasks", description=(
        "Score a checkpoint: loss, perplexity and bits per byte over whole inputs, in sliding windows of "
        "block_size tokens; accuracy on multiple-choice questions in HellaSwag's .jsonl format; or the tasks of "
        "EleutherAI's lm-evaluation-harness (--tasks)."))
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
    evaluate.add_argument("--tasks", metavar="NAME[,NAME]", help="lm-evaluation-harness tasks: their names "
                          "(`lm-eval ls tasks`) or task files (.yaml), comma-separated; run on their own")
    evaluate.add_argument("--limit", type=int, metavar="N", help="score the first N documents of each --tasks task")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    evaluate.set_defaults(run=run)


def run(args, extra: list[str]) -> None:
    refuse_extra(extra)
    if args.tasks is not None:
        evaluate_tasks(args)
    else:
        evaluate_inputs(args)


def evaluate_inputs(args) -> None:
    from gptrain.scoring import EvalOptions, render, run_eval, to_json

    if args.limit is not None:
        raise UserError("--limit counts the documents of each --tasks task; give --tasks too")
    report = run_eval(EvalOptions(args.ckpt, args.texts, args.dataset, args.split, args.hellaswag, args.stride,
                                  args.device, args.block_size))
    print(to_json(report) if args.json else render(report))


def evaluate_tasks(args) -> None:
    scoring = {"--text": args.texts, "--dataset": args.dataset, "--split": args.split, "--hellaswag": args.hellaswag,
               "--stride": args.stride, "--block_size": args.block_size}
    given = [name for name, value in scoring.items() if value not in (None, [])]
    if given:
        raise UserError(f"--tasks runs lm-evaluation-harness tasks on their own; score {', '.join(given)} in "
                        "another call")
    from gptrain.tasks import TaskOptions, render, run_tasks, to_json

    specs = [spec.strip() for spec in args.tasks.split(",") if spec.strip()]
    report = run_tasks(TaskOptions(args.ckpt, specs, args.limit, args.device))
    print(to_json(report) if args.json else render(report))
