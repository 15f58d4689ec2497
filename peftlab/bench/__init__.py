"""The comparison harness behind ``peftlab bench``: full fine-tuning vs every PEFT method.

sweep.py (YAML grid -> run specs) -> runner.py (one subprocess per run, results.jsonl, resume)
-> worker.py (inside the subprocess: build, train, evaluate, measure) -> report.py (tables, plots).
tasks.py holds the data and metrics of each task; providers.py builds each method.
"""
