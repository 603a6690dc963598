"""Parameter-efficient fine-tuning (LoRA, DoRA): the config group (config.py) and the loop extension that
freezes the base, injects the peft library's adapter layers and exports adapter/ and a merged hf/
(extension.py). Importing the package loads neither, nor the peft library."""
