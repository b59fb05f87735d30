"""Stage 3: generation and report. `generate.py` is the entry (`generate(config)`), `drift.py` holds ALL the drift
math, `plan.py` the prompts and seeds, `write.py` the report, `schema.py` its layout, `probe.py` the toy-world
probe's scores, `markdown.py` and `plots.py` the page and the pictures, `compare.py` the comparison of two runs."""
