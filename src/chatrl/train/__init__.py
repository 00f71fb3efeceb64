"""The trainers: one module per stage (lm: pretrain + SFT, reward, ppo) and their shared loop."""
