"""The Registry: finds the GGUF models in the models folder, validates them and publishes them over gRPC."""
