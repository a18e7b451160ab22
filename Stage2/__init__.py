"""Stage 2: VQA instruction tuning of the SigLIP + projector + Gemma3 VLM, CLI inference, evaluation."""
