"""Standard evaluation tasks through EleutherAI's lm-evaluation-harness (lm-eval): a gptrain checkpoint as an lm-eval
model, so any checkpoint (characters, your own or GPT-2's BPE, LoRA merged, chat, an imported Hugging Face model)
runs lm-eval's tasks and task files without an export step.

The three kinds of request follow lm-eval's Hugging Face backend (HFLM, lm_eval/models/huggingface.py), so a
checkpoint and its export-hf folder give the same scores:
- loglikelihood(context, continuation): spaces that end the context move to the continuation; context +
  continuation is tokenised whole and split after the context's own tokens (a BPE merge across the boundary goes to
  the continuation). An empty context is the start token. The model reads the last block_size tokens of context +
  continuation without its last one (a long context loses its beginning) and scores the continuation's tokens;
  is_greedy says whether each of them was the model's likeliest.
- loglikelihood_rolling(text): the text after the start token, in lm-eval's rolling windows of block_size tokens
  (each token scored once; each window as full of context as it can be).
- generate_until(context, options): greedy decoding from the context's last block_size - max_gen_toks tokens
  (at least half a block: where the HF backend refuses, the window then slides as `gptrain sample`'s does), up to
  the first `until` string, the model's end token or max_gen_toks tokens.
A Hugging Face tokenizer that adds tokens before any text (Llama 3's <|begin_of_text|>) adds them here too, as
transformers' encode does for the HF backend; special tokens' spellings in a task's text are text, as everywhere
in gptrain. The start token is the tokenizer's BOS, else its end-of-text token (HFLM's prefix_token_id).

The model computes in float32. Log-likelihoods are batched: inputs sorted by length, as many rows as fit scoring's
logits budget, and identical inputs (one-token answers to one question) run once. Generation runs a request at a
time, with the KV cache (its stop strings end rows at different lengths).
"""

from __future__ import annotations

import difflib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from gptrain.checkpoint import find_checkpoint, model_from_checkpoint
from gptrain.data.chat import ChatTokenizer
from gptrain.data.model_tokenizer import HFTokenizer
from gptrain.data.tokenizer import tokenizer_from_meta
from gptrain.errors import UserError, one_line
from gptrain.hf.tokenizer import generation_end_id
from gptrain.model import GPT
from gptrain.monitor.console import quiet_bar
from gptrain.runtime.device import resolve_device
from gptrain.runtime.files import require_file
from gptrain.runtime.signals import stop_if_signalled
from gptrain.scoring import LOGITS_BUDGET, MAX_ROWS

INSTALL_HINT = "pip install 'gptrain[eval]'"
try:
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
except ImportError:
    raise UserError(f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL_HINT}") \
        from None

DEFAULT_MAX_GEN_TOKS = 256  # the HF backend's, for a task that sets none
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass
class TaskOptions:
    ckpt: Path
    tasks: list[str]
    limit: int | None = None  # documents per task; all when not given
    device: str = "auto"


@dataclass
class TaskReport:
    checkpoint: str
    device: str
    results: dict  # lm-eval's results dict, without per-document logs


# ----- the model as an lm-eval LM ---------------------------------------------------------------------------------


