"""Tools around training: diagnose, plot, bench, grads, Hugging Face interop. The core never imports them."""
