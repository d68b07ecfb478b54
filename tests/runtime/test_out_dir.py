"""One process per output folder, no silent overwrites, crash-proof metrics (issue: nothing is lost, part 2)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, SHAKESPEARE, TINY, run_cli
from hf_tokenizers import save_with_tokenizer

from gptrain import checkpoint as ckpt_io
from gptrain.analysis.diagnose import diagnose, load_run
from gptrain.cli import main, run_guarded
from gptrain.errors import UserError
from gptrain.monitor.metrics import read_metrics
from gptrain.runtime import outdir
from gptrain.train import train


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.exists() else {}


def refused(capsys, argv, *fragments):
    """The command ends with one `error:` line naming each fragment, and exit code 2."""
    code = run_guarded(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def config_file(tmp_path, dataset, **changes):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": str(dataset), "out_dir": str(tmp_path / "run"), **changes}))
    return str(path)


def prepare_argv(source, out, *extra):
    return [str(ROOT / "scripts" / "prepare_text.py"), str(source), "--out", str(out), *extra]


def prepare_script(argv):
    """scripts/prepare_text.py's main, in this process (the scripts folder is not a package)."""
    import runpy

    namespace = runpy.run_path(str(ROOT / "scripts" / "prepare_text.py"), run_name="prepare_text")
    return run_guarded(namespace["main"], argv[1:])


# ----- the lock ---------------------------------------------------------------------------------------------


def test_a_held_lock_refuses_every_writer_and_names_the_holder(tmp_path, char_dataset, hf_folder, capsys):
    run = tmp_path / "run"
    lock = outdir.FolderLock(run, "out_dir")
    lock.acquire()
    try:
        cfg = config_file(tmp_path, char_dataset)
        pid = f"pid {os.getpid()}"
        refused(capsys, ["train", cfg], "in use by another gptrain process", pid)
        refused(capsys, ["train", cfg, "--overwrite"], pid)
        refused(capsys, ["train", cfg, "--init_from=resume"], pid)
        refused(capsys, ["import-hf", str(hf_folder), "--out", str(run), "--overwrite"], "in use", pid)
        source = tmp_path / "t.txt"
        source.write_text("some text to prepare\n" * 50)
        assert prepare_script(prepare_argv(source, run)) == 2
        assert pid in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing was written by the refused commands
    finally:
        lock.release()
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_two_trains_in_one_out_dir_and_a_kill_9_leaves_no_stale_lock(tmp_path, char_dataset):
    cfg = config_file(tmp_path, char_dataset, max_iters=100_000, lr_decay_iters=100_000, eval_interval=100_000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "gptrain", "train", cfg], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not (line := first.stdout.readline()).startswith("iter 2:"):  # it is training now
            assert line, first.stderr.read()
        second = run_cli("train", cfg, "--overwrite")
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    # The kernel released the lock with the process: the next run starts at once.
    again = run_cli("train", cfg, "--overwrite", "--max_iters=3")
    assert again.returncode == 0, again.stderr


def test_failed_start_leaves_no_folder_behind(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "dataset": str(tmp_path / "no_data"), "out_dir": str(tmp_path / "a/b")}))
    refused(capsys, ["train", str(cfg)], "not found")
    assert not (tmp_path / "a").exists()


