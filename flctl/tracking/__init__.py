"""Tracking sinks beside metrics.jsonl: TensorBoard, MLflow, and live
Prometheus metrics. Layer 1.5: fed plain dicts by the coordinator's session,
never importing it."""