class GptrainLM(LM):
    def __init__(self, model: GPT, tokenizer, meta: dict, device: torch.device):
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, device  # _device: what LM.device returns
        self.block_size = model.config.block_size
        base = tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer  # without the chat tokens
        self.prefix = added_prefix(base)
        self.start_token = start_token_of(base, meta)
        ends = generation_end_id(meta)  # what ends a generated text: as export-hf writes eos_token_id
        self.end_ids = frozenset([ends] if isinstance(ends, int) else ends or ())

    def encode(self, text: str) -> list[int]:
        """Text as the HF backend's tok_encode tokenises it: the tokens a Hugging Face tokenizer adds, then text."""
        return self.prefix + self.tokenizer.encode(text)

    def start(self, task: str) -> int:
        if self.start_token is None:
            raise UserError(f"task {task} scores a text from its start, which needs a token that starts a text, and "
                            "this model's tokenizer has none (a character model prepared from a single document); "
                            "use a task that gives a context, or a model whose data had several documents")
        return self.start_token

    def pair(self, context: str, continuation: str, task: str) -> tuple[list[int], list[int]]:
        """The tokens of the context and of the continuation, split as lm-eval's TemplateLM splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            tokens, start = self.tokenizer.encode(continuation), self.start(task)
            return (tokens[:1], tokens[1:]) if tokens[:1] == [start] else ([start], tokens)
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [request_tokens(request, self.pair, *request.args, request.task_name) for request in requests]
        return self.score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owners = [], []
        for number, request in enumerate(requests):
            tokens = request_tokens(request, self.encode, request.args[0])
            start = self.start(request.task_name)
            for window in get_rolling_token_windows(tokens, start, self.block_size, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, "loglikelihood_rolling")):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        return [self.generate(request) for request in quiet_bar(requests, desc="generate_until")]

    @torch.no_grad()
    def generate(self, request) -> str:
        context, options = request.args
        options = normalize_gen_kwargs(options, DEFAULT_MAX_GEN_TOKS)
        if options["do_sample"]:
            raise UserError(f"task {request.task_name} asks for sampled generation (do_sample: true); gptrain "
                            "evaluates with greedy decoding only")
        budget, until = options["max_gen_toks"], options["until"]
        keep = max(self.block_size - budget, self.block_size // 2, 1)
        ids = request_tokens(request, self.encode, context)[-keep:] or [self.start(request.task_name)]
        new, text = [], ""
        for token in self.model.stream(torch.tensor([ids], device=self.device), budget, temperature=0.0):
            if int(token) in self.end_ids:
                break
            new.append(int(token))
            text = self.tokenizer.decode(new)
            if any(stop and stop in text for stop in until):
                break
        return postprocess_generated_text(text, until, None)  # cut at the first stop string

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], kind: str) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy one) for each (context, continuation)."""
        results = [(0.0, True)] * len(pairs)  # what an empty continuation keeps
        users = defaultdict(list)  # model input -> the pairs it scores
        for number, (context, continuation) in enumerate(pairs):
            if len(continuation) > self.block_size:
                raise UserError(f"a {kind} request's continuation is {len(continuation)} tokens, longer than the "
                                f"model's context ({self.block_size} tokens, block_size)")
            if continuation:
                users[tuple((context + continuation)[-(self.block_size + 1):][:-1])].append(number)
        rows = sorted(users, key=len, reverse=True)  # longest first: each batch holds rows of similar lengths
        for batch in quiet_bar(list(batches(rows, self.model.config.vocab_size)), desc=kind):
            stop_if_signalled()
            for row, logits in zip(batch, self.logits(batch)):
                for number in users[row]:
                    results[number] = continuation_score(logits[: len(row)], pairs[number][1])
        return results

    def logits(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        """The next-token logits (B, L, V) after each position of rows padded at the end to L tokens."""
        idx = torch.zeros(len(rows), len(rows[0]), dtype=torch.long)
        for number, row in enumerate(rows):
            idx[number, : len(row)] = torch.tensor(row)
        idx = idx.to(self.device)
        # Targets only to have the logits of every position (none is a real target, so the loss is 0).
        logits, _ = self.model(idx, torch.full_like(idx, -1), loss_reduction="sum")
        return logits


def continuation_score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """The continuation's log-likelihood and whether every token of it was the likeliest, from the logits (T, V) of
    the input whose last len(continuation) positions predict it."""
    target = torch.tensor(continuation, device=logits.device)
    logprobs = F.log_softmax(logits[-len(continuation):].float(), dim=-1)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(dim=-1) == target).all())


def batches(rows: list[tuple[int, ...]], vocab_size: int):
    """Rows, longest first, in batches whose logits (rows x the first row's length x vocab_size) fit the budget."""
    batch = []
    for row in rows:
        if batch and (len(batch) == MAX_ROWS or (len(batch) + 1) * len(batch[0]) * vocab_size > LOGITS_BUDGET):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def request_tokens(request, encode, *args):
    """encode(*args), a character the model does not know named with its task and document."""
    try:
        return encode(*args)
    except UserError as exc:
        raise UserError(f"task {request.task_name}, document {request.doc_id}: {exc}") from None


def added_prefix(tokenizer) -> list[int]:
    """The ids a Hugging Face tokenizer's post-processor puts before any text (Llama 3's <|begin_of_text|>)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer.encode("", add_special_tokens=True).ids
    return []


def start_token_of(tokenizer, meta: dict) -> int | None:
    """The token a text is scored after: a Hugging Face tokenizer's BOS, else the end-of-text token (what separates
    documents), as the HF backend's prefix_token_id is the BOS, else the EOS."""
    bos = (meta.get("special_tokens") or {}).get("bos_token")
    if isinstance(tokenizer, HFTokenizer) and bos is not None:
        return tokenizer.encode_markup(bos)[0]
    return tokenizer.eot_token


def load_lm(path: Path, device_name: str) -> GptrainLM:
    device = resolve_device(device_name)
    model, state = model_from_checkpoint(path, device)
    model.eval()
    meta = state.get("dataset_meta")
    if not meta:
        raise UserError(f"{path} records no tokenizer, so a task's text cannot be turned into its tokens")
    return GptrainLM(model, tokenizer_from_meta(meta), meta, device)