# ----- overwrite refusals -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, char_dataset):
    root = tmp_path_factory.mktemp("finished")
    config = {**TINY, "dataset": str(char_dataset), "out_dir": str(root / "run"), "max_iters": 4, "eval_interval": 2}
    from gptrain.config import build_config

    train(build_config(dict(config)))
    return root / "run"


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "config.yaml", "ckpt_best.pt"])
def test_any_run_file_counts_as_another_run(tmp_path, char_dataset, finished_run, capsys, leftover):
    """A run that died before its first checkpoint still left metrics.jsonl and config.yaml behind."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / leftover, run / leftover)
    before = snapshot(run)
    refused(capsys, ["train", config_file(tmp_path, char_dataset)], "already holds a run", leftover, "--overwrite")
    assert snapshot(run) == before


def test_overwrite_replaces_every_file_of_the_old_run(tmp_path, char_dataset, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine")
    (run / "training.png").write_bytes(b"old plot")
    assert run_guarded(main, ["train", config_file(tmp_path, char_dataset, max_iters=1, eval_interval=1),
                              "--overwrite"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["event"] for r in rows if "event" in r] == ["start"]  # no row of the old run is left
    assert max(r["iter"] for r in rows) == 1
    assert not (run / "training.png").exists() and (run / "notes.txt").read_text() == "mine"
    assert ckpt_io.load_checkpoint(run / ckpt_io.CKPT_LAST)["progress"]["iter_num"] == 1


@pytest.mark.parametrize("kind", ["dataset", "init_from"])
def test_overwrite_never_clears_what_the_run_reads(tmp_path, char_dataset, finished_run, capsys, kind):
    if kind == "dataset":
        data = tmp_path / "data"
        shutil.copytree(char_dataset, data)
        argv = ["train", config_file(tmp_path, data, out_dir=str(data)), "--overwrite"]
        before = snapshot(data)
    else:
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        argv = ["train", config_file(tmp_path, char_dataset, init_from=f"from:{run}"), "--overwrite"]
        data, before = run, snapshot(run)
    refused(capsys, argv, "which --overwrite would clear")
    assert snapshot(data) == before


def test_resume_and_overwrite_contradict(tmp_path, char_dataset, finished_run, capsys):
    shutil.copytree(finished_run, tmp_path / "run")
    refused(capsys, ["train", config_file(tmp_path, char_dataset, init_from="resume"), "--overwrite"],
            "drop one of them")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    config = transformers.GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return save_with_tokenizer(transformers.GPT2LMHeadModel(config), folder)


def test_import_hf_onto_a_run_is_refused_then_replaces_it_whole(tmp_path, finished_run, hf_folder, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    refused(capsys, ["import-hf", str(hf_folder), "--out", str(run)], "already holds a run", "--overwrite")
    assert snapshot(run) == before
    assert run_guarded(main, ["import-hf", str(hf_folder), "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_last.pt"]  # no old best, config or metrics left
    assert "imported_from" in ckpt_io.load_checkpoint(run / ckpt_io.CKPT_LAST)


def test_export_hf_over_another_export_or_its_own_run(tmp_path, finished_run, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "hf"
    assert run_guarded(main, ["export-hf", "--ckpt", str(finished_run), "--out", str(out)]) == 0
    before = snapshot(out)
    refused(capsys, ["export-hf", "--ckpt", str(finished_run), "--out", str(out), "--no_tokenizer"],
            "already holds a model export")
    assert snapshot(out) == before
    assert run_guarded(main, ["export-hf", "--ckpt", str(finished_run), "--out", str(out), "--overwrite"]) == 0
    run_before = snapshot(finished_run)
    refused(capsys, ["export-hf", "--ckpt", str(finished_run), "--out", str(finished_run), "--overwrite"],
            "holds the checkpoint being exported")
    assert snapshot(finished_run) == run_before


def test_prepare_over_a_dataset(tmp_path, capsys):
    text = SHAKESPEARE.read_text()[:20_000]
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text[:10_000] + "\u00e9" * 50)  # another vocabulary
    out = tmp_path / "data"
    assert prepare_script(prepare_argv(tmp_path / "a.txt", out)) == 0
    before = snapshot(out)
    # The same command again: byte-identical, so it succeeds and changes nothing.
    assert prepare_script(prepare_argv(tmp_path / "a.txt", out)) == 0
    assert "left unchanged" in capsys.readouterr().out and snapshot(out) == before
    assert prepare_script(prepare_argv(tmp_path / "b.txt", out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different dataset" in err and "--overwrite" in err
    assert snapshot(out) == before
    # Same sizes, other content (a different val_fraction moves the cut): refused after tokenising.
    assert prepare_script(prepare_argv(tmp_path / "a.txt", out, "--val_fraction", "0.2")) == 2
    assert "different dataset" in capsys.readouterr().err and snapshot(out) == before
    assert not list(out.glob(".*"))  # no temporary file left behind
    assert prepare_script(prepare_argv(tmp_path / "b.txt", out, "--overwrite")) == 0
    assert json.loads((out / "meta.json").read_text())["characters"] == 10_050


def test_prepare_shakespeare_refuses_to_replace_a_dataset(tmp_path, capsys):
    import runpy

    namespace = runpy.run_path(str(ROOT / "scripts" / "prepare_shakespeare.py"), run_name="prepare_shakespeare")
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:5000])
    out = tmp_path / "out"
    assert run_guarded(namespace["main"], ["--input", str(small), "--out", str(out)]) == 0
    before = snapshot(out)
    assert run_guarded(namespace["main"], ["--input", str(small), "--out", str(out)]) == 0  # identical: fine
    assert run_guarded(namespace["main"], ["--input", str(small), "--out", str(out), "--tokenizer", "gpt2"]) == 2
    assert "different dataset" in capsys.readouterr().err and snapshot(out) == before


def test_failed_preparation_leaves_no_folder(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text, then \xff\xfe not UTF-8")
    out = tmp_path / "new" / "data"
    assert prepare_script(prepare_argv(bad, out)) == 2
    assert "offset 16" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert prepare_script(prepare_argv(empty, out)) == 2
    assert not (tmp_path / "new").exists()


# ----- metrics.jsonl ----------------------------------------------------------------------------------------


def test_torn_last_line_is_skipped_with_a_note_and_cut_on_resume(tmp_path, char_dataset, capsys):
    cfg = config_file(tmp_path, char_dataset, max_iters=6, eval_interval=3)
    assert run_guarded(main, ["train", cfg]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows_before = read_metrics(metrics)
    with open(metrics, "a") as f:
        f.write('{"iter": 6, "loss": 1.2, "lr"')  # a crash in the middle of a write
    capsys.readouterr()
    assert read_metrics(metrics) == rows_before
    assert "torn" in capsys.readouterr().err
    assert diagnose(tmp_path / "run")  # diagnose (and plot, through load_run) still read the run
    assert run_guarded(main, ["train", cfg, "--init_from=resume", "--max_iters=9"]) == 0
    text = metrics.read_text()
    assert text.endswith("\n") and '"lr"{' not in text
    rows = [json.loads(line) for line in text.splitlines()]  # every line is whole again
    steps = [r["iter"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(9))  # each iteration exactly once


def test_resume_after_a_crash_drops_the_duplicates(tmp_path, char_dataset):
    cfg = config_file(tmp_path, char_dataset, max_iters=4, eval_interval=4)
    assert run_guarded(main, ["train", cfg]) == 0
    run = tmp_path / "run"
    checkpoint_rows = (run / "metrics.jsonl").read_text()
    assert ckpt_io.load_checkpoint(run / ckpt_io.CKPT_LAST)["metrics_length"] == len(checkpoint_rows.encode())
    # What a run killed after the checkpoint leaves: more steps logged, then a torn line.
    with open(run / "metrics.jsonl", "a") as f:
        for it in (4, 5):
            f.write(json.dumps({"iter": it, "loss": 123.456, "lr": 0.1, "grad_norm": 1.0, "ms": 1.0,
                                "tokens_per_s": 1.0}) + "\n")
        f.write('{"iter": 6, "lo')
    assert run_guarded(main, ["train", cfg, "--init_from=resume", "--max_iters=6"]) == 0
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(checkpoint_rows) and "123.456" not in text
    steps = [r["iter"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(6))


def test_an_edited_metrics_file_is_cut_back_by_iteration(tmp_path, char_dataset):
    """When metrics.jsonl no longer has the length its checkpoint recorded (someone rewrote it), a resume keeps the
    rows of the iterations before the checkpoint instead."""
    cfg = config_file(tmp_path, char_dataset, max_iters=4, eval_interval=2)
    assert run_guarded(main, ["train", cfg]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))  # shorter
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 4, "loss": 9.0, "lr": 0.1, "grad_norm": 1.0, "ms": 1.0, "tokens_per_s": 1.0})
                + "\n")
    assert run_guarded(main, ["train", cfg, "--init_from=resume", "--max_iters=6"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["iter"] for r in rows if "loss" in r] == list(range(6)) and 9.0 not in [r.get("loss") for r in rows]


METRICS_DAMAGE = {
    "not JSON in the middle": 'this is not json\n',
    "a list": '[1, 2]\n',
    "no iter": '{"loss": 1.0}\n',
    "step without lr": '{"iter": 3, "loss": 1.0}\n',
    "string loss": '{"iter": 3, "loss": "low", "lr": 0.1, "grad_norm": 1, "ms": 1, "tokens_per_s": 1}\n',
    "evaluation without train_loss": '{"iter": 3, "val_loss": 1.0}\n',
    "JSON null": 'null\n',
}


@pytest.mark.parametrize("case", METRICS_DAMAGE)
def test_damaged_metrics_lines_are_named(tmp_path, finished_run, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(2, METRICS_DAMAGE[case])
    (run / "metrics.jsonl").write_text("".join(lines))
    refused(capsys, ["diagnose", str(run)], "metrics.jsonl:3")
    with pytest.raises(UserError, match="metrics.jsonl:3"):
        load_run(run)


def test_a_complete_last_line_that_is_not_a_row_is_named_not_skipped(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("null\n")
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    refused(capsys, ["diagnose", str(run)], f"metrics.jsonl:{lines}", "not a metrics row")
