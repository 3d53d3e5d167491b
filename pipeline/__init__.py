"""The build: a typed ``BuildPlan`` made once from the arguments (every refusal there, before any
work), and the two targets' steps (``run_engine_target``, ``run_pytorch_target``). See
docs/pipeline.md."""
