"""The Embedding service: texts to L2-normalized vectors, micro-batched, on ONNX Runtime or torch."""
