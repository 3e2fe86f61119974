"""cliptd: CLIP Targeted Distillation on Ray."""
