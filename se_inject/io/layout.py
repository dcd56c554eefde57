"""What a directory se_inject writes holds: the one place that names its files.

Light on purpose (no torch): the command line checks a ``--save``/``--out`` target with these
names before it loads anything.
"""

from __future__ import annotations

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
CONFIG_FILE = "config.json"  # a transformers model's configuration; in a Hub repository, timm's too
MODEL_CARD_FILE = "README.md"  # a Hub repository's model card
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
EXPERIMENT_FILE = "experiment.json"  # an experiment's specification and finished runs
RECORD_FILE = "record.json"  # in each run of an experiment: the finished run (read back on resume)
# every file se_inject writes into a model directory (a fine-tuning run adds its checkpoint and
# metrics): --force replaces a directory only when it holds nothing else
OWNED_FILES = frozenset({WEIGHTS_FILE, RECIPE_FILE, CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE})
