"""The whole YouZhi pipeline in one command (tools/pipeline.py): source eval -> GQA->MLA conversion -> eval -> GKD
-> eval -> domain continued pre-training -> eval -> MindIR (+ GGUF) export -> concurrency plan -> summary.

config.py: the pipeline yaml's schema; stages.py: one function per stage (each run in its own process);
runner.py: order, fingerprints, the state file, resume; summary.py: the table, JSON and plot."""
