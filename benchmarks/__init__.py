"""Measuring tools, kept out of the way of the method files (README "Speed and memory" and "GPU check"):
bench.py (speed and memory of each method against its naive twin), gpu_check.sh (the commands one GPU runs) and
gpu_summary.py (the summary of what they leave)."""
