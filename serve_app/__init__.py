"""The Ray Serve graph for Chatterbox Turbo: ingress, model replicas and stitcher."""
