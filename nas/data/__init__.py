"""Datasets: VTAB-1k, few-shot and ImageFolder formats, the offline mini-VTAB benchmark, and a
decode-once tensor pipeline."""
