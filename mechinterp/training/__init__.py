"""Training: SFT and GRPO through TRL, with freeze specs, reward functions and snapshot/drift callbacks.

``freeze`` parses and applies freeze specs, ``rewards`` scores GRPO completions, ``prompts`` renders
GSM8K-style items in the paper's think/answer format, ``drift`` measures KL from the base,
``callbacks`` hooks snapshots, drift logging, freeze guarding and stop conditions into a Trainer,
``settings`` holds the paper defaults and CPU presets and ``runner`` ties them together.
"""
