"""What operators and platforms read: metrics, probes, logs, autoscaling."""
