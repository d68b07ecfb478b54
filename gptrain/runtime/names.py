"""The names of the files and folders gptrain writes into an output folder, in one place."""

LOCK_NAME = ".lock"
# A run's files (runtime/rundir.py says where each lives).
CKPT_LAST, CKPT_BEST, METRICS, RUN_CONFIG, PLOT = ("ckpt_last.pt", "ckpt_best.pt", "metrics.jsonl", "config.yaml",
                                                   "training.png")
RUN_FILES = (CKPT_LAST, CKPT_BEST, METRICS, RUN_CONFIG, PLOT)
# TensorBoard's default folder: a run started over must not show the old run's curves beside its own. (W&B's
# folder stays: each W&B run has its own id, so nothing mixes, and it may hold runs not yet synced.)
TENSORBOARD = "tb"
# A LoRA run's adapters in peft's format (hf/adapters.py), beside its checkpoints.
ADAPTER = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_FOLDERS = (TENSORBOARD, ADAPTER)
# A chat dataset adds, per split, which tokens the loss counts and where each conversation starts.
DATASET_FILES = ("train.bin", "val.bin", "meta.json", "train_mask.bin", "val_mask.bin", "train_docs.bin",
                 "val_docs.bin")
HF_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")
# A Hugging Face tokenizer beside an export (transformers 5 reads a chat_template.jinja before tokenizer_config.json's
# template: an export never leaves another's beside its own), and `gptrain tokenizer train`'s output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_TRAINING_FILES = ("tokenizer.json", "training.json")
# What each kind of gptrain output consists of, as far as telling one is there goes.
KINDS = {"run": RUN_FILES[:4], "dataset": DATASET_FILES[:3], "model export": HF_FILES[:2]}
# What --overwrite replaces in a folder given to a run, a preparation, an import or a merge: every kind of output.
GPTRAIN_OUTPUT = (*RUN_FILES, *RUN_FOLDERS, *DATASET_FILES, *HF_FILES)
# Every name gptrain writes in a folder it publishes into (runtime/publish.py knows a staged file by it).
GPTRAIN_NAMES = tuple(dict.fromkeys((*GPTRAIN_OUTPUT, *TOKENIZER_FILES, *TOKENIZER_TRAINING_FILES,
                                     *ADAPTER_FILES)))
