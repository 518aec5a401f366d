"""The example scripts, installed with the package as `optvq_hf_examples`.

From a clone, run them as files (`python examples/run_train.py ...`); from an installed wheel, as console commands
(`optvq-train`, `optvq-eval`) or modules (`python -m optvq_hf_examples.run_train`, `accelerate launch -m
optvq_hf_examples.run_train ...`). See docs/installation.md.
"""
