"""Checkpoint interop with other frameworks: ``hf`` reads and writes Hugging Face NemotronH checkpoints."""
