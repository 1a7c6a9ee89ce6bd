"""The Supervisor: owns every llama-server process (start, health, restart, swap, stop)."""
