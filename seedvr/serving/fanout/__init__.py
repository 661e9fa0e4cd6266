"""One restore job spread over several workers of its own RunPod endpoint (see seedvr.serving.fanout.coordinator)."""
