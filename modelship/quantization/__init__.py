"""Variants: INT8 (dynamic, static QDQ), FP16, graph optimization, and knowledge distillation."""
