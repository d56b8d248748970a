"""The pruning pipeline: the stage table and its runner, the run context and one module per stage."""
