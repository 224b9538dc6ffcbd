"""Cluster mode: several ctsd hosts share one ordered change stream on NATS JetStream.

`config` resolves the settings (off unless NATS URLs are configured); `engine` publishes
change groups and applies the stream in order. See docs/CLUSTER.md.
"""
