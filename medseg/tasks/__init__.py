"""What differs between tasks: losses, metrics, post-processing."""
