"""chatrl: the InstructGPT recipe (SFT, ranking, reward model, PPO), end to end."""

__version__ = "0.1.0"
