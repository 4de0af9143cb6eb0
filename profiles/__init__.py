"""TensorBoard profiler captures of fastewc's workloads and a summarizer for them.

``python -m profiles.capture`` records the traces, ``python -m profiles.summarize`` turns
them into markdown; see profiles/README.md.  Not part of the installed package.
"""
