"""`python -m gptrain ...` (also what `torchrun -m gptrain` runs)."""

from gptrain.cli import console_main

console_main()
