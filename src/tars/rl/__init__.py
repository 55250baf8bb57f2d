"""Reinforcement learning for TARS (DESIGN §2): from scored rollouts to one policy update.

The pure-function core, each piece testable on numbers worked out by hand:

- `tars.rl.advantages.group_advantages`: step 5, rewards centred per question and modality;
- `tars.rl.losses.clipped_surrogate`: step 6, the DAPO token-level clipped surrogate (with the GRPO
  and Dr. GRPO normalisations, the truncation mask and an optional k3 KL penalty).

The rewards those advantages start from (steps 2-4) are plain functions in `tars.rewards`
(`accuracy`, `alignment`). Rollout generation and the training loop build on these.
"""
