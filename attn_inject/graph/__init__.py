"""Reading a model, never changing it: per-module tracing, the example forward and what it learns
(node kinds and facts, data flow across modules, train/eval alignment), and putting the model back
exactly as it was after running it."""
