"""Training stages that are not the RL algorithm: supervised fine-tuning of the LLM or the projector."""
