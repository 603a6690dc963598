"""Parameter-efficient fine-tuning (LoRA, DoRA, QLoRA's NF4 base): the config group (config.py), the loop
extension that freezes the base, injects the peft library's adapter layers and exports adapter/ and a merged
hf/ (extension.py), and the conversion of an adapter checkpoint (export.py). Importing the package loads none
of them, nor the peft library."""
