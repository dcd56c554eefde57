"""torch.fx graphs of a model: tracing, abstract shapes and FLOPs, graph walks, memory ownership."""
