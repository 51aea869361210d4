"""A DeepSpeed pipeline that takes a language model from raw text to a compressed, deployable model.

Stages (each one module, each runnable with `python -m pipeline.<stage>` or the `deepspeed` launcher):
prepare -> pretrain -> finetune -> compress -> predict/export.
"""

__version__ = "0.1.0"