# ----- tasks ------------------------------------------------------------------------------------------------------


def is_task_file(spec: str) -> bool:
    return spec.endswith(TASK_FILE_SUFFIXES) or Path(spec).is_file()


def task_manager(specs: list[str]) -> TaskManager:
    """lm-eval's TaskManager; it indexes lm-eval's own tasks (about 9 s) only when a task is named, not a file."""
    for spec in filter(is_task_file, specs):
        require_file(Path(spec), "--tasks file", "give an lm-eval task file (YAML) or a task's name")
    names = [spec for spec in specs if not is_task_file(spec)]
    manager = TaskManager(include_defaults=bool(names))
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"--tasks {name!r} is neither one of lm-eval's tasks nor a task file; {hint}`lm-eval ls "
                            "tasks` lists them")
    return manager


def load_task(manager: TaskManager, spec: str) -> dict:
    """lm-eval's TaskDict of what `spec` names: its tasks (their data loaded: downloaded, or read from datasets'
    cache) and groups."""
    try:
        return manager.load([spec])
    except (yaml.YAMLError, ValueError, KeyError) as exc:
        raise UserError(f"--tasks {spec}: not a valid lm-eval task ({one_line(exc)}); docs/tasks.md shows a task "
                        "file") from None
    except ConnectionError as exc:
        raise UserError(f"--tasks {spec}: its data is neither in the local cache of Hugging Face datasets nor "
                        f"downloadable here ({one_line(exc)}); run it once with network access (datasets keeps "
                        "it; HF_DATASETS_OFFLINE=1 then reads the cache alone), or give a task file whose data "
                        "are local files (docs/tasks.md)") from None
    except FileNotFoundError as exc:
        raise UserError(f"--tasks {spec}: {one_line(exc)}; check its dataset_path and data_files (a relative path "
                        "is read from the current folder)") from None


def outermost(loaded: dict) -> list:
    """The groups and tasks of a TaskDict that no group of it holds: what simple_evaluate is given."""
    inside = {child for children in loaded["group_map"].values() for child in children}
    return [item for name, item in {**loaded["groups"], **loaded["tasks"]}.items() if name not in inside]


def run_tasks(options: TaskOptions) -> TaskReport:
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit must be a number of documents, at least 1, got {options.limit}")
    if not options.tasks:
        raise UserError("--tasks needs at least one task name or task file")
    path = find_checkpoint(options.ckpt)
    # datasets draws a bar on stderr while it converts a task's data the first time: a refusal that follows
    # (a task this model cannot run) must stay the one error line, and the table is the command's output.
    datasets.disable_progress_bars()
    manager = task_manager(options.tasks)
    loaded = [load_task(manager, spec) for spec in options.tasks]
    lm = load_lm(path, options.device)
    for task in (task for one in loaded for task in one["tasks"].values()):
        if task.get_config("output_type") == "loglikelihood_rolling":
            lm.start(task.task_name)  # a model without a start token fails now, before lm-eval builds requests
    results = simple_evaluate(model=lm, tasks=[item for one in loaded for item in outermost(one)],
                              task_manager=manager, limit=options.limit, log_samples=False)
    return TaskReport(str(path), str(lm.device), results)


# ----- output -----------------------------------------------------------------------------------------------------


def json_safe(value):
    """lm-eval's results as JSON: numpy numbers as numbers, a non-finite figure as null, anything else as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return json_safe(handle_non_serializable(value))


def to_json(report: TaskReport) -> str:
    return json.dumps(json_safe({"checkpoint": report.checkpoint, "device": report.device, **report.results}),
                      indent=1)


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for each figure: lm-eval's keys are "metric,filter" ("acc,none")."""
    rows = []
    for task, figures in results["results"].items():
        for key, value in figures.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and not metric.endswith("_stderr"):
                stderr = figures.get(f"{metric}_stderr,{filter_name}")
                name = metric if filter_name == "none" else f"{metric} ({filter_name})"
                rows.append((task, name, value, stderr if isinstance(stderr, (int, float)) else None))
    return rows


def render(report: TaskReport) -> str:
    rows = metric_rows(report.results)
    width = max([len("task"), *(len(task) for task, *_ in rows)])
    metric_width = max([len("metric"), *(len(metric) for _, metric, *_ in rows)])
    lines = [f"{report.checkpoint} on {report.device}",
             f"{'task':<{width}}  {'metric':<{metric_width}}  {'value':>9}  {'stderr':>9}"]
    for task, metric, value, stderr in rows:
        shown = "" if stderr is None or not math.isfinite(stderr) else f"{stderr:.4f}"
        lines.append(f"{task:<{width}}  {metric:<{metric_width}}  {value:>9.4f}  {shown:>9}")
    return "\n".join(lines)
