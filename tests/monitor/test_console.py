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
