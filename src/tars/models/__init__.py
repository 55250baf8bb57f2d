"""Speech LLM backends behind one interface (`backend.Backend`), and the bundled mini model."""
