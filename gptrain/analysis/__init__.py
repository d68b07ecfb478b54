"""What inspects a run or a step: diagnose, compare and plot read a run afterwards; explain and grads run one
step and show it; bench times the step."""
