from gptrain.monitor.console import Console, format_step

ROW = {"iter": 3, "loss": 4.0, "lr": 1e-3, "grad_norm": 0.5, "clipped": False, "ms": 2.0, "tokens_per_s": 1000.0}


def test_plain_lines_without_a_terminal(capsys):
    console = Console(0, 10, bar=False)
    console.step_logged(ROW, 4.0)
    console.message("step 0: val loss 4.1")
    console.close()
    out = capsys.readouterr()
    assert out.out == format_step(ROW) + "\nstep 0: val loss 4.1\n" and out.err == ""
    assert format_step(ROW).startswith("iter 3: loss 4.0000, lr 1.00e-03, grad norm 0.500, time 2.0ms")


def test_bar_on_a_terminal_replaces_step_lines(capsys):
    console = Console(3, 10, bar=True)
    console.advance()
    console.step_logged(ROW, 4.0)
    console.message("step 4: val loss 4.1")
    assert console.bar.n == 4 and "loss=4.0000" in str(console.bar)
    console.close()
    out = capsys.readouterr()
    assert "iter 3: loss" not in out.out and "step 4: val loss 4.1" in out.out
    assert "4/10" in out.err  # the bar itself, on stderr


def test_a_row_with_the_update_ratio_and_mfu():
    line = format_step({**ROW, "update_ratio": 2e-3, "mfu": 0.25, "loss": None})
    assert "loss nan" in line and "update 2.0e-03" in line and line.endswith("mfu 25.0%")


def printed_iters(out: str) -> list[int]:
    return [int(line.split(":")[0].split()[1]) for line in out.splitlines() if line.startswith("iter ")]


def log_steps(console, iters):
    for it in iters:
        console.step_logged({**ROW, "iter": it}, 4.0)


def test_a_log_gets_a_sparse_choice_of_steps_by_iteration(capsys):
    console = Console(0, 2000, bar=False, sparse=True, eval_interval=250)
    log_steps(console, range(300))
    printed = printed_iters(capsys.readouterr().out)
    # Every step below iter 10, then the first of each 10, then of each 100, and the step before an evaluation.
    assert printed == [*range(10), *range(10, 100, 10), 100, 200, 249]


def test_a_step_left_out_prints_before_the_next_message_and_at_close(capsys):
    console = Console(0, 2000, bar=False, sparse=True, eval_interval=1000)
    log_steps(console, range(0, 140, 7))  # log_interval 7: 0, 7, ..., 133
    console.message("warning: a spike")
    log_steps(console, [140, 147])
    console.close()
    lines = capsys.readouterr().out.splitlines()
    assert printed_iters("\n".join(lines)) == [0, 7, 14, 21, 35, 42, 56, 63, 70, 84, 91, 105, 133, 147]
    assert lines[lines.index("warning: a spike") - 1].startswith("iter 133:")  # the latest step, just before it


def test_the_last_step_of_the_run_always_prints(capsys):
    console = Console(0, 150, bar=False, sparse=True, eval_interval=1000)
    log_steps(console, range(150))
    assert printed_iters(capsys.readouterr().out)[-2:] == [100, 149]


def test_every_step_prints_to_a_terminal_reader(capsys):
    console = Console(0, 300, bar=False, sparse=False, eval_interval=250)
    log_steps(console, range(300))
    console.close()
    assert printed_iters(capsys.readouterr().out) == list(range(300))


def test_a_resumed_run_prints_its_first_step(capsys):
    console = Console(1234, 2000, bar=False, sparse=True, eval_interval=250)
    log_steps(console, [1234, 1235, 1300])
    assert printed_iters(capsys.readouterr().out) == [1234, 1300]
