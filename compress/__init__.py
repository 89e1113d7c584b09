"""Build toolchain: block pruning (paper §3.1), CFG-aware retraining (§3.2), step distillation (§3.3)."""
