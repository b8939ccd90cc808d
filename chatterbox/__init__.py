"""Our own batched inference stack for Chatterbox Turbo (and Nano)."""
