"""Scoring finished runs: base against fine-tuned on the test split, and the optional LLM judge. Never imports gradio."""
