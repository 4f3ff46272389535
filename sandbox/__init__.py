"""The top floor: the synthetic world generator and the jobs that train on it
(the quickstart, the expert ablation) through the engine's Python API. Run from
a checkout (their recipes are in configs/), not installed."""
