"""`flctl report`: a run's metrics.jsonl (or several runs') as one
self-contained HTML page with its figures (data), drawn with matplotlib
(figures), assembled offline-safe (page), written by build.write_report.

A view of the run's records, never a second bookkeeping: everything shown
is read back from metrics.jsonl and manifest.json.
"""
