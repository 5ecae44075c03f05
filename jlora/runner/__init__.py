"""The fine-tuning runner behind ``jlora finetune``: config, data, train loop, checkpoints."""
