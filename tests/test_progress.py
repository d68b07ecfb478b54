from gptrain.monitor.console import ProgressReporter


def test_plain_lines_without_a_terminal(capsys):
    reporter = ProgressReporter(0, 10, bar=False)
    reporter.step_logged("iter 0: loss 4.0", 4.0, 1000.0)
    reporter.message("step 0: val loss 4.1")
    reporter.close()
    out = capsys.readouterr()
    assert out.out == "iter 0: loss 4.0\nstep 0: val loss 4.1\n" and out.err == ""


def test_bar_on_a_terminal_replaces_step_lines(capsys):
    reporter = ProgressReporter(3, 10, bar=True)
    reporter.advance()
    reporter.step_logged("iter 3: loss 4.0", 4.0, 1000.0)
    reporter.message("step 4: val loss 4.1")
    assert reporter.bar.n == 4 and "loss=4.0000" in str(reporter.bar)
    reporter.close()
    out = capsys.readouterr()
    assert "iter 3: loss" not in out.out and "step 4: val loss 4.1" in out.out
    assert "4/10" in out.err  # the bar itself, on stderr
